"""``fila``: the parser assembled from each verb module, and the one-line error handling."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fila_export.cli import (
    bench,
    calibrate,
    doctor,
    export,
    model,
    plan,
    run,
    serve,
    tensorrt,
    validate,
    verify,
)
from runtime.errors import FilaError

VERBS = (model, export, validate, calibrate, tensorrt, run, serve, bench, plan, verify, doctor)
# a module a verb needs -> the extra that installs it
EXTRAS = {
    "torch": "export",
    "torchvision": "export",
    "transformers": "export",
    "timm": "export",
    "onnxscript": "export",
    "safetensors": "export",
    "onnx": "export",
    "onnxruntime": "cpu",  # a Jetson: onnxruntime-gpu from NVIDIA's index (README, On a Jetson)
    "tokenizers": "runtime",
    "cuda": "trt",
    "tensorrt": "trt",
    "matplotlib": "dev",
    "psutil": "dev",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
}
HINTS = {
    "onnxruntime": " (on a Jetson: onnxruntime-gpu from NVIDIA's Jetson index instead)",
    "tensorrt": " (on a Jetson: apt's python3-libnvinfer, in a venv made with --system-site-packages)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fila", description="Export, build, run, validate and benchmark FILA models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.add_parsers(sub)
    return parser


def missing_extra(args: argparse.Namespace, exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install, when ``exc`` is a dependency we know."""
    root = (exc.name or "").split(".")[0]
    if root not in EXTRAS:
        return None
    return (
        f"fila {args.command} needs {root}, which is not installed here; install it with "
        f"pip install 'fila-deploy[{EXTRAS[root]}]'" + (HINTS.get(root, ""))
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FilaError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        message = missing_extra(args, exc)
        if message is None or args.debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
