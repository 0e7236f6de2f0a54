"""The ONNX Runtime loader: a callable that opens one graph's session when called."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime import onnx_io


@dataclass
class SessionLoader:
    """Opens ``path`` with these session options (``runtime.onnx_io.session``)."""

    path: Path
    providers: Sequence[str] | None = None
    threads: int | None = None
    level: str = "all"
    cache_dir: Path | None = None  # where to keep ONNX Runtime's optimized graph, if anywhere
    prepack: bool = True  # False: MatMul weights are not copied into packed buffers (memory)
    arena: bool = True  # False: activations freed after each run (graphs run once per image)

    def __call__(self):
        cache = None
        if self.cache_dir is not None:
            cache = Path(self.cache_dir) / f"{Path(self.path).stem}.ort-optimized.onnx"
        return onnx_io.session(
            self.path,
            self.threads,
            self.providers,
            self.level,
            cache,
            prepack=self.prepack,
            arena=self.arena,
        )
