"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when installed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.backends.base import TensorMeta
from runtime.errors import FilaError

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class BackendError(FilaError):
    """A backend cannot be created with the requested options."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(requested: Sequence[str] | None) -> list[str]:
    """The requested providers (each must be installed), else CPU only."""
    available = available_providers()
    if not requested:
        return ["CPUExecutionProvider"]
    names = [
        p if p.endswith("ExecutionProvider") else f"{p.capitalize()}ExecutionProvider"
        for p in requested
    ]
    names = [{"CudaExecutionProvider": "CUDAExecutionProvider"}.get(n, n) for n in names]
    missing = [n for n in names if n not in available]
    if missing:
        raise BackendError(
            f"execution provider(s) {', '.join(missing)} are not in this onnxruntime build "
            f"(it has {', '.join(available)}); install onnxruntime-gpu or drop --providers"
        )
    return names if "CPUExecutionProvider" in names else [*names, "CPUExecutionProvider"]


def session_options(
    threads: int | None = None, level: str = "all", optimized_cache: Path | None = None
):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if level not in LEVELS:
        raise BackendError(f"graph optimization level {level!r} unknown; use {', '.join(LEVELS)}")
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    if optimized_cache is not None:
        optimized_cache.parent.mkdir(parents=True, exist_ok=True)
        opts.optimized_model_filepath = str(optimized_cache)
    return opts


class OrtRunner:
    """One ONNX graph in an InferenceSession."""

    def __init__(
        self,
        path: Path,
        name: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        level: str = "all",
        cache_dir: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        self.name = name or Path(path).stem
        cache = None
        if cache_dir is not None:
            cache = Path(cache_dir) / f"{Path(path).stem}.ort-optimized.onnx"
        self.providers = choose_providers(providers)
        try:
            self.session = ort.InferenceSession(
                str(path), session_options(threads, level, cache), providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"onnxruntime cannot load {path}: {exc}") from exc
        self.inputs = [
            TensorMeta(i.name, i.type, tuple(i.shape)) for i in self.session.get_inputs()
        ]
        self.outputs = [
            TensorMeta(o.name, o.type, tuple(o.shape)) for o in self.session.get_outputs()
        ]
        self.last_inference_time = 0.0

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        values = self.session.run(None, feeds)
        self.last_inference_time = time.perf_counter() - t0
        return {meta.name: value for meta, value in zip(self.outputs, values, strict=True)}

    def infer_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Run with IO binding: inputs are read from, and outputs written straight into, the given
        (contiguous) arrays, so no tensor is copied through Python (the decoder's KV cache)."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            _bind(binding.bind_input, name, array)
        for name, array in outputs.items():
            _bind(binding.bind_output, name, array)
        t0 = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.last_inference_time = time.perf_counter() - t0


def _bind(bind, name: str, array: np.ndarray) -> None:
    if not array.flags.c_contiguous:
        raise BackendError(f"{name}: IO binding needs a contiguous array")
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


def load(path: Path, **options) -> OrtRunner:
    """Loader: a runner for one graph file."""
    return OrtRunner(path, **options)
