"""Will an export build with TensorRT? A static check of every graph, without TensorRT or a GPU.

The operator tables in ``fila_export/trt_ops/<version>.json`` are data transcribed from onnx-tensorrt's
``docs/operators.md`` (each names its source). Every graph of an export is checked for:

* ``op``: operators the ONNX parser has no importer for (any non-default domain is a plugin);
* ``op-dtype``: an operator fed a data type its row in the table does not list;
* ``const-input``: inputs the parser needs as build-time constants (Reduce ``axes`` ...);
* ``opset``: a default-domain opset outside the parser's range;
* ``dtype``: tensors TensorRT has no type for (float64, string, complex, uint16/32/64, ...), int8 and
  other quantized types outside Q/DQ, and ``Cast`` to a type TensorRT cannot cast to;
* ``dynamic-axis`` / ``profile``: graph input dims that no optimization profile axis of the
  manifest covers;
* ``qdq``: explicit quantization TensorRT rejects: non-zero or non-int8 zero points, non-positive
  scales, per-channel weight scales off the output-channel axis, per-channel activations;
* ``fp32-norm``: normalisation or softmax left in fp16 in a strongly typed graph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import FilaError

TABLES = Path(__file__).resolve().parent / "trt_ops"
DEFAULT_VERSION = "10.3"

# ONNX element type name -> (TensorRT type name or None, name used in messages)
_TYPES = {
    "FLOAT": ("FP32", "float32"),
    "FLOAT16": ("FP16", "float16"),
    "BFLOAT16": ("BF16", "bfloat16"),
    "INT32": ("INT32", "int32"),
    "INT64": ("INT64", "int64"),
    "BOOL": ("BOOL", "bool"),
    "UINT8": ("UINT8", "uint8"),
    "INT8": ("INT8", "int8"),
    "INT4": ("INT4", "int4"),
    "FLOAT8E4M3FN": ("FP8", "float8e4m3fn"),
    "FLOAT4E2M1": ("FP4", "float4e2m1"),
    "DOUBLE": (None, "float64"),
    "STRING": (None, "string"),
    "COMPLEX64": (None, "complex64"),
    "COMPLEX128": (None, "complex128"),
    "INT16": (None, "int16"),
    "UINT16": (None, "uint16"),
    "UINT32": (None, "uint32"),
    "UINT64": (None, "uint64"),
    "UINT4": (None, "uint4"),
}
# Ops with no data input: their output type is what the table's type column is about.
_SOURCE_OPS = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"}
# Normalisation and softmax ops that must stay fp32 in the fp16 graphs (see onnx_utils.FP32_OPS).
NORM_OPS = (
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "Softmax",
    "ReduceMean",
)
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_UINT8 = 2  # TensorProto.UINT8: what QuantizeLinear outputs without a zero point


class TrtCheckError(FilaError):
    """No operator table for the requested TensorRT version, or nothing to check."""


@dataclass(frozen=True)
class Finding:
    stage: str
    precision: str
    node: str  # the node (or, for graph inputs/outputs, the tensor) the finding is about
    rule: str
    message: str

    def line(self) -> str:
        return f"{self.stage} ({self.precision}) node '{self.node}' [{self.rule}]: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


class TrtReport(list):
    """The findings (a list of :class:`Finding`) plus which graphs were checked, against what."""

    def __init__(self, findings=(), graphs=None, table=None):
        super().__init__(findings)
        self.graphs: list[tuple[str, str]] = graphs or []
        self.skipped: list[str] = []  # stages meant for another backend (decoder_gqa)
        self.table: dict = table or {}

    def to_dict(self) -> dict:
        return {
            "trt_version": self.table.get("tensorrt"),
            "table_source": self.table.get("source"),
            "graphs": [{"stage": s, "precision": p} for s, p in self.graphs],
            "skipped_stages": self.skipped,
            "findings": [f.to_dict() for f in self],
            "passed": not self,
        }


# --- tables --------------------------------------------------------------------------------------
def _tables() -> dict[str, dict]:
    out = {}
    for path in sorted(TABLES.glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def known_versions() -> list[str]:
    return sorted(_tables())


def load_table(version: str = DEFAULT_VERSION) -> dict:
    """The operator table for a TensorRT version: ``10.3``, ``10.3.0.30`` and ``10.x`` all work."""
    tables = _tables()
    wanted = str(version).strip()
    candidates = [wanted, ".".join(wanted.split(".")[:2])]
    for name in candidates:
        for stem, table in tables.items():
            if name in {stem, table.get("tensorrt"), *table.get("aliases", [])}:
                return table
    listing = ", ".join(f"{stem} (TensorRT {t.get('tensorrt')})" for stem, t in tables.items())
    raise TrtCheckError(
        f"no onnx-tensorrt operator table for TensorRT {version!r}; known versions: {listing} "
        f"(add one as {TABLES}/<version>.json)"
    )


# --- graph index ---------------------------------------------------------------------------------
def _type_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def _token(elem_type: int) -> str | None:
    return _TYPES.get(_type_name(elem_type), (None, ""))[0]


def _friendly(elem_type: int) -> str:
    name = _type_name(elem_type)
    return _TYPES.get(name, (None, name.lower()))[1]


@dataclass
class GraphIndex:
    """Types, shapes, constants, producers and consumers of one model (subgraphs flattened)."""

    model: Any
    base_dir: str = ""
    types: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list | None] = field(default_factory=dict)
    consts: dict[str, Any] = field(default_factory=dict)  # name -> TensorProto (or a Constant node)
    producer: dict[str, Any] = field(default_factory=dict)
    consumers: dict[str, list] = field(default_factory=dict)  # name -> [(node, input index)]
    nodes: list = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    inference_error: str | None = None

    @classmethod
    def build(cls, model, base_dir: str | Path = "") -> GraphIndex:
        import onnx

        index = cls(model, str(base_dir))
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        except Exception as exc:  # noqa: BLE001 - reported as a finding, the rest still runs
            index.inference_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            inferred = model
        index._add_graph(inferred.graph)
        return index

    def _add_graph(self, graph) -> None:
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            if vi.type.HasField("tensor_type"):
                tt = vi.type.tensor_type
                self.types[vi.name] = tt.elem_type
                self.shapes[vi.name] = (
                    [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
                    if tt.HasField("shape")
                    else None
                )
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.shapes[init.name] = list(init.dims)
            self.consts[init.name] = init
        for node in graph.node:
            self.labels[id(node)] = node.name or f"{node.op_type}_{len(self.nodes)}"
            self.nodes.append(node)
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
            for name in node.output:
                if name:
                    self.producer[name] = node
            if node.op_type == "Constant" and node.output:
                value = _constant_value(node)
                if value is not None:
                    self.consts[node.output[0]] = value
                    self.types[node.output[0]] = value.data_type
                    self.shapes[node.output[0]] = list(value.dims)
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    self._add_graph(sub)

    def label(self, node) -> str:
        return self.labels[id(node)]

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def array(self, name: str):
        """The value of a constant tensor (external data read from ``base_dir``), or None."""
        from onnx import numpy_helper

        tensor = self.consts.get(name)
        if tensor is None:
            return None
        try:
            return numpy_helper.to_array(tensor, base_dir=self.base_dir)
        except Exception:  # noqa: BLE001 - unreadable constants are not checked
            return None


def _constant_value(node):
    """A Constant node's value as a TensorProto (None for sparse values)."""
    from onnx import TensorProto, helper

    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return helper.make_tensor("v", TensorProto.FLOAT, [], [attr.f])
        if attr.name == "value_floats":
            return helper.make_tensor("v", TensorProto.FLOAT, [len(attr.floats)], attr.floats)
        if attr.name == "value_int":
            return helper.make_tensor("v", TensorProto.INT64, [], [attr.i])
        if attr.name == "value_ints":
            return helper.make_tensor("v", TensorProto.INT64, [len(attr.ints)], attr.ints)
        if attr.name in ("value_string", "value_strings"):
            return helper.make_tensor("v", TensorProto.STRING, [], [b""])
    return None


