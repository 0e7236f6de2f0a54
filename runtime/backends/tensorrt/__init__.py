"""TensorRT backend: engines built by ``fila build``, run natively with device buffers."""

from runtime.backends.tensorrt.loader import EngineLoader, check_build_info
from runtime.backends.tensorrt.runner import TrtDecoderRunner, TrtRunner, runner_for

__all__ = ["EngineLoader", "TrtDecoderRunner", "TrtRunner", "check_build_info", "runner_for"]
