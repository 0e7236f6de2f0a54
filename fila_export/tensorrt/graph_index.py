"""An index of one ONNX graph for the TensorRT readiness rules: types, shapes, constants,
producers and consumers of every tensor (subgraphs flattened), and the type names TensorRT uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def type_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def trt_type(elem_type: int) -> str | None:
    return _TYPES.get(type_name(elem_type), (None, ""))[0]


def friendly(elem_type: int) -> str:
    name = type_name(elem_type)
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


def attr(node, name: str, default=None):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def output_channel_axis(user, slot: int, g: GraphIndex) -> int | None:
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
        return 0 if attr(user, "transB", 0) else 1
    return None