def _attr(node, name: str, default=None):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


# --- the checks ----------------------------------------------------------------------------------
class _Checker:
    def __init__(self, g: GraphIndex, table: dict, stage: str, precision: str):
        self.g, self.table, self.stage, self.precision = g, table, stage, precision
        self.version = table["tensorrt"]
        self.ops = table["operators"]
        self.findings: dict[tuple, Finding] = {}

    def add(self, node: str, rule: str, message: str) -> None:
        f = Finding(self.stage, self.precision, node, rule, message)
        self.findings.setdefault((node, rule, message), f)

    def trt(self) -> str:
        return f"TensorRT {self.version}"

    # opset ----------------------------------------------------------------------------------
    def opset(self) -> None:
        rng = self.table.get("opset", {})
        top = rng.get("max", 10**6)
        if self._int4_weight_only():
            top = max(top, rng.get("int4_weight_only_max", top))
        for imp in self.g.model.opset_import:
            if imp.domain in ("", "ai.onnx") and not rng.get("min", 0) <= imp.version <= top:
                self.add(
                    "<model>",
                    "opset",
                    f"the graph imports opset {imp.version}; the {self.trt()} ONNX parser "
                    f"supports opsets {rng['min']} to {rng['max']}",
                )

    def _int4_weight_only(self) -> bool:
        """Block-quantized int4 DequantizeLinear feeding MatMul: the INT4 weight-only pattern."""
        return any(
            n.op_type == "DequantizeLinear"
            and any(a.name == "block_size" and a.i > 0 for a in n.attribute)
            for n in self.g.nodes
        )

    # operators ------------------------------------------------------------------------------
    def operators(self) -> None:
        g = self.g
        for node in g.nodes:
            label, op = g.label(node), node.op_type
            default = node.domain in ("", "ai.onnx")
            key = op if default else f"{node.domain}:{op}"
            entry = self.ops.get(key)
            if entry is None:
                if default:
                    why = self.table.get("unsupported", {}).get(op)
                    detail = f"listed as unsupported: {why}" if why else "not in its operator table"
                    self.add(
                        label,
                        "op",
                        f"{op} is not supported by the {self.trt()} ONNX parser ({detail})",
                    )
                else:
                    self.add(
                        label,
                        "op",
                        f"{node.domain}:{op} is a custom-domain operator: the "
                        f"{self.trt()} ONNX parser has no importer for it (it "
                        "would need a TensorRT plugin); export standard ONNX ops",
                    )
                continue
            self._op_dtype(node, label, entry)
            self._const_inputs(node, label, entry)

    def _op_dtype(self, node, label: str, entry: dict) -> None:
        names = node.output if node.op_type in _SOURCE_OPS else node.input
        if not names or not names[0] or entry.get("types") is None:
            return
        elem = self.g.types.get(names[0], 0)
        if not elem:
            return
        token = _token(elem)
        if token not in entry["types"]:
            where = "output" if node.op_type in _SOURCE_OPS else "input"
            self.add(
                label,
                "op-dtype",
                f"{node.op_type} {where} '{names[0]}' is {_friendly(elem)}; {self.trt()} "
                f"takes {node.op_type} on {', '.join(entry['types'])} only",
            )

    def _const_inputs(self, node, label: str, entry: dict) -> None:
        for index, what in entry.get("const_inputs", {}).items():
            i = int(index)
            if i < len(node.input) and node.input[i] and not self.g.is_const(node.input[i]):
                self.add(
                    label,
                    "const-input",
                    f"{node.op_type} input {what} ('{node.input[i]}') is computed at run "
                    f"time; {self.trt()} needs it as an initializer or Constant "
                    f"({entry.get('restrictions', '')})",
                )

    # tensor types ---------------------------------------------------------------------------
    def dtypes(self) -> None:
        g, graph = self.g, self.g.model.graph
        io_ok = set(self.table["tensor_types"]["io"])
        quantized = set(self.table["tensor_types"]["quantized"])
        init_names = {t.name for t in graph.initializer}
        for kind, values in (("input", graph.input), ("output", graph.output)):
            for value in values:
                if value.name in init_names or not value.type.HasField("tensor_type"):
                    continue
                elem = value.type.tensor_type.elem_type
                if elem and _token(elem) not in io_ok:
                    self.add(
                        value.name,
                        "dtype",
                        f"graph {kind} '{value.name}' is {_friendly(elem)}: {self._why(elem)}",
                    )
        for name, tensor in g.consts.items():
            self._const_dtype(name, tensor.data_type, io_ok, quantized)
        cast_types = self.ops.get("Cast", {}).get("types")
        for node in g.nodes:
            label = g.label(node)
            if node.op_type in ("Cast", "CastLike") and cast_types is not None:
                to = (
                    _attr(node, "to", 0)
                    if node.op_type == "Cast"
                    else g.types.get(node.input[1] if len(node.input) > 1 else "", 0)
                )
                if to and _token(to) not in cast_types:
                    hint = (
                        "; quantize with QuantizeLinear instead" if _token(to) in quantized else ""
                    )
                    self.add(
                        label,
                        "dtype",
                        f"{node.op_type} to {_friendly(to)}: {self.trt()} casts only to "
                        f"{', '.join(cast_types)}{hint}",
                    )
                continue
            if node.op_type == "Constant":
                continue
            for out in node.output:
                elem = g.types.get(out, 0)
                if elem and _token(elem) is None:
                    self.add(
                        label,
                        "dtype",
                        f"{node.op_type} produces {_friendly(elem)} tensor '{out}': "
                        f"{self._why(elem)}",
                    )

    def _const_dtype(self, name: str, elem: int, io_ok: set, quantized: set) -> None:
        token = _token(elem)
        users = self.g.consumers.get(name, [])
        where = self.g.label(users[0][0]) if users else name
        kind = "Constant" if name in self.g.producer else "initializer"
        if token is None:
            self.add(where, "dtype", f"{kind} '{name}' is {_friendly(elem)}: {self._why(elem)}")
            return
        if token in io_ok and token != "UINT8":
            return
        in_qdq = all(
            n.op_type in _QDQ and (i == 2 or (n.op_type == "DequantizeLinear" and i == 0))
            for n, i in users
        )
        if in_qdq or (token == "UINT8" and all(n.op_type == "Cast" for n, _ in users)):
            return  # Q/DQ operands: zero point and data types are the qdq rule's business
        n, _ = next((u for u in users if u[0].op_type not in _QDQ), users[0])
        self.add(
            self.g.label(n),
            "dtype",
            f"{kind} '{name}' is {_friendly(elem)} and feeds {n.op_type}: {self.trt()} takes "
            f"{_friendly(elem)} only inside Q/DQ (as DequantizeLinear input or zero point)",
        )

    def _why(self, elem: int) -> str:
        token, name = _token(elem), _friendly(elem)
        io = ", ".join(self.table["tensor_types"]["io"])
        if name == "float64":
            return (
                f"{self.trt()} has no float64 (the parser at best casts float64 weights down "
                f"to float32, clamping); export float32"
            )
        if token in self.table["tensor_types"]["quantized"]:
            return f"{self.trt()} takes {name} only inside Q/DQ; network inputs/outputs are {io}"
        if token is None:
            return f"{self.trt()} has no {name} type (it takes {io}, and quantized types in Q/DQ)"
        return f"{self.trt()} network inputs and outputs are {io}"

    # dynamic axes ---------------------------------------------------------------------------
    def dynamic_axes(self, axes: dict | None, inputs: list | None) -> None:
        graph = self.g.model.graph
        axes = axes or {}
        declared = {t["name"] for t in inputs} if inputs is not None else None
        init_names = {t.name for t in graph.initializer}
        known = ", ".join(axes) or "none"
        for value in graph.input:
            if value.name in init_names or not value.type.HasField("tensor_type"):
                continue
            name = value.name
            if declared is not None and name not in declared:
                self.add(
                    name,
                    "profile",
                    f"graph input '{name}' is not among the manifest's inputs for this "
                    "stage, so the TensorRT builder gets no optimization profile for it",
                )
            tt = value.type.tensor_type
            if not tt.HasField("shape"):
                self.add(
                    name,
                    "dynamic-axis",
                    f"graph input '{name}' has no shape (unknown rank); TensorRT needs the "
                    "rank and a profile for every dynamic dim",
                )
                continue
            for i, dim in enumerate(tt.shape.dim):
                if dim.HasField("dim_value"):
                    continue
                if not dim.HasField("dim_param") or not dim.dim_param:
                    self.add(
                        name,
                        "dynamic-axis",
                        f"graph input '{name}' dim {i} has neither a size nor an axis name, so "
                        "no profile range covers it; name it after a stage axis",
                    )
                    continue
                param = dim.dim_param
                k, _, axis = param.rpartition("*")
                if k and not k.strip().isdigit():
                    self.add(
                        name,
                        "dynamic-axis",
                        f"graph input '{name}' dim {i} is '{param}', which is neither an "
                        "axis name nor '<k>*<axis>'",
                    )
                    continue
                axis = axis.strip()
                if axis not in axes:
                    self.add(
                        name,
                        "dynamic-axis",
                        f"graph input '{name}' dim {i} is '{param}', but the manifest has no "
                        f"profile range for axis '{axis}' (axes: {known})",
                    )
                    continue
                r = axes[axis]
                try:
                    ok = 0 <= int(r["min"]) <= int(r["opt"]) <= int(r["max"])
                except (KeyError, TypeError, ValueError):
                    ok = False
                if not ok:
                    self.add(
                        name,
                        "dynamic-axis",
                        f"graph input '{name}' dim {i} uses axis '{axis}', whose profile range "
                        f"{r} is not 0 <= min <= opt <= max",
                    )

    # Q/DQ -------------------------------------------------------------------------------------
    def qdq(self) -> None:
        g = self.g
        quantized = set(self.table["tensor_types"]["quantized"])
        for node in g.nodes:
            if node.op_type not in _QDQ or node.domain not in ("", "ai.onnx"):
                continue
            label, op = g.label(node), node.op_type
            scale = node.input[1] if len(node.input) > 1 else ""
            zp = node.input[2] if len(node.input) > 2 else ""
            if not zp:
                out_type = _attr(node, "output_dtype", 0)
                if op == "QuantizeLinear" and _token(out_type or _UINT8) not in quantized:
                    self.add(
                        label,
                        "qdq",
                        f"{op} has no zero point, so it quantizes to uint8; {self.trt()} "
                        "needs signed int8: give it an int8 zero point of 0",
                    )
            else:
                elem = g.types.get(zp, 0)
                if elem and _token(elem) not in quantized:
                    self.add(
                        label,
                        "qdq",
                        f"{op} zero point '{zp}' is {_friendly(elem)}: {self.trt()} takes "
                        "int8 (symmetric) zero points only",
                    )
                values = g.array(zp)
                if not g.is_const(zp):
                    self.add(
                        label,
                        "qdq",
                        f"{op} zero point '{zp}' is computed at run time; "
                        f"{self.trt()} needs a constant zero",
                    )
                elif values is not None and values.astype("float64").any():
                    nonzero = sorted({float(v) for v in values.reshape(-1) if v})[:4]
                    self.add(
                        label,
                        "qdq",
                        f"{op} zero point '{zp}' is not 0 (has {nonzero}): asymmetric "
                        f"quantization; {self.trt()} needs symmetric Q/DQ (zero point 0)",
                    )
            if scale:
                self._scale(node, label, scale)
            self._per_channel(node, label, scale)

    def _scale(self, node, label: str, scale: str) -> None:
        import numpy as np

        elem = self.g.types.get(scale, 0)
        if elem and _token(elem) not in ("FP32", "FP16", "BF16"):
            self.add(
                label,
                "qdq",
                f"{node.op_type} scale '{scale}' is {_friendly(elem)}; "
                "scales must be float32, float16 or bfloat16",
            )
        values = self.g.array(scale)
        if values is not None and values.size:
            v = values.astype("float64")
            if not np.all(np.isfinite(v)) or np.any(v <= 0):
                self.add(
                    label,
                    "qdq",
                    f"{node.op_type} scale '{scale}' is not positive everywhere (min "
                    f"{float(np.nanmin(v)):g}); TensorRT needs scales > 0",
                )

    def _per_channel(self, node, label: str, scale: str) -> None:
        g = self.g
        shape = g.shapes.get(scale) if scale else None
        if shape is None or len(shape) != 1 or shape[0] == 1:
            return  # per-tensor, blocked (rank >= 2) or unknown: nothing to check
        x = node.input[0]
        rank = len(g.shapes[x]) if g.shapes.get(x) is not None else None
        axis = int(_attr(node, "axis", 1))
        if axis < 0 and rank is not None:
            axis += rank
        if node.op_type == "QuantizeLinear":
            if not g.is_const(x):
                self.add(
                    label,
                    "qdq",
                    f"QuantizeLinear quantizes activation '{x}' per channel (axis {axis}); "
                    f"{self.trt()} quantizes activations per tensor only (one scale)",
                )
            return
        for user, slot, perm in self._weight_users(node.output[0]):
            expected = _output_channel_axis(user, slot, g)
            if expected is None:
                if slot == 0 and user.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
                    self.add(
                        label,
                        "qdq",
                        f"DequantizeLinear feeds the activation input of {user.op_type} "
                        f"'{g.label(user)}' with per-channel scales; {self.trt()} quantizes "
                        "activations per tensor only",
                    )
                continue
            if perm is not None:
                expected = perm[expected] if expected < len(perm) else expected
            if axis != expected:
                self.add(
                    label,
                    "qdq",
                    f"DequantizeLinear quantizes the weight of {user.op_type} "
                    f"'{g.label(user)}' per channel on axis {axis}, but its output channels "
                    f"are on axis {expected}: {self.trt()} needs per-channel weight scales on "
                    f"the output-channel axis (axis={expected})",
                )

    def _weight_users(self, name: str):
        """(consumer, input index, transpose perm or None), looking through one Transpose."""
        for user, slot in self.g.consumers.get(name, []):
            if user.op_type == "Transpose":
                rank = len(self.g.shapes.get(name) or [])
                perm = list(_attr(user, "perm", []) or range(rank)[::-1])
                for inner, inner_slot in self.g.consumers.get(user.output[0], []):
                    yield inner, inner_slot, perm
            else:
                yield user, slot, None

    # fp16 normalisation ---------------------------------------------------------------------
    def fp32_norms(self) -> None:
        low = {"FP16": "fp16", "BF16": "bf16"}
        for node in self.g.nodes:
            if node.op_type not in NORM_OPS or not node.input:
                continue
            elem = self.g.types.get(node.input[0], 0)
            if _token(elem) in low:
                kind = "LayerNorm" if "Normalization" in node.op_type else node.op_type
                self.add(
                    self.g.label(node),
                    "fp32-norm",
                    f"{kind} forced to {low[_token(elem)]}: {node.op_type} input "
                    f"'{node.input[0]}' is {_friendly(elem)}; keep normalisation and softmax "
                    "in fp32 (FP32_OPS in fila_export/onnx_utils.py)",
                )


