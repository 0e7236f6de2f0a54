"""The stage contract as data: what each exported graph takes and returns, and its dynamic axes.

The exporter writes these into ``manifest.json``; the TensorRT builder (optimization profiles), the
runtime, the validator and the benchmark read them back. A shape entry is an int, an axis name
(``"tiles"``), or ``"<k>*<axis>"`` for an axis that is a whole multiple of another (the ConvNeXt
view is ``global_tile_size * rows`` pixels tall); ``parse_dim`` is the one reader of that syntax.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from runtime.errors import ManifestError

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int


@dataclass
class StageSpec:
    """One stage graph: its inputs and outputs (named as at every stage boundary), its axes with
    min/opt/max, and which backends can run it."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    axes: dict[str, AxisRange]
    doc: str = ""
    backends: tuple[str, ...] = ("onnxruntime", "tensorrt")

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "axes": {k: asdict(v) for k, v in self.axes.items()},
            "doc": self.doc,
            "backends": list(self.backends),
        }

    @classmethod
    def from_dict(cls, name: str, d: dict) -> StageSpec:
        try:
            return cls(
                name,
                [TensorSpec.from_dict(t) for t in d["inputs"]],
                [TensorSpec.from_dict(t) for t in d["outputs"]],
                {k: AxisRange(**v) for k, v in d["axes"].items()},
                d.get("doc", ""),
                tuple(d.get("backends", ("onnxruntime", "tensorrt"))),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"stage {name!r} in the manifest is malformed ({exc!r})") from exc

    def runs_on(self, backend: str) -> bool:
        return backend in self.backends

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class ParsedDim:
    """A shape entry: ``size`` when fixed, else ``factor * <axis>``."""

    size: int | None = None
    axis: str | None = None
    factor: int = 1


def parse_dim(entry: Dim) -> ParsedDim:
    """Read one shape entry: ``8``, ``"tiles"`` or ``"4*rows"``."""
    if isinstance(entry, int):
        return ParsedDim(size=entry)
    factor, star, axis = str(entry).rpartition("*")
    if not star:
        return ParsedDim(axis=axis.strip())
    if not factor.strip().isdigit():
        raise ValueError(f"shape entry {entry!r} is neither an axis name nor '<k>*<axis>'")
    return ParsedDim(axis=axis.strip(), factor=int(factor))


def resolve(entry: Dim, values: dict[str, int]) -> int:
    """The size of one shape entry at the given axis values."""
    dim = parse_dim(entry)
    return dim.size if dim.size is not None else dim.factor * values[dim.axis]


def resolve_shape(tensor: TensorSpec, values: dict[str, int]) -> tuple[int, ...]:
    return tuple(resolve(d, values) for d in tensor.shape)
