"""``fila plan``: the memory an export will need on a machine, before anything runs.

The terms: the runtime process itself, the weights of each stage variant the pipeline loads (as
the backend holds them: ONNX Runtime's CPU provider keeps an fp16 decoder's weights as fp32
copies and opens fp16 vision per image),
the KV cache at the context, the activation peaks of vision (at the largest anyres grid) and of
prefill (at the context), and what the board's OS keeps for itself. Each estimate is a formula
over the model's shapes with constants fitted to peaks measured here (``benchmarks/README.md``,
"Memory plan"), so a verdict says what to change (precision, context, tiles) to fit.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

from runtime import onnx_io
from runtime.backends import fp16_on_cpu
from runtime.errors import FilaError
from runtime.generate import DecoderShape
from runtime.manifest import Manifest
from runtime.variants import (
    WEIGHT_ONLY_BITS,
    WEIGHT_ONLY_BLOCK,
    choose_decoder,
    group_of,
    precision_spec,
    stage_variant,
    vision_mode,
)

GB = 1e9
MB = 1e6


@dataclass(frozen=True)
class Board:
    """A Jetson module: memory the kernel sees (LPDDR5 minus firmware carveouts) and what JetPack
    6's Ubuntu desktop keeps at idle (RAM in ``tegrastats``), from which the model must fit."""

    name: str
    visible_gb: float
    os_gb: float


# Idle use: a JetPack 6 Orin desktop at idle shows about 2.8 GB in tegrastats (``RAM 2847/7772MB``,
# proventusnova.com/blog/jetson-orin-high-ram-usage-idle); a headless board (multi-user target)
# keeps roughly 1 GB less. Visible memory: the module's LPDDR5 less the carveouts (about 0.4 GB).
BOARDS = {
    "orin-nano-8gb": Board("Jetson Orin Nano 8 GB", 7.6, 2.8),
    "orin-nx-16gb": Board("Jetson Orin NX 16 GB", 15.4, 2.8),
    "agx-orin-32gb": Board("Jetson AGX Orin 32 GB", 30.6, 2.8),
    "agx-orin-64gb": Board("Jetson AGX Orin 64 GB", 62.8, 2.8),
}
# Fitted on this machine's ONNX Runtime CPU runs (tiny, small, edge; fp32 and w4): see
# ``benchmarks/README.md`` ("Memory plan") for the figures and the command.
RUNTIME_BYTES = 95 * MB  # python, numpy, Pillow, onnxruntime, tokenizers and session overheads
CUDA_CONTEXT_BYTES = 400 * MB  # a CUDA context and TensorRT's runtime on a Jetson (estimate)
# Resident bytes per byte of graph weights on ONNX Runtime's CPU provider, measured per session
# (``edge`` and ``small``): an fp16 decoder keeps its fp16 data and the fp32 copies its kernels
# run on (2.1x); fp16 vision is opened per image instead (``runtime.backends.fp16_on_cpu``: none
# held between images, a stage's memory-mapped fp16 while it runs); MatMulNBits is prepacked into
# MLAS's int8-activation layout (w4 1.65x of its memory-mapped file, w8 1.35x; "quantized": any
# other decoder variant, not measured: ~2x); fp32 vision convolutions are prepacked too (1.6x); a full-precision
# embedding table stays memory-mapped and only the gathered rows are read (~0); a block-quantized
# one is loaded.
ORT_CPU_HELD = {
    ("vision", "fp32"): 1.6,
    ("vision", "quantized"): 1.6,
    ("decoder", "fp16"): 2.1,
    ("decoder", "fp32"): 1.0,
    ("decoder", "w4"): 1.65,  # prepacked MatMulNBits (int8-activation layout) over the mapped file
    ("decoder", "w8"): 1.35,
    ("decoder", "quantized"): 2.0,
    ("embed", "fp16"): 0.1,
    ("embed", "fp32"): 0.1,
    ("embed", "quantized"): 1.3,
}
# Live activations over the formula's largest tensors, fitted on this machine's CPU runs: vision
# at ``all`` (fp32, ``small``: 446 MB over 219) and an fp16 vision graph opened per image, which
# holds each activation in fp16 and in fp32 (the casts around its kernels; ``edge``: ConvNeXt on
# the 1,536 px global view 1,723-1,806 MB over 1,764 planned); a prefill grows linearly with its
# tokens (``small`` 84 / 192 / 381 MB at 1,024 / 2,048 / 4,000: GroupQueryAttention's CPU kernel
# does not hold every head's scores at once), 1.65x the MLP's and residual's tensors for an
# fp32 graph (95 kB a token on ``small``), 2.05x for one on fp16 activations (``edge``: 257 and
# 312 kB in two runs; ``python -m benchmarks.phase_memory`` prints each graph run's peak).
VISION_ARENA = {"fp16": 2.7, "fp32": 2.0}
PREFILL_ARENA = {"fp16": 2.05, "fp32": 1.65}


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""
    transient: bool = False  # activations given back after their phase: only the largest counts


