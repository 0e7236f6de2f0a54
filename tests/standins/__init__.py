"""Stand-ins for TensorRT and cuda-python, for tests where neither can run (no GPU, no TensorRT
wheel). They are not TensorRT or CUDA: ``trt_standin`` and ``cudart_standin`` say what each
enforces and what it does not prove. ``install`` makes ``import tensorrt`` and
``from cuda.bindings import runtime`` give them, so the code under test is the code users run."""

from __future__ import annotations

import sys
import types

MODULES = ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime")


def install(modules: dict | None = None) -> None:
    """Put the stand-ins in ``modules`` (default: ``sys.modules``) under the real names."""
    from standins import cudart_standin, trt_standin

    modules = sys.modules if modules is None else modules
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    cuda.bindings = bindings
    bindings.runtime = cudart_standin
    for name, module in zip(MODULES, (trt_standin, cuda, bindings, cudart_standin), strict=True):
        modules[name] = module
