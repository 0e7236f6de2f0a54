"""Backends after Polygraphy: one folder each, with a loader (a small callable that opens the
session or engine) and a runner (``infer(dict) -> dict``, ``close()``). ``load_runner`` is the one
place that turns (backend, stage, variant) into a runner."""

from __future__ import annotations

from runtime.errors import FilaError

# Stages run at every generated token keep ONNX Runtime's CPU arena (same shapes each step); the
# vision stages run once per image, and an arena would keep their activations' peak for good.
PER_TOKEN_STAGES = ("embed", "decoder", "decoder_gqa")


def fp16_on_cpu(stage: str, variant: str, providers=None) -> bool:
    """A once-per-image fp16 graph on ONNX Runtime's CPU provider alone. That provider has no
    fp16 kernels for MatMul or Conv: at the ``all`` level ONNX Runtime keeps fp32 (and NCHWc)
    copies of every weight (2.5x the fp16 bytes on ``edge``). Such a graph is opened for each run
    at ``extended`` instead, where its weights stay memory-mapped in fp16 and are cast while it
    runs: ``edge`` w4 run peak 5.5 -> 3.4 GB, vision 1.18x slower (``level="all"``: 3.7 GB,
    1.19x; benchmarks/README.md, "Memory plan")."""
    from runtime.onnx_io import cpu_only

    return cpu_only(providers) and variant == "fp16" and stage not in PER_TOKEN_STAGES


def load_runner(backend: str, manifest, stage: str, variant: str, **options):
    """A runner for one variant of one stage of an export."""
    if backend == "onnxruntime":
        from runtime.backends.onnxruntime import OrtRunner, SessionLoader

        options.setdefault("arena", stage in PER_TOKEN_STAGES)
        per_run = fp16_on_cpu(stage, variant, options.get("providers"))
        if per_run:  # opened for each image: a memory map, ~0.1 s a stage
            options.setdefault("level", "extended")
        loader = SessionLoader(manifest.stage_path(stage, variant), **options)
        return OrtRunner(loader, name=stage, per_run=per_run)
    if backend == "tensorrt":
        from runtime.backends.tensorrt import EngineLoader, runner_for

        return runner_for(EngineLoader(manifest, stage, variant, **options))
    raise FilaError(f"unknown backend {backend!r}; use onnxruntime or tensorrt")
