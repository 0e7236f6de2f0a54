"""Edits the exporter makes to a traced graph: axis names from the stage spec, and the strongly
typed fp16 variant."""

from __future__ import annotations

# Ops kept in fp32 in the fp16 graph: normalisations (LayerNorm, and RMSNorm's decomposition),
# Softmax, and every Add (residual and bias accumulations).
FP32_OPS = [
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Add",
    "Sub",
    "Exp",
    "Erf",
    "Range",
    "CumSum",
    "Cos",
    "Sin",
]


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


def to_fp16(model):
    """Strongly typed fp16 graph: explicit casts, fp16 matmuls/convs, fp32 where precision matters;
    inputs and outputs keep their fp32 types. TensorRT 10 and 11 build it without precision flags."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
