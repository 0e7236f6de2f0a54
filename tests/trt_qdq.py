"""A Q/DQ variant of a stage made by hand (no calibration): the stage's fp16 graph with its first
input quantized to int8 and dequantized again, for tests of how builds treat explicitly quantized
graphs."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from runtime.manifest import Manifest, file_entry


def add_qdq_variant(art: Path, stage: str, base: str = "fp16", name: str = "int8") -> Path:
    """Write ``<stage>.<name>.onnx`` (the ``base`` graph behind a Q/DQ pair on its first input)
    into the export and record it in the manifest; returns the graph's path."""
    manifest = Manifest.load(art)
    source = manifest.stage_path(stage, base)
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    first = graph.input[0].name
    dtype = TensorProto.FLOAT16 if base == "fp16" else TensorProto.FLOAT
    scale = helper.make_tensor("qdq.scale", dtype, [], [0.05])
    zero = helper.make_tensor("qdq.zero", TensorProto.INT8, [], [0])
    graph.initializer.extend([scale, zero])
    cast = [] if base != "fp16" else [helper.make_node("Cast", [first], ["qdq.x16"], to=dtype)]
    x = "qdq.x16" if cast else first
    q = helper.make_node("QuantizeLinear", [x, "qdq.scale", "qdq.zero"], ["qdq.q"])
    dq = helper.make_node("DequantizeLinear", ["qdq.q", "qdq.scale", "qdq.zero"], ["qdq.dq"])
    back = [helper.make_node("Cast", ["qdq.dq"], ["qdq.x"], to=TensorProto.FLOAT)] if cast else []
    out = "qdq.x" if cast else "qdq.dq"
    for node in graph.node:
        node.input[:] = [out if i == first else i for i in node.input]
    nodes = [*cast, q, dq, *back, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    path = art / f"{stage}.{name}.onnx"
    onnx.save(model, str(path))
    entry = file_entry(art, path, precision="int8")
    variant = manifest.variant(stage, base)
    if "external_data" in variant:
        entry["external_data"] = variant["external_data"]
    manifest.stages[stage]["variants"][name] = entry
    manifest.save()
    return path
