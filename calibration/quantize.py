"""Explicit Q/DQ INT8 for the vision stages, and weight-only INT8/INT4 for the decoder.

Vision (``quantize_static``, ``QuantFormat.QDQ``), laid out for TensorRT's explicit quantization:
symmetric int8 activations and weights (every zero point is an int8 0), per-channel weight scales on
the output-channel axis (Conv: 0; MatMul weights are ``[in, out]``: 1), bias left in float. Only
Conv / MatMul / Gemm inputs are quantized (the precision policy): LayerNorm, Softmax, GELU, the
residual adds and every other op stay fp32, and ``restore_float_consumers`` makes sure no fp32 op
reads a dequantized tensor (onnxruntime would otherwise route every consumer of a quantized tensor
through the same Q/DQ pair).

Sensitivity pass: when a stage misses its gate (cosine vs fp32 on the held-out set), each candidate
node's damage *when quantized alone* is measured, the worst are kept in fp32, and the smallest such
exclusion set that meets the gate is searched for (capped by ``max_excluded``). All trials run in one
onnxruntime session of a "switchable" graph (``GateSim``): the fully quantized graph with a bool
input per candidate choosing its dequantized or its float inputs, so a trial costs one forward
pass, not a re-quantization and a new session. Calibration ranges are computed once per stage
(quantize_static's calibration cache) and reused by every quantize_static call.

Decoder: ``MatMulNBitsQuantizer`` (block-wise, symmetric) turns every constant-weight MatMul,
the LM head included, into a ``MatMulNBits`` with 4- or 8-bit weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from calibration.dataset import ActivationStore, CalibrationError

QUANT_OPS = ("Conv", "MatMul", "Gemm")
METHODS = ("minmax", "entropy", "percentile")
PERCENTILE = 99.999
EXTERNAL_DATA_BYTES = 1_800_000_000  # graphs this big are written with an external .data file
GATE_PREFIX = "fila_gate."


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


# --- metrics ----------------------------------------------------------------------------------
@dataclass
class Metrics:
    cosine: float
    sqnr_db: float
    rel_l2: float
    min_image_cosine: float = 1.0
    images: int = 0

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class MetricAccumulator:
    """Cosine, SQNR and relative L2 of outputs against fp32 references, pooled over images; the
    worst output of a multi-output stage (ConvNeXt's four maps) is what is reported."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}  # name -> [ref.ref, got.got, ref.got, diff.diff]
        self.image_cosines: list[float] = []

    def add(self, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
        worst = 1.0
        for name, a in ref.items():
            a64 = a.astype(np.float64).ravel()
            b64 = np.asarray(got[name], dtype=np.float64).ravel()
            if a64.shape != b64.shape:
                raise CalibrationError(
                    f"output {name}: shape {got[name].shape}, expected {a.shape}"
                )
            d = a64 - b64
            s = np.array([a64 @ a64, b64 @ b64, a64 @ b64, d @ d])
            self.sums[name] = self.sums.get(name, 0) + s
            worst = min(worst, _cosine(*s[:3]))
        self.image_cosines.append(worst)

    def result(self) -> Metrics:
        if not self.sums:
            raise CalibrationError("no held-out images to measure accuracy on")
        cos, sqnr, rel = 1.0, float("inf"), 0.0
        for aa, bb, ab, dd in self.sums.values():
            cos = min(cos, _cosine(aa, bb, ab))
            sqnr = min(sqnr, float(10 * np.log10(aa / dd)) if dd > 0 else float("inf"))
            rel = max(rel, float(np.sqrt(dd / aa)) if aa > 0 else float(np.sqrt(dd)))
        sqnr = min(sqnr, 999.0)  # JSON has no infinity; identical outputs read as 999 dB
        return Metrics(cos, sqnr, rel, min(self.image_cosines), len(self.image_cosines))


def _cosine(aa: float, bb: float, ab: float) -> float:
    if aa > 0 and bb > 0:
        return float(ab / np.sqrt(aa * bb))
    return float(aa == bb)


# --- onnxruntime helpers -----------------------------------------------------------------------
def session(model, threads: int | None = None):
    """An onnxruntime CPU session for a path or a ModelProto."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def evaluate(
    sess,
    store: ActivationStore,
    stage: str,
    part: str = "eval",
    limit: int | None = None,
    extra_feeds: dict | None = None,
) -> Metrics:
    """Accuracy of a session's outputs against the stored fp32 outputs of ``stage``."""
    names = [o.name for o in sess.get_outputs()]
    acc = MetricAccumulator()
    for inputs, ref in store.pairs(part, stage, limit):
        values = sess.run(names, {**inputs, **(extra_feeds or {})})
        got = dict(zip(names, values, strict=True))
        acc.add(ref, {k: got[k] for k in ref})
    return acc.result()


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


# --- QDQ quantization ---------------------------------------------------------------------------
def qdq_options(method: str, percentile: float = PERCENTILE) -> dict:
    """extra_options for quantize_static: TensorRT-style symmetric int8 Q/DQ."""
    opts = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,  # bias stays float: TensorRT fuses it, int32 bias Q/DQ is not needed
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # [in, out] weights: output channels
        # one image per collection step: histogram methods otherwise hold every intermediate
        # tensor of every calibration image in memory (onnxruntime's CalibMaxIntermediateOutputs
        # drops data instead of merging it, so it is not used)
        "CalibStridedMinMax": 1,
        "CalibTensorRangeSymmetric": True,
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
):
    """Q/DQ int8 graph of ``model`` (fp32 ModelProto) written to ``out``; returns the ModelProto.

    Ranges come from ``cache`` when it exists (written by the first call for the stage)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    big = model.ByteSize() > EXTERNAL_DATA_BYTES
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
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            use_external_data_format=big,
            calibrate_method=calibration_method(method),
            extra_options=qdq_options(method, percentile),
            calibration_cache_path=cache,
        )
    qmodel = onnx.load(str(tmp), load_external_data=True)
    restore_float_consumers(qmodel, set(exclude))
    save_model(qmodel, out)
    for p in (tmp, tmp.with_name(tmp.name + ".data")):
        p.unlink(missing_ok=True)
    return qmodel


def save_model(model, path: Path) -> list[Path]:
    """Save one file, or ``<name>.data`` beside it when the graph is too big for one protobuf."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
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


def restore_float_consumers(model, excluded: set[str] = frozenset()) -> int:
    """Make ops outside the policy read the float tensor, not its dequantized copy.

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
            if node.op_type in keep_ops and node.name not in excluded:
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


# --- the switchable graph used by the sensitivity pass -------------------------------------------
class GateSim:
    """The fully quantized graph with one bool input per candidate node: True feeds the node its
    dequantized inputs, False its float ones. One session serves every sensitivity trial."""

    def __init__(self, fp32_model, qmodel, threads: int | None = None) -> None:
        import onnx
        from onnx import TensorProto, helper

        model = onnx.ModelProto()
        model.CopyFrom(qmodel)
        graph = model.graph
        fp32_nodes = {n.name: n for n in fp32_model.graph.node}
        fp32_inits = {i.name: i for i in fp32_model.graph.initializer}
        have = {i.name for i in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        self.nodes = sorted(quantized_nodes(model), key=[n.name for n in graph.node].index)
        self.gates = {}
        new_nodes = []
        for k, name in enumerate(self.nodes):
            gate = f"{GATE_PREFIX}{k}"
            self.gates[name] = gate
            graph.input.append(helper.make_tensor_value_info(gate, TensorProto.BOOL, []))
            node = next(n for n in graph.node if n.name == name)
            for i, inp in enumerate(node.input):
                dq = producer.get(inp)
                if dq is None or dq.op_type != "DequantizeLinear":
                    continue
                float_name = fp32_nodes[name].input[i]
                if float_name in fp32_inits and float_name not in have:
                    graph.initializer.append(fp32_inits[float_name])
                    have.add(float_name)
                out = f"{inp}.{gate}"
                new_nodes.append(
                    helper.make_node(
                        "Where", [gate, inp, float_name], [out], name=f"Where.{gate}.{i}"
                    )
                )
                node.input[i] = out
        # keep topological order: each Where goes right before its consumer
        order = list(graph.node)
        for w in new_nodes:
            consumer = next(n for n in order if w.output[0] in n.input)
            order.insert(order.index(consumer), w)
        del graph.node[:]
        graph.node.extend(order)
        self.session = session(model, threads)

    def feeds(self, enabled: Iterable[str]) -> dict[str, np.ndarray]:
        on = set(enabled)
        return {gate: np.array(name in on) for name, gate in self.gates.items()}

    def evaluate(
        self, store: ActivationStore, stage: str, enabled: Iterable[str], limit: int | None = None
    ) -> Metrics:
        return evaluate(self.session, store, stage, "eval", limit, self.feeds(enabled))


@dataclass
class StageQuantization:
    stage: str
    file: Path
    method: str
    excluded: list[str]
    metrics: Metrics
    gate_cosine: float
    validated: bool
    candidates: int
    quantized: int
    full_metrics: Metrics | None = None  # every candidate quantized
    sensitivity: list[tuple[str, float]] = field(default_factory=list)  # (node, damage) worst first
    trials: int = 0
    message: str = ""
    layout_problems: list[str] = field(default_factory=list)


def quantize_vision_stage(
    fp32_path: Path,
    out: Path,
    store: ActivationStore,
    stage: str,
    method: str = "minmax",
    gate_cosine: float = 0.99,
    max_excluded: int = 16,
    rank_images: int = 1,
    threads: int | None = None,
    workdir: Path | None = None,
    log=None,
) -> StageQuantization:
    """Quantize one vision stage, excluding the most damaging nodes until it meets its gate."""
    say = log or (lambda msg: None)
    workdir = Path(workdir or store.root)
    cache = workdir / f"{stage}.{method}.ranges.json"
    cache.unlink(missing_ok=True)
    model = load_named(fp32_path)
    cands = candidate_nodes(model)
    if not cands:
        raise CalibrationError(f"stage {stage} has no Conv/MatMul/Gemm node to quantize")
    qmodel = quantize_qdq(model, out, store, stage, method, [], cache)
    full = evaluate(session(out, threads), store, stage)
    say(f"{stage}: all {len(cands)} candidate node(s) int8: cosine {full.cosine:.5f}")
    result = StageQuantization(
        stage,
        out,
        method,
        [],
        full,
        gate_cosine,
        full.cosine >= gate_cosine,
        len(cands),
        len(quantized_nodes(qmodel)),
        full,
    )
    if result.validated:
        result.layout_problems = check_trt_layout(qmodel)
        return result
    if max_excluded == 0:
        result.layout_problems = check_trt_layout(qmodel)
        result.message = (
            f"stage {stage} ({method}) misses its gate: best cosine reached {full.cosine:.5f} < "
            f"{gate_cosine} with every node quantized (--max-excluded 0: no sensitivity pass); "
            "written with validated: false"
        )
        return result
    # sensitivity: damage of each node quantized alone, then the smallest worst-first prefix
    sim = GateSim(model, qmodel, threads)
    damage = []
    for name in sim.nodes:
        m = sim.evaluate(store, stage, [name], limit=rank_images)
        damage.append((name, 1.0 - m.cosine))
    damage.sort(key=lambda x: -x[1])
    ranked = [n for n, _ in damage]
    result.sensitivity = [(n, float(d)) for n, d in damage]
    result.trials = len(ranked)
    cap = min(max_excluded, len(ranked))
    tried: dict[int, Metrics] = {0: full}

    def trial(k: int) -> Metrics:
        if k not in tried:
            tried[k] = sim.evaluate(store, stage, ranked[k:])
            result.trials += 1
            say(f"{stage}: {k} node(s) in fp32 (simulated): cosine {tried[k].cosine:.5f}")
        return tried[k]

    # grow 1, 2, 4, ... up to the cap, then bisect between the last miss and the first pass
    lo, hi, k = 0, None, 1
    while k <= cap:
        if trial(k).cosine >= gate_cosine:
            hi = k
            break
        lo = k
        k = cap if k < cap and 2 * k > cap else 2 * k
        if k == lo:
            break
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if trial(mid).cosine >= gate_cosine else (mid, hi)
        chosen = hi
    else:
        chosen = max(tried, key=lambda j: (tried[j].cosine, -j))
    # the real graph for the chosen exclusions; if it misses where the simulation passed, step on
    while True:
        excluded = ranked[:chosen]
        qmodel = quantize_qdq(model, out, store, stage, method, excluded, cache)
        metrics = evaluate(session(out, threads), store, stage)
        say(f"{stage}: {chosen} node(s) in fp32: cosine {metrics.cosine:.5f}")
        if metrics.cosine >= gate_cosine or chosen >= cap:
            break
        chosen += 1
    result.excluded, result.metrics = excluded, metrics
    result.quantized = len(quantized_nodes(qmodel))
    result.validated = metrics.cosine >= gate_cosine
    result.layout_problems = check_trt_layout(qmodel)
    if not result.validated:
        best = max([metrics.cosine, *(m.cosine for m in tried.values())])
        result.message = (
            f"stage {stage} ({method}) misses its gate: best cosine reached {best:.5f} < "
            f"{gate_cosine} with up to {cap} node(s) kept in fp32 (--max-excluded {max_excluded}); "
            f"written with {len(excluded)} kept in fp32 (cosine {metrics.cosine:.5f}) and "
            "validated: false. Try --method percentile or entropy, more calibration images, or a "
            "larger --max-excluded"
        )
    return result


# --- decoder: weight-only ------------------------------------------------------------------------
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
    return save_model(qmodel, out)


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
    return save_model(model, out)


def file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)
