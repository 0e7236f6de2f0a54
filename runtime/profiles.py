"""TensorRT optimization profiles computed from the manifest (torch-free, TensorRT-free).

Vision stages get one profile per anyres grid (exact shapes: each crop count builds its own
kernels); the decoder gets a prefill profile (past length 0) and a decode profile (one new token);
other stages one profile spanning their axes' min/opt/max.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import FilaError
from runtime.manifest import Manifest
from runtime.spec import resolve

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)

    def covers(self, shapes: dict[str, Shape]) -> bool:
        for name, shape in shapes.items():
            if name not in self.shapes:
                continue
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(
                not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)
            ):
                return False
        return True

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        shapes = {k: tuple(tuple(s) for s in v) for k, v in d["shapes"].items()}
        return cls(d["name"], shapes)


def _shapes(
    inputs: list[dict], lo: dict, opt: dict, hi: dict
) -> dict[str, tuple[Shape, Shape, Shape]]:
    return {
        t["name"]: tuple(tuple(resolve(d, v) for d in t["shape"]) for v in (lo, opt, hi))
        for t in inputs
    }


def stage_profiles(manifest: Manifest, stage: str, max_batch: int | None = None) -> list[Profile]:
    """The stage's optimization profiles; ``max_batch`` caps the batch axis (the board's buffers
    and the engine's kernels are sized for it)."""
    entry = manifest.stage(stage)
    axes = {k: dict(v) for k, v in entry["axes"].items()}
    if max_batch is not None and "batch" in axes:
        top = max(1, min(max_batch, axes["batch"]["max"]))
        axes["batch"] = {"min": 1, "opt": min(axes["batch"]["opt"], top), "max": top}
    inputs = entry["inputs"]
    if "rows" in axes:
        grids = manifest.preprocess.grid_shapes()
        out = []
        for rows, cols in sorted(set(grids)):
            v = {"rows": rows, "cols": cols, "tiles": 1 + rows * cols}
            out.append(Profile(f"grid{rows}x{cols}", _shapes(inputs, v, v, v)))
        return out
    get = {k: {a: r[k] for a, r in axes.items()} for k in ("min", "opt", "max")}
    if "past" in axes:  # a decoder fed its KV cache: prefill and decode differ
        lo, opt, hi = get["min"], get["opt"], get["max"]
        ctx = hi["total"]
        prefill = _shapes(
            inputs,
            {"batch": lo["batch"], "seq": 1, "past": 0, "total": 1},
            {"batch": opt["batch"], "seq": opt["seq"], "past": 0, "total": opt["seq"]},
            {"batch": hi["batch"], "seq": ctx, "past": 0, "total": ctx},
        )
        decode = _shapes(
            inputs,
            {"batch": lo["batch"], "seq": 1, "past": 1, "total": 2},
            {"batch": opt["batch"], "seq": 1, "past": opt["past"], "total": opt["past"] + 1},
            {"batch": hi["batch"], "seq": 1, "past": ctx - 1, "total": ctx},
        )
        return [Profile("prefill", prefill), Profile("decode", decode)]
    return [Profile("all", _shapes(inputs, get["min"], get["opt"], get["max"]))]


def select_profile(profiles: list[Profile], shapes: dict[str, Shape]) -> int:
    """Index of the first profile that covers these input shapes."""
    for i, profile in enumerate(profiles):
        if profile.covers(shapes):
            return i
    raise FilaError(
        f"input shapes {shapes} are outside every optimization profile "
        f"({', '.join(p.name for p in profiles)}); rebuild the engine with matching axes"
    )
