"""The sensitivity pass of INT8 vision calibration: when a stage misses its gate (cosine vs fp32
on the held-out set), each candidate node's damage *when quantized alone* is measured, the worst
are kept in fp32, and the smallest such exclusion set that meets the gate is searched for (capped
by ``max_excluded``). All trials run in one onnxruntime session of a "switchable" graph
(``GateSim``): the fully quantized graph with a bool input per candidate choosing its dequantized
or its float inputs, so a trial costs one forward pass, not a re-quantization and a new session.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.dataset import ActivationStore, CalibrationError
from calibration.qdq import (
    candidate_nodes,
    check_trt_layout,
    load_named,
    quantize_qdq,
    quantized_nodes,
)
from runtime import onnx_io
from runtime.compare import MetricAccumulator, Metrics

GATE_PREFIX = "fila_gate."


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


FLOAT_ALIAS = ".fila_float"


def float_input(name: str, fp32_inits: dict, producer: dict) -> str:
    """The name a gate's float path reads for the fp32 tensor ``name``: the tensor itself, or,
    for a weight whose dequantized copy took its name in the quantized graph (an int32 bias in
    the ``cpu`` layout), an alias of the fp32 initializer (one name may be defined only once)."""
    return f"{name}{FLOAT_ALIAS}" if name in fp32_inits and name in producer else name


def float_initializer(name: str, fp32_inits: dict):
    """The fp32 initializer for ``float_input``'s name (a renamed copy for an alias), or None
    when the float input is an activation."""
    if name in fp32_inits:
        return fp32_inits[name]
    source = fp32_inits.get(name.removesuffix(FLOAT_ALIAS)) if name.endswith(FLOAT_ALIAS) else None
    if source is None:
        return None
    import onnx

    tensor = onnx.TensorProto()
    tensor.CopyFrom(source)
    tensor.name = name
    return tensor


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
                float_name = float_input(fp32_nodes[name].input[i], fp32_inits, producer)
                tensor = float_initializer(float_name, fp32_inits)
                if tensor is not None and float_name not in have:
                    graph.initializer.append(tensor)
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
        self.session = onnx_io.session(model, threads)

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
    layout: str = "tensorrt"  # calibration.qdq.LAYOUTS


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
    layout: str = "tensorrt",
) -> StageQuantization:
    """Quantize one vision stage in ``layout`` (``calibration.qdq``), excluding the most damaging
    nodes until it meets its gate."""
    say = log or (lambda msg: None)
    cache = Path(workdir or store.root) / f"{stage}.{method}.{layout}.ranges.json"
    cache.unlink(missing_ok=True)
    model = load_named(fp32_path)
    cands = candidate_nodes(model)
    if not cands:
        raise CalibrationError(f"stage {stage} has no Conv/MatMul/Gemm node to quantize")
    qmodel = quantize_qdq(model, out, store, stage, method, [], cache, layout=layout)
    full = evaluate(onnx_io.session(out, threads), store, stage)
    label = stage if layout == "tensorrt" else f"{stage} ({layout} layout)"
    say(f"{label}: all {len(cands)} candidate node(s) int8: cosine {full.cosine:.5f}")
    nodes = len(quantized_nodes(qmodel))
    passed = full.cosine >= gate_cosine
    result = StageQuantization(
        stage, out, method, [], full, gate_cosine, passed, len(cands), nodes, full, layout=layout
    )
    if passed or max_excluded == 0:
        result.layout_problems = layout_problems(qmodel, layout)
        if not passed:
            result.message = (
                f"stage {stage} ({method}) misses its gate: best cosine reached {full.cosine:.5f} "
                f"< {gate_cosine} with every node quantized (--max-excluded 0: no sensitivity "
                "pass); written with validated: false"
            )
        return result
    search = ExclusionSearch(GateSim(model, qmodel, threads), store, stage, gate_cosine, say)
    result.sensitivity = search.rank(rank_images)
    cap = min(max_excluded, len(search.ranked))
    chosen = search.smallest_passing(cap, full)
    # the real graph for the chosen exclusions; if it misses where the simulation passed, step on
    while True:
        excluded = search.ranked[:chosen]
        qmodel = quantize_qdq(model, out, store, stage, method, excluded, cache, layout=layout)
        metrics = evaluate(onnx_io.session(out, threads), store, stage)
        say(f"{label}: {chosen} node(s) in fp32: cosine {metrics.cosine:.5f}")
        if metrics.cosine >= gate_cosine or chosen >= cap:
            break
        chosen += 1
    result.excluded, result.metrics, result.trials = excluded, metrics, search.trials
    result.quantized = len(quantized_nodes(qmodel))
    result.validated = metrics.cosine >= gate_cosine
    result.layout_problems = layout_problems(qmodel, layout)
    if not result.validated:
        best = max([metrics.cosine, *(m.cosine for m in search.tried.values())])
        result.message = (
            f"stage {stage} ({method}) misses its gate: best cosine reached {best:.5f} < "
            f"{gate_cosine} with up to {cap} node(s) kept in fp32 (--max-excluded {max_excluded}); "
            f"written with {len(excluded)} kept in fp32 (cosine {metrics.cosine:.5f}) and "
            "validated: false. Try --method percentile or entropy, more calibration images, or a "
            "larger --max-excluded"
        )
    return result


def layout_problems(qmodel, layout: str) -> list[str]:
    """What TensorRT would refuse in a graph meant for it (the ``cpu`` layout is not)."""
    return check_trt_layout(qmodel) if layout == "tensorrt" else []


class ExclusionSearch:
    """Which nodes to keep in fp32, simulated on a ``GateSim``: rank every node by the damage it
    does quantized alone, then find the shortest worst-first prefix that meets the gate."""

    def __init__(self, sim: GateSim, store: ActivationStore, stage: str, gate: float, say) -> None:
        self.sim, self.store, self.stage, self.gate, self.say = sim, store, stage, gate, say
        self.ranked: list[str] = []
        self.tried: dict[int, Metrics] = {}
        self.trials = 0

    def rank(self, images: int) -> list[tuple[str, float]]:
        """(node, 1 - cosine when only it is quantized), worst first."""
        damage = []
        for name in self.sim.nodes:
            m = self.sim.evaluate(self.store, self.stage, [name], limit=images)
            damage.append((name, float(1.0 - m.cosine)))
        damage.sort(key=lambda x: -x[1])
        self.ranked = [n for n, _ in damage]
        self.trials = len(self.ranked)
        return damage

    def trial(self, k: int) -> Metrics:
        """Accuracy with the ``k`` worst nodes in fp32 (simulated, cached)."""
        if k not in self.tried:
            self.tried[k] = self.sim.evaluate(self.store, self.stage, self.ranked[k:])
            self.trials += 1
            self.say(
                f"{self.stage}: {k} node(s) in fp32 (simulated): cosine {self.tried[k].cosine:.5f}"
            )
        return self.tried[k]

    def smallest_passing(self, cap: int, full: Metrics) -> int:
        """Grow 1, 2, 4, ... up to ``cap``, then bisect between the last miss and the first pass;
        the best tried when nothing passes."""
        self.tried[0] = full
        lo, hi, k = 0, None, 1
        while k <= cap:
            if self.trial(k).cosine >= self.gate:
                hi = k
                break
            lo = k
            k = cap if k < cap and 2 * k > cap else 2 * k
            if k == lo:
                break
        if hi is None:
            return max(self.tried, key=lambda j: (self.tried[j].cosine, -j))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.trial(mid).cosine >= self.gate else (mid, hi)
        return hi
