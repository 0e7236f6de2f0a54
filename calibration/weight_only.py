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
from runtime.compare import MetricAccumulator
from runtime.variants import WEIGHT_ONLY_BITS, WEIGHT_ONLY_BLOCK

LLM_PRECISIONS = WEIGHT_ONLY_BITS


def quantize_decoder(
    fp32_path: Path,
    out: Path,
    precision: str,
    block_size: int = WEIGHT_ONLY_BLOCK,
    accuracy_level: int | None = 4,
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
    fold_weight_transposes(model)
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
INT4_QDQ_BLOCK = 32  # TensorRT 10's INT4 weight-only GEMM blocks


def quantize_decoder_int4_qdq(
    fp32_path: Path, out: Path, block_size: int = INT4_QDQ_BLOCK
) -> list[Path]:
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
    fold_weight_transposes(model)
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


def fold_weight_transposes(model) -> int:
    """Replace ``Transpose(W)`` of a 2-D initializer by W's transpose (the tied LM head reads the
    embedding this way), so every MatMul weight is a constant the quantizers can see."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    folded = 0
    for node in list(graph.node):
        weight = inits.get(node.input[0]) if node.op_type == "Transpose" else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if weight is None or len(weight.dims) != 2 or perm != [1, 0]:
            continue
        transposed = np.ascontiguousarray(numpy_helper.to_array(weight).T)
        graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
        graph.node.remove(node)
        folded += 1
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used and init.name not in {o.name for o in graph.output}:
            graph.initializer.remove(init)
    return folded


EMBED_BLOCK = WEIGHT_ONLY_BLOCK


def quantize_embedding(source: Path, out: Path, precision: str, block_size: int = EMBED_BLOCK):
    """The ``embed`` graph as ONNX Runtime's ``GatherBlockQuantized``: the table in 4- or 8-bit
    blocks of ``block_size`` along the hidden axis with an fp16 scale each (symmetric; the op's
    default zero point 8 / 128). Returns (files, the dequantized table's accuracy)."""
    from onnx import TensorProto, helper, numpy_helper

    if precision not in LLM_PRECISIONS:
        raise CalibrationError(f"unknown embedding precision {precision!r}; use w8 or w4")
    bits = LLM_PRECISIONS[precision]
    table = _embedding_table(source)
    rows, hidden = table.shape
    if hidden % block_size:
        raise CalibrationError(f"hidden size {hidden} is not a multiple of block {block_size}")
    data, scales, accuracy = [], [], MetricAccumulator()
    for start in range(0, rows, 8192):  # bounded memory: 8192 rows at a time in fp32
        w = np.asarray(table[start : start + 8192], dtype=np.float32)
        q, s, dequantized = _block_quantize(w, bits, block_size)
        data.append(q)
        scales.append(s)
        accuracy.add({"table": w}, {"table": dequantized})
    inits = [
        numpy_helper.from_array(np.concatenate(data), "table.q"),
        numpy_helper.from_array(np.concatenate(scales), "table.scales"),
    ]
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            ["table.q", "input_ids", "table.scales"],
            ["embeds.fp16"],
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=block_size,
            bits=bits,
        ),
        helper.make_node("Cast", ["embeds.fp16"], ["inputs_embeds"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        f"embed_{precision}",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [
            helper.make_tensor_value_info(
                "inputs_embeds", TensorProto.FLOAT, ["batch", "seq", hidden]
            )
        ],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = onnx_io.make_model(graph, opsets)
    return onnx_io.save(model, out), accuracy.result()


def _embedding_table(source: Path) -> np.ndarray:
    """The table of an ``embed`` graph (its one Gather's data), memory-mapped when external."""
    from onnx import helper, numpy_helper

    model = onnx_io.load(source, external_data=False)
    gather = next((n for n in model.graph.node if n.op_type == "Gather"), None)
    init = next((i for i in model.graph.initializer if gather and i.name == gather.input[0]), None)
    if init is None:
        raise CalibrationError(f"{source.name}: no Gather over a constant table to quantize")
    where = {e.key: e.value for e in init.external_data}
    if "location" not in where:
        return numpy_helper.to_array(init)
    return np.memmap(
        Path(source).parent / where["location"],
        dtype=helper.tensor_dtype_to_np_dtype(init.data_type),
        mode="r",
        offset=int(where.get("offset", 0)),
        shape=tuple(init.dims),
    )


def _block_quantize(w: np.ndarray, bits: int, block: int):
    """Rows of ``w`` in symmetric blocks: (unsigned codes, packed two per byte for 4 bits;
    fp16 scales; the rows as they dequantize)."""
    rows, hidden = w.shape
    blocks = w.reshape(rows, hidden // block, block)
    top = 2 ** (bits - 1) - 1  # 7 or 127; the zero point is top + 1
    scale = (np.abs(blocks).max(axis=-1) / top).astype(np.float16)
    safe = np.where(scale > 0, scale, np.float16(1)).astype(np.float32)
    codes = np.clip(np.rint(blocks / safe[..., None]), -top - 1, top)
    dequantized = (codes * safe[..., None]).reshape(rows, hidden)
    codes = (codes + top + 1).astype(np.uint8).reshape(rows, hidden)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, scale, dequantized
