"""ONNX file helpers: save (external data past 2 GB), check, rename axes, slim, fp16."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TWO_GB = 2**31 - 1


def load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save(model, path: Path) -> list[Path]:
    """Save one file, or ``<name>.data`` beside it when the graph is over 2 GB. Returns the files."""
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    big = model.ByteSize() > TWO_GB if _no_external(model) else True
    if big:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        return [path, data]
    onnx.save(model, str(path))
    return [path]


def _no_external(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return not any(uses_external_data(t) for t in model.graph.initializer)


def check(path: Path) -> None:
    """onnx.checker on the file (path form, so external data is allowed) + shape inference."""
    import onnx

    onnx.checker.check_model(str(path), full_check=False)
    onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred")
    Path(str(path) + ".inferred").unlink()


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


def run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a64)
    return float(np.linalg.norm(a64 - b64) / denom) if denom > 0 else float(np.linalg.norm(b64))


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


def to_fp16(model):
    """Strongly typed fp16 graph: explicit casts, fp16 matmuls/convs, fp32 where precision matters;
    inputs and outputs keep their fp32 types. TensorRT 10 and 11 build it without precision flags."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
