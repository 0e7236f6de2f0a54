"""Backends after Polygraphy: one folder each, with a loader (a small callable that opens the
session or engine) and a runner (``infer(dict) -> dict``, ``close()``). ``load_runner`` is the one
place that turns (backend, stage, variant) into a runner."""

from __future__ import annotations

from runtime.errors import FilaError

# Stages run at every generated token keep ONNX Runtime's CPU arena (same shapes each step); the
# vision stages run once per image, and an arena would keep their activations' peak for good.
PER_TOKEN_STAGES = ("embed", "decoder", "decoder_gqa")


def load_runner(backend: str, manifest, stage: str, variant: str, **options):
    """A runner for one variant of one stage of an export."""
    if backend == "onnxruntime":
        from runtime.backends.onnxruntime import OrtRunner, SessionLoader

        options.setdefault("arena", stage in PER_TOKEN_STAGES)
        loader = SessionLoader(manifest.stage_path(stage, variant), **options)
        return OrtRunner(loader, name=stage)
    if backend == "tensorrt":
        from runtime.backends.tensorrt import EngineLoader, runner_for

        return runner_for(EngineLoader(manifest, stage, variant, **options))
    raise FilaError(f"unknown backend {backend!r}; use onnxruntime or tensorrt")