def _output_channel_axis(user, slot: int, g: GraphIndex) -> int | None:
    """The output-channel axis of a weight input, or None if ``slot`` is not a weight."""
    op = user.op_type
    if op == "Conv" and slot == 1:
        return 0
    if op == "ConvTranspose" and slot == 1:
        return 1
    if op == "MatMul" and slot == 1:
        shape = g.shapes.get(user.input[1])
        return len(shape) - 1 if shape else 1
    if op == "Gemm" and slot == 1:
        return 0 if _attr(user, "transB", 0) else 1
    return None


# --- entry points --------------------------------------------------------------------------------
def check_model(
    model,
    trt_version: str | dict = DEFAULT_VERSION,
    *,
    stage: str = "graph",
    precision: str = "fp32",
    axes: dict | None = None,
    inputs: list | None = None,
    base_dir: str | Path = "",
    rules: tuple[str, ...] | None = None,
) -> list[Finding]:
    """Every finding for one ONNX model. ``axes`` and ``inputs`` are the stage's manifest entries
    (``{"tiles": {"min", "opt", "max"}}``, ``[{"name", ...}]``); ``rules`` limits the checks to
    some of: opset, op, dtype, dynamic-axis, qdq, fp32-norm."""
    table = trt_version if isinstance(trt_version, dict) else load_table(trt_version)
    g = GraphIndex.build(model, base_dir)
    c = _Checker(g, table, stage, precision)
    wanted = set(rules) if rules else {"opset", "op", "dtype", "dynamic-axis", "qdq", "fp32-norm"}
    if g.inference_error:
        c.add("<model>", "onnx", f"ONNX shape inference failed: {g.inference_error}")
    if "opset" in wanted:
        c.opset()
    if "op" in wanted:
        c.operators()
    if "dtype" in wanted:
        c.dtypes()
    if "dynamic-axis" in wanted:
        c.dynamic_axes(axes, inputs)
    if "qdq" in wanted:
        c.qdq()
    if "fp32-norm" in wanted:
        c.fp32_norms()
    return list(c.findings.values())