@dataclass
class MemoryPlan:
    terms: list[Term] = field(default_factory=list)
    available: float | None = None  # bytes left for the model on the target, if one was named
    target: str = ""

    @property
    def total(self) -> float:
        """Everything held, plus the largest of the phases' activations (vision and prefill run
        one after the other, each giving its memory back)."""
        held = sum(t.bytes for t in self.terms if not t.transient)
        return held + max((t.bytes for t in self.terms if t.transient), default=0.0)

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def table(self) -> str:
        lines = ["| term | MB | how |", "|---|---|---|"]
        for t in self.terms:
            note = t.note + ("; the larger activation term counts" if t.transient else "")
            lines.append(f"| {t.name} | {t.bytes / MB:,.0f} | {note} |")
        lines.append(f"| **peak** | **{self.total / MB:,.0f}** | |")
        return "\n".join(lines)


def stage_weights(manifest: Manifest, stage: str, variant: str, backend: str) -> Term:
    """A stage variant's weights as the backend holds them."""
    entry = manifest.variant(stage, variant)
    name = f"weights: {stage} ({variant})"
    if backend == "onnxruntime" and fp16_on_cpu(stage, variant):
        note = f"{entry['file']}, opened per image (its weights counted with the activations)"
        return Term(name, 0.0, note)
    source = entry.get("estimated_from")
    path = manifest.stage_path(stage, source or variant)
    size = onnx_io.graph_bytes(path)
    note = path.name
    if source is not None:  # not made yet: the base graph's weights at the quantized width
        size *= weight_only_ratio(stage, variant, source)
        note += f" at {variant}, estimated (not made: fila calibrate --llm {variant})"
    if backend == "onnxruntime":
        key = (group_of(stage), variant)
        if key not in ORT_CPU_HELD:
            key = (key[0], "quantized")
        size *= ORT_CPU_HELD[key]
        note += f", x{ORT_CPU_HELD[key]} as ONNX Runtime's CPU provider holds {key[1]} {key[0]}"
    return Term(name, size, note)


def weight_only_ratio(stage: str, variant: str, source: str) -> float:
    """Bytes of a weight-only variant per byte of its source graph (``calibration/weight_only.py``
    layouts): b-bit weights plus one scale per block, fp16 for the embedding and in the source's
    width for MatMulNBits (``edge``: a w4 decoder estimated at 869 MB from its fp16 graph; 870
    made)."""
    width = 16 if source == "fp16" else 32
    scale = 16 if stage == "embed" else width
    return (WEIGHT_ONLY_BITS[variant] + scale / WEIGHT_ONLY_BLOCK) / width


