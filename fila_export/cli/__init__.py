"""The ``fila`` command line: one module per verb (or verb group), each with its own parser.
Heavy imports live inside the commands, so ``fila --help`` is instant and the torch-free verbs run
on a board without torch."""

from fila_export.cli.main import main

__all__ = ["main"]