def check_onnx_file(
    path: str | Path, trt_version: str | dict = DEFAULT_VERSION, **kwargs
) -> list[Finding]:
    """:func:`check_model` on a file (external data is read only for the constants it needs)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return check_model(model, trt_version, base_dir=path.parent, **kwargs)


def check_artifacts(
    folder: str | Path, trt_version: str = DEFAULT_VERSION, precisions: list[str] | None = None
) -> TrtReport:
    """Check every stage variant of an export (manifest loaded and hash-verified)."""
    from runtime.manifest import Manifest

    table = load_table(trt_version)
    manifest = Manifest.load(folder)
    wanted = [p for p in precisions or [] if p]
    report = TrtReport(table=table)
    for stage, entry in manifest.stages.items():
        if "tensorrt" not in entry.get("backends", ["tensorrt"]):
            report.skipped.append(stage)
            continue
        for precision in entry["variants"]:
            if wanted and precision not in wanted:
                continue
            report.graphs.append((stage, precision))
            report.extend(
                check_onnx_file(
                    manifest.stage_path(stage, precision),
                    table,
                    stage=stage,
                    precision=precision,
                    axes=entry.get("axes", {}),
                    inputs=entry.get("inputs"),
                )
            )
    if not report.graphs:
        have = sorted({p for e in manifest.stages.values() for p in e["variants"]})
        raise TrtCheckError(
            f"no graph in {folder} has precision {', '.join(wanted)} (it has {', '.join(have)}); "
            "pick from those with --precision"
        )
    return report