def with_weight_only_estimates(manifest: Manifest, precisions: Sequence[str]) -> Manifest:
    """The export as if ``fila calibrate --llm`` had made these weight-only variants where it has
    not, each sized from its base graph, so a plan says whether quantizing would fit before an
    hour is spent on it (a 7 B model's calibration does not fit this 24 GB machine). As calibrate
    does: the embedding and the LLM's main decoder graph get each precision, the portable
    decoder beside ``decoder_gqa`` w4 only. An estimated entry cannot be opened or saved."""
    data = copy.deepcopy(manifest.data)
    stages = data["stages"]
    for name, entry in stages.items():
        base = entry["variants"].get(manifest.base)
        if base is None or (name != "embed" and group_of(name) != "decoder"):
            continue
        portable_beside_gqa = name == "decoder" and "decoder_gqa" in stages
        # calibrate quantizes that portable graph from its fp16 variant where there is one
        source = "fp16" if portable_beside_gqa and "fp16" in entry["variants"] else manifest.base
        for precision in precisions:
            if precision not in WEIGHT_ONLY_BITS or precision in entry["variants"]:
                continue
            if portable_beside_gqa and precision != "w4":
                continue
            made = {"precision": precision, "estimated_from": source}
            if name == "embed":  # GatherBlockQuantized: ONNX Runtime's
                made["backends"] = ["onnxruntime"]
            entry["variants"][precision] = base | made
    return Manifest(manifest.folder, data, manifest.checked)


def kv_cache(manifest: Manifest, decoder_variant: str, context: int) -> Term:
    shape = DecoderShape.from_text_config(manifest.model["text"])
    itemsize = 2 if activation_dtype(manifest, decoder_variant) == "fp16" else 4
    size = shape.kv_bytes_per_position(itemsize) * context
    return Term(
        "KV cache", size, f"{context} positions x {shape.kv_bytes_per_position(itemsize):,} B"
    )


