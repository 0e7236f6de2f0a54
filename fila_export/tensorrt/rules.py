"""The TensorRT readiness rules, applied to one indexed graph (see ``check.py`` for the list)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fila_export.export.graph_edits import NORM_OPS
from fila_export.tensorrt.graph_index import (
    GraphIndex,
    attr,
    friendly,
    output_channel_axis,
    trt_type,
)
from runtime.spec import parse_dim

_SOURCE_OPS = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"}
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_UINT8 = 2  # TensorProto.UINT8: what QuantizeLinear outputs without a zero point


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


class Checker:
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
        token = trt_type(elem)
        if token not in entry["types"]:
            where = "output" if node.op_type in _SOURCE_OPS else "input"
            self.add(
                label,
                "op-dtype",
                f"{node.op_type} {where} '{names[0]}' is {friendly(elem)}; {self.trt()} "
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
                if elem and trt_type(elem) not in io_ok:
                    self.add(
                        value.name,
                        "dtype",
                        f"graph {kind} '{value.name}' is {friendly(elem)}: {self._why(elem)}",
                    )
        for name, tensor in g.consts.items():
            self._const_dtype(name, tensor.data_type, io_ok, quantized)
        cast_types = self.ops.get("Cast", {}).get("types")
        for node in g.nodes:
            label = g.label(node)
            if node.op_type in ("Cast", "CastLike") and cast_types is not None:
                to = (
                    attr(node, "to", 0)
                    if node.op_type == "Cast"
                    else g.types.get(node.input[1] if len(node.input) > 1 else "", 0)
                )
                if to and trt_type(to) not in cast_types:
                    hint = (
                        "; quantize with QuantizeLinear instead"
                        if trt_type(to) in quantized
                        else ""
                    )
                    self.add(
                        label,
                        "dtype",
                        f"{node.op_type} to {friendly(to)}: {self.trt()} casts only to "
                        f"{', '.join(cast_types)}{hint}",
                    )
                continue
            if node.op_type == "Constant":
                continue
            for out in node.output:
                elem = g.types.get(out, 0)
                if elem and trt_type(elem) is None:
                    self.add(
                        label,
                        "dtype",
                        f"{node.op_type} produces {friendly(elem)} tensor '{out}': "
                        f"{self._why(elem)}",
                    )

    def _const_dtype(self, name: str, elem: int, io_ok: set, quantized: set) -> None:
        token = trt_type(elem)
        users = self.g.consumers.get(name, [])
        where = self.g.label(users[0][0]) if users else name
        kind = "Constant" if name in self.g.producer else "initializer"
        if token is None:
            self.add(where, "dtype", f"{kind} '{name}' is {friendly(elem)}: {self._why(elem)}")
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
            f"{kind} '{name}' is {friendly(elem)} and feeds {n.op_type}: {self.trt()} takes "
            f"{friendly(elem)} only inside Q/DQ (as DequantizeLinear input or zero point)",
        )

    def _why(self, elem: int) -> str:
        token, name = trt_type(elem), friendly(elem)
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
                try:
                    axis = parse_dim(param).axis
                except ValueError:
                    self.add(
                        name,
                        "dynamic-axis",
                        f"graph input '{name}' dim {i} is '{param}', which is neither an "
                        "axis name nor '<k>*<axis>'",
                    )
                    continue
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
                out_type = attr(node, "output_dtype", 0)
                if op == "QuantizeLinear" and trt_type(out_type or _UINT8) not in quantized:
                    self.add(
                        label,
                        "qdq",
                        f"{op} has no zero point, so it quantizes to uint8; {self.trt()} "
                        "needs signed int8: give it an int8 zero point of 0",
                    )
            else:
                elem = g.types.get(zp, 0)
                if elem and trt_type(elem) not in quantized:
                    self.add(
                        label,
                        "qdq",
                        f"{op} zero point '{zp}' is {friendly(elem)}: {self.trt()} takes "
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
        if elem and trt_type(elem) not in ("FP32", "FP16", "BF16"):
            self.add(
                label,
                "qdq",
                f"{node.op_type} scale '{scale}' is {friendly(elem)}; "
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
        axis = int(attr(node, "axis", 1))
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
            expected = output_channel_axis(user, slot, g)
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
                perm = list(attr(user, "perm", []) or range(rank)[::-1])
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
            if trt_type(elem) in low:
                kind = "LayerNorm" if "Normalization" in node.op_type else node.op_type
                self.add(
                    self.g.label(node),
                    "fp32-norm",
                    f"{kind} forced to {low[trt_type(elem)]}: {node.op_type} input "
                    f"'{node.input[0]}' is {friendly(elem)}; keep normalisation and softmax "
                    "in fp32 (NORM_OPS in runtime/onnx_io.py)",
                )
