"""Backends: one module per backend, each with a loader and a runner (``infer(dict) -> dict``)."""

from __future__ import annotations

from runtime.backends.base import Runner, TensorMeta

BACKENDS = ("onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "Runner", "TensorMeta"]