def vision_activations(
    manifest: Manifest,
    max_tiles: int | None,
    variant: str = "fp32",
    backend: str = "onnxruntime",
    vision_graphs: Sequence[str] = ("vision",),
) -> Term:
    """ViT on every tile (MLP and attention scores of one layer live at once) and ConvNeXt's
    first stage map (with its 4x MLP) over the global view, fp32; where the vision graphs are
    opened per image (``vision_graphs``: those the pipeline runs), the largest one's weights."""
    model, pre = manifest.model, manifest.preprocess
    grids = pre.grid_shapes()
    if max_tiles is not None:
        grids = [g for g in grids if 1 + g[0] * g[1] <= max_tiles] or [
            min(grids, key=lambda g: g[0] * g[1])
        ]
    rows, cols = max(grids, key=lambda g: g[0] * g[1])
    tiles = 1 + rows * cols
    vision = model["vision"]
    tokens = 1 + pre.tokens_per_side**2
    vit = tiles * tokens * (vision["intermediate_size"] + 4 * vision["hidden_size"]) * 4
    vit += tiles * vision["num_attention_heads"] * tokens * tokens * 4
    conv = 0
    if pre.global_tile_size:
        side = (pre.global_tile_size // 4) ** 2 * rows * cols
        conv = 5 * model["convnext"]["dims"][0] * side * 4
    # int8 vision (fp32 between its Q/DQ pairs): fp32's factor, not measured on its own
    factor = VISION_ARENA.get(variant, VISION_ARENA["fp32"]) if backend == "onnxruntime" else 1.0
    size = factor * (vit + conv)
    note = f"{rows}x{cols} grid, {tiles} tiles"
    if backend == "onnxruntime" and fp16_on_cpu("vision", variant):
        opened = max(onnx_io.graph_bytes(manifest.stage_path(s, variant)) for s in vision_graphs)
        size += opened
        note += f"; the largest graph opened for the image ({opened / MB:,.0f} MB)"
    return Term("vision activations", size, note, transient=True)


def prefill_activations(
    manifest: Manifest, context: int, decoder_variant: str = "fp32", backend: str = "onnxruntime"
) -> Term:
    """The MLP's and the residual stream's tensors of one layer over the whole prompt (fp32); on
    TensorRT also every head's attention scores (not measured on a board)."""
    text = manifest.model["text"]
    mlp = context * (text["intermediate_size"] * 3 + text["hidden_size"] * 6) * 4
    if backend == "onnxruntime":
        size = PREFILL_ARENA[activation_dtype(manifest, decoder_variant)] * mlp
    else:
        size = mlp + text["num_attention_heads"] * context * context * 4
    return Term("prefill activations", size, f"{context} tokens at once", transient=True)


def activation_dtype(manifest: Manifest, decoder_variant: str) -> str:
    """What a decoder variant computes its activations in: weight-only variants keep the graph
    they were quantized from."""
    if decoder_variant == "fp16" or (decoder_variant in ("w4", "w8") and manifest.base == "fp16"):
        return "fp16"
    return "fp32"


def plan_memory(
    manifest: Manifest,
    backend: str = "onnxruntime",
    precision: str | None = None,
    context: int | None = None,
    max_tiles: int | None = None,
    decoder: str = "auto",
) -> MemoryPlan:
    """The terms of one pipeline's peak memory (no target: ``with_target`` adds it)."""
    spec = precision_spec(manifest, precision)
    decoder_stage = choose_decoder(manifest, backend, decoder)
    context = context or manifest.stage(decoder_stage)["axes"]["total"]["max"]
    plan = MemoryPlan()
    base = RUNTIME_BYTES + (CUDA_CONTEXT_BYTES if backend == "tensorrt" else 0)
    plan.terms.append(Term("runtime", base, "process, libraries, sessions"))
    variants = {}
    for stage in ("vision", "embed", decoder_stage):
        if stage not in manifest.stages:
            raise FilaError(f"this export has no {stage} stage; re-export it whole to plan it")
        variants[stage] = stage_variant(manifest, spec, stage, backend)
        plan.terms.append(stage_weights(manifest, stage, variants[stage], backend))
    plan.terms.append(kv_cache(manifest, variants[decoder_stage], context))
    graphs = ["vision"]
    if backend == "onnxruntime" and vision_mode(manifest, backend, spec) == "modular":
        graphs = manifest.vision_chain
    acts = vision_activations(manifest, max_tiles, variants["vision"], backend, graphs)
    plan.terms.append(acts)
    plan.terms.append(prefill_activations(manifest, context, variants[decoder_stage], backend))
    return plan


def with_target(plan: MemoryPlan, board: str | None = None, memory_gb: float | None = None):
    """The plan against a board (or a memory size): what is left for the model after the OS."""
    if board is not None:
        if board not in BOARDS:
            raise FilaError(f"unknown board {board!r}; use one of {', '.join(BOARDS)}")
        b = BOARDS[board]
        plan.available = (b.visible_gb - b.os_gb) * GB
        plan.target = f"{b.name}: {b.visible_gb} GB visible, {b.os_gb} GB kept by the OS"
    elif memory_gb is not None:
        plan.available = memory_gb * GB
        plan.target = f"{memory_gb} GB for the model"
    return plan


def suggestions(manifest: Manifest, options: dict, available: float) -> list[str]:
    """Changes (precision, context, tiles) after which the plan fits, smallest change first."""
    have = sorted({v for entry in manifest.stages.values() for v in entry["variants"]})
    trials = [
        {"precision": p} for p in ("w4", "int8,w4", "vision=int8,decoder=w4") if _has(p, have)
    ]
    context = options.get("context") or 4096
    trials += [{"context": c} for c in (context // 2, context // 4, 512) if c < context]
    trials += [{"max_tiles": t} for t in (3, 2)]
    out = []
    for change in trials:
        try:
            plan = plan_memory(manifest, **(options | change))
        except FilaError:
            continue
        if plan.total <= available:
            said = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in change.items())
            out.append(f"{said}: {plan.total / MB:,.0f} MB")
    return out or ["none of precision, context or tiles alone: a board with more memory"]


def _has(spec: str, have: list[str]) -> bool:
    return all(part.split("=")[-1] in have for part in spec.split(","))
