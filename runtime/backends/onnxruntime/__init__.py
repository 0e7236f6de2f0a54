"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when installed."""

from runtime.backends.onnxruntime.loader import SessionLoader
from runtime.backends.onnxruntime.runner import OrtRunner

__all__ = ["OrtRunner", "SessionLoader"]
