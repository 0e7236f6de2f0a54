"""Explicit Q/DQ INT8 for the vision stages, in one of two layouts.

``tensorrt`` (every int8 variant): ``quantize_static`` (``QuantFormat.QDQ``) with symmetric int8
activations and weights (every zero point is an int8 0), per-channel weight scales on the
output-channel axis (Conv: 0; MatMul weights are ``[in, out]``: 1), bias left in float. Only
Conv / MatMul / Gemm inputs are quantized (the precision policy): LayerNorm, Softmax, GELU, the
residual adds and every other op stay float, and ``restore_float_consumers`` makes sure no float
op reads a dequantized tensor (onnxruntime would otherwise route every consumer of a quantized
tensor through the same Q/DQ pair). Calibration and the sensitivity pass run on the fp32 graph;
the ``int8`` variant TensorRT builds is that graph in fp16 compute (``fp16_compute``), and the
fp32 one is kept as ONNX Runtime's ``int8-cpu`` for stages without convolutions (its CPU
provider runs those MatMuls as int8, ``MatMulIntegerToFloat``, where fp16 would be cast back).
It has no int8 convolution for that layout (it dequantizes the weights and convolves in fp32:
the ``small`` ConvNeXt 1.2x slower than fp32), hence the ``cpu`` layout.

``cpu`` (``int8-cpu`` variants, ONNX Runtime only, made for stages with convolutions): unsigned
int8 activations with zero points and Q/DQ on the outputs too, the form onnxruntime fuses into
``QLinearConv`` with its u8 x s8 kernels (VNNI on x86; the ``small`` ConvNeXt 2x faster than
fp32). Its weights use 7 of the 8 bits (``reduce_range``): without VNNI (AVX2 only, as on this
CI's AMD EPYC) those kernels add pairs of u8 x s8 products in int16 and saturate with full-range
weights (the ``tiny`` ConvNeXt at cosine 0.78 fully quantized; 0.9992 with 7-bit weights), and a
variant must stay right on whichever x86 CPU runs it. Calibration ranges are computed once per
stage and layout (quantize_static's calibration cache) and reused by every call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from calibration.dataset import ActivationStore, CalibrationError
from runtime import onnx_io

QUANT_OPS = ("Conv", "MatMul", "Gemm")
LAYOUTS = ("tensorrt", "cpu")
METHODS = ("minmax", "entropy", "percentile")
PERCENTILE = 99.999


@contextlib.contextmanager
def quiet_logs(*names: str):
    """onnxruntime's quantizers log INFO/WARNING lines per node; keep them to errors meanwhile."""
    loggers = [logging.getLogger(n) for n in ("", *names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class StoreReader:
    """``CalibrationDataReader`` over the stored inputs of one stage (calibration images)."""

    def __init__(self, store: ActivationStore, stage: str, part: str = "calib") -> None:
        self.store, self.stage, self.part = store, stage, part
        self.rewind()

    def rewind(self) -> None:
        self.set_range(0, len(self))

    def set_range(self, start_index: int, end_index: int) -> None:
        """Read images ``start_index`` to ``end_index`` (onnxruntime's strided calibration)."""
        self._it = (
            self.store.get(self.part, i, self.stage)[0]
            for i in range(start_index, min(end_index, len(self)))
        )

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def __len__(self) -> int:
        return self.store.counts.get(self.part, 0)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def qdq_options(method: str, percentile: float = PERCENTILE, layout: str = "tensorrt") -> dict:
    """extra_options for quantize_static: symmetric int8 Q/DQ for TensorRT, asymmetric (zero
    points) activations for ONNX Runtime's CPU kernels."""
    symmetric = layout == "tensorrt"
    opts = {
        "ActivationSymmetric": symmetric,
        "WeightSymmetric": True,
        # TensorRT fuses a float bias; onnxruntime's QLinearConv needs it int32
        "QuantizeBias": not symmetric,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # [in, out] weights: output channels
        # one image per collection step: histogram methods otherwise hold every intermediate
        # tensor of every calibration image in memory (onnxruntime's CalibMaxIntermediateOutputs
        # drops data instead of merging it, so it is not used)
        "CalibStridedMinMax": 1,
        "CalibTensorRangeSymmetric": symmetric,
    }
    if method == "percentile":
        opts["CalibPercentile"] = percentile
    return opts


def calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in table:
        raise CalibrationError(f"unknown calibration method {method!r}; use {', '.join(METHODS)}")
    return table[method]


def load_named(path: Path):
    """The fp32 graph with every node named (exclusion lists name nodes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def has_conv(path: Path) -> bool:
    """Whether a graph convolves (read without its weights)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type == "Conv" for n in graph.node)


def candidate_nodes(model) -> list[str]:
    """Nodes the precision policy quantizes: Conv / MatMul / Gemm with float inputs."""
    return [n.name for n in model.graph.node if n.op_type in QUANT_OPS]


def quantize_qdq(
    model,
    out: Path,
    store: ActivationStore,
    stage: str,
    method: str,
    exclude: Sequence[str],
    cache: Path,
    percentile: float = PERCENTILE,
    layout: str = "tensorrt",
):
    """Q/DQ int8 graph of ``model`` (fp32 ModelProto) in ``layout`` written to ``out``; returns
    the ModelProto. Ranges come from ``cache`` when it exists (written by the first call for the
    stage and layout)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if layout not in LAYOUTS:
        raise CalibrationError(f"unknown int8 layout {layout!r}; use {', '.join(LAYOUTS)}")
    big = model.ByteSize() > onnx_io.EXTERNAL_DATA_ABOVE
    work = onnx.ModelProto()
    work.CopyFrom(model)  # quantize_static saves its input with external data, which edits it
    tmp = out.with_name(out.name + ".partial")
    with quiet_logs():  # quantize_static logs a pre-processing hint through the root logger
        quantize_static(
            work,
            tmp,
            StoreReader(store, stage),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANT_OPS),
            per_channel=True,
            reduce_range=layout != "tensorrt",  # 7-bit weights: int16 saturation (docstring)
            activation_type=QuantType.QInt8 if layout == "tensorrt" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            use_external_data_format=big,
            calibrate_method=calibration_method(method),
            extra_options=qdq_options(method, percentile, layout),
            calibration_cache_path=cache,
        )
    qmodel = onnx.load(str(tmp), load_external_data=True)
    # TensorRT layout: only Conv/MatMul/Gemm read dequantized tensors. CPU layout: ops around
    # the quantized ones may (its Q/DQ on outputs fuse into QLinearConv), but an excluded node
    # reads float, as the sensitivity pass measured it (a quantized neighbour's output Q/DQ
    # would otherwise still feed it)
    restore_float_consumers(qmodel, set(exclude), only_excluded=layout != "tensorrt")
    onnx_io.save(qmodel, out)
    for p in (tmp, tmp.with_name(tmp.name + ".data")):
        p.unlink(missing_ok=True)
    return qmodel


def fp16_compute(model, out: Path) -> None:
    """Write the TensorRT layout's graph (a ModelProto, converted in place) with what it computes
    in float made fp16, as an fp16 export's graphs are: Q/DQ scales and the ops between the
    quantized ones in fp16, normalisation and softmax in fp32 (``runtime.onnx_io.NORM_OPS``),
    inputs and outputs fp32 (the stage's interface). A strongly typed TensorRT build then runs
    every layer left unquantized in fp16; from the fp32 graph it would run them in true fp32
    (TF32 off), slower than the fp16 engine the int8 one is meant to beat."""
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *onnx_io.NORM_OPS]
    )
    del model.graph.value_info[:]  # the converter leaves some with their fp32 type: re-inferred
    ONNXModel(model).topological_sort()  # it appends the input casts last; ONNX wants order
    onnx_io.save(model, out)


def restore_float_consumers(
    model, excluded: set[str] = frozenset(), only_excluded: bool = False
) -> int:
    """Make ops outside the policy (``only_excluded``: the excluded nodes alone) read the float
    tensor, not its dequantized copy.

    onnxruntime inserts one Q/DQ pair per quantized tensor and routes *every* consumer through it,
    so a residual Add or a LayerNorm that shares an input with a MatMul would compute on int8
    values. Returns the number of inputs rewired; Q/DQ pairs left without consumers are removed.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    keep_ops = set(QUANT_OPS)
    rewired = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight: its DequantizeLinear reads an initializer
        src = q.input[0]
        if dq.output[0] in outputs:  # onnxruntime renamed the producer's output to quantize it
            original = dq.output[0]
            src_node = producer.get(src)
            if src_node is None:
                continue
            new_dq_out = original + "_DequantizeLinear_Output"
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == original and node is not dq:
                        node.input[i] = new_dq_out
            dq.output[0] = new_dq_out
            for i, name in enumerate(src_node.output):
                if name == src:
                    src_node.output[i] = original
            q.input[0] = original
            src = original
        for node in graph.node:
            if node is dq or node is q:
                continue
            reads_float = node.name in excluded or (
                not only_excluded and node.op_type not in keep_ops
            )
            if not reads_float:
                continue
            for i, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[i] = src
                    rewired += 1
    _drop_dead_qdq(model)
    return rewired


def _drop_dead_qdq(model) -> None:
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(o in used for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in list(graph.initializer):
        if init.name not in used and init.name not in {o.name for o in graph.output}:
            graph.initializer.remove(init)


def quantized_nodes(qmodel) -> set[str]:
    """Nodes of a Q/DQ graph that read at least one dequantized input."""
    dq_out = {n.output[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name
        for n in qmodel.graph.node
        if n.op_type in QUANT_OPS and any(i in dq_out for i in n.input)
    }


def qdq_parameters(qmodel) -> dict[str, np.ndarray]:
    """Every scale and zero point of a Q/DQ graph, by initializer name (for reproducibility)."""
    from onnx import numpy_helper

    names = set()
    for n in qmodel.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            names.update(n.input[1:])
    return {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer if i.name in names}


def check_trt_layout(qmodel) -> list[str]:
    """Problems TensorRT's explicit quantization would have: non-int8 or non-zero zero points,
    per-channel weight scales on an axis other than the output channels."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in qmodel.graph.initializer}
    consumers: dict[str, list] = {}
    for n in qmodel.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems = []
    for n in qmodel.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) < 3 or n.input[2] not in inits:
            problems.append(f"{n.name}: no zero point (defaults to uint8)")
            continue
        zp = inits[n.input[2]]
        if zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp) != 0):
            problems.append(f"{n.name}: zero point is not int8 0")
        scale = numpy_helper.to_array(inits[n.input[1]]) if n.input[1] in inits else None
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and scale is not None:
            if scale.size > 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                for user in consumers.get(n.output[0], []):
                    want = 0 if user.op_type == "Conv" else 1
                    if user.op_type == "Gemm":
                        trans_b = next((a.i for a in user.attribute if a.name == "transB"), 0)
                        want = 0 if trans_b else 1
                    if axis != want:
                        problems.append(
                            f"{n.name}: per-channel axis {axis}, {user.op_type} needs {want}"
                        )
    return problems
