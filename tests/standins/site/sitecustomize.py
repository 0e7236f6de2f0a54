"""Run at interpreter start when this folder is on PYTHONPATH: ``import tensorrt`` and
``from cuda.bindings import runtime`` then give the test stand-ins (``tests/standins``), in this
process and every process it starts with the same environment. For CI and for reproducing its
TensorRT-path checks by hand: ``PYTHONPATH=tests/standins/site fila build --artifacts ART``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for ``standins``

from standins import install  # noqa: E402

install()
