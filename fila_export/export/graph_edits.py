"""Edits the exporter makes to a traced graph: axis names from the stage spec, and (fp16 graphs)
normalisation and softmax kept in fp32, as strongly typed TensorRT builds need them."""

from __future__ import annotations

from runtime.onnx_io import NORM_OPS  # kept in fp32 inside fp16 graphs (one home: onnx_io)

__all__ = ["NORM_OPS", "norms_in_fp32", "rename_axes"]


def rename_axes(model, names: dict[str, list]) -> None:
    """Give each graph input/output the axis names from the stage spec."""
    for value in list(model.graph.input) + list(model.graph.output):
        shape = names.get(value.name)
        if shape is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, entry in zip(dims, shape, strict=True):
            if isinstance(entry, str):
                dim.dim_param = entry


def norms_in_fp32(model) -> int:
    """Run every fp16 normalisation and softmax in fp32: Cast its fp16 inputs up and its outputs
    back down. Returns how many nodes were changed."""
    import onnx
    from onnx import TensorProto, helper

    types = _tensor_types(onnx.shape_inference.infer_shapes(model, strict_mode=False))
    nodes, changed = [], 0
    for node in model.graph.node:
        low = node.op_type in NORM_OPS and any(
            types.get(name) == TensorProto.FLOAT16 for name in node.input if name
        )
        if not low:
            nodes.append(node)
            continue
        changed += 1
        for i, name in enumerate(node.input):
            if name and types.get(name) == TensorProto.FLOAT16:
                up = f"{name}.fp32.{node.name or changed}"
                nodes.append(helper.make_node("Cast", [name], [up], to=TensorProto.FLOAT))
                node.input[i] = up
        downs = []
        for i, name in enumerate(node.output):
            if name and types.get(name) == TensorProto.FLOAT16:
                node.output[i] = f"{name}.fp32"
                downs.append(
                    helper.make_node("Cast", [node.output[i]], [name], to=TensorProto.FLOAT16)
                )
        nodes += [node, *downs]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return changed


def _tensor_types(model) -> dict[str, int]:
    out = {t.name: t.data_type for t in model.graph.initializer}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if value.type.HasField("tensor_type"):
            out[value.name] = value.type.tensor_type.elem_type
    return out
