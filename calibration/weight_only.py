"""Weight-only INT8/INT4 for the decoder.

``MatMulNBitsQuantizer`` (block-wise, symmetric) turns every constant-weight MatMul, the LM head
included, into an ONNX Runtime ``MatMulNBits`` with 4- or 8-bit weights; for TensorRT the portable
decoder gets INT4 blocks behind ``DequantizeLinear(block_size)`` (opset 21).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.dataset import CalibrationError
from calibration.qdq import quiet_logs
from runtime import onnx_io

LLM_PRECISIONS = {"w8": 8, "w4": 4}


def quantize_decoder(
    fp32_path: Path, out: Path, precision: str, block_size: int = 32, accuracy_level: int | None = 4
) -> list[Path]:
    """Block-wise symmetric weight-only quantization of every constant-weight MatMul (LM head
    included) into ``MatMulNBits``; the KV cache stays fp32. ``accuracy_level`` 4 lets the CPU
    kernels quantize activations to int8 per block for the product (2.3x fp32 decode speed for w4
    on small, where level 0 gives 1.6x and w8 at level 0 runs 7x slower than fp32); 0 or None
    keeps fp32 activations."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if precision not in LLM_PRECISIONS:
        raise CalibrationError(f"unknown LLM precision {precision!r}; use w8 or w4")
    model = onnx.load(str(fp32_path), load_external_data=True)
    with quiet_logs("onnxruntime.quantization.matmul_nbits_quantizer"):
        quant = MatMulNBitsQuantizer(
            model,
            bits=LLM_PRECISIONS[precision],
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=accuracy_level,
            op_types_to_quantize=("MatMul",),
        )
        quant.process()
    qmodel = quant.model.model
    if not any(n.op_type == "MatMulNBits" for n in qmodel.graph.node):
        raise CalibrationError(f"{fp32_path.name}: no MatMul with a constant weight to quantize")
    return onnx_io.save(qmodel, out)


QDQ_INT4_OPSET = 21  # int4 tensors and DequantizeLinear's block_size exist from opset 21


def quantize_decoder_int4_qdq(fp32_path: Path, out: Path, block_size: int = 32) -> list[Path]:
    """INT4 weight-only for TensorRT: every constant (K, N) MatMul weight becomes int4 blocks of
    ``block_size`` along K with a positive fp32 scale per block (zero point 0), read
    through ``DequantizeLinear(axis=0, block_size)`` -> MatMul: TensorRT 10's INT4 weight-only
    GEMM pattern. Scales take the weight's dtype, so an fp16 graph gives W4A16. Written here because onnxruntime's Q/DQ output keeps a signed scale per block
    (TensorRT needs scales > 0) and ModelOpt's ONNX extra pins onnx and onnxruntime-gpu versions
    this toolkit does not use."""
    import ml_dtypes
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_path), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes, done = [], 0
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.dims[0] % block_size:
            nodes.append(node)
            continue
        original = numpy_helper.to_array(weight)
        w = original.astype(np.float32)
        k, n = w.shape
        blocks = w.reshape(k // block_size, block_size, n)
        # the block's largest-magnitude value lands on -8 when negative, +7 when positive:
        # all 16 levels where the sign allows it, and the scale stays positive
        peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)[:, 0]
        scale = np.where(peak < 0, -peak / 8.0, peak / 7.0)
        scale = np.where(scale > 0, scale, 1.0).astype(original.dtype)  # DQ yields this dtype
        q = np.clip(np.rint(blocks / scale[:, None, :].astype(np.float32)), -8, 7).reshape(k, n)
        base = f"{weight.name}.int4"
        graph.initializer.append(numpy_helper.from_array(q.astype(ml_dtypes.int4), base))
        graph.initializer.append(numpy_helper.from_array(scale, f"{base}.scale"))
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [base, f"{base}.scale"],
                [f"{base}.dq"],
                name=f"{node.name}.dq",
                axis=0,
                block_size=block_size,
            )
        )
        node.input[1] = f"{base}.dq"
        nodes.append(node)
        if users.get(weight.name, 0) == 1:
            graph.initializer.remove(weight)
        done += 1
    if not done:
        raise CalibrationError(f"{fp32_path.name}: no MatMul with a constant weight to quantize")
    del graph.node[:]
    graph.node.extend(nodes)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, QDQ_INT4_OPSET)
    return onnx_io.save(model, out)
