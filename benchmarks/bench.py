"""`fila bench`: every stage of every backend x precision on the same inputs, in one run.

Per-stage latency (p50/p90/p99/mean), time to first token, decode tokens/s at each context,
end-to-end latency for a fixed answer length, memory, sizes, and the decode roofline (bytes read
per token vs the machine's measured memory bandwidth), with PyTorch eager as the baseline column.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.machine import (
    STEADY_MALLOC_ENV,
    TegraStats,
    machine_info,
    measure_bandwidth,
    peak_rss_bytes,
    rss_mb,
    steady_allocator,
)
from benchmarks.stats import sample, summarize
from benchmarks.targets import STAGE_GROUPS, runtime_target, torch_target
from runtime.errors import FilaError
from runtime.generate import DecoderShape


@dataclass(frozen=True)
class BenchSettings:
    """What every column of one run shares: the request it answers, how each figure is sampled,
    and the decode roofline's terms (the machine's measured bandwidth, KV bytes per position)."""

    image: Path
    prompt: str
    answer_tokens: int
    threads: int | None
    warmup: int
    runs: int
    contexts: tuple[int, ...]
    decode_steps: int
    min_seconds: float
    rounds: int
    bandwidth: float  # bytes/s
    kv_bytes_per_pos: int

    def sampling(self) -> dict:
        """The settings as the results file records them."""
        keys = ("warmup", "runs", "contexts", "decode_steps", "answer_tokens", "threads",
                "min_seconds", "rounds")  # fmt: skip
        return {k: getattr(self, k) for k in keys} | {"contexts": list(self.contexts)}


def bench_target(target, s: BenchSettings) -> dict:
    """Every figure of one target. The samples of each figure are taken in ``rounds`` passes over
    all of them (stages, decode at each context, whole answers), so each p50 pools samples spread
    over the target's whole measuring time: a shared machine's slow spell of some seconds then
    moves every figure a little instead of one figure a lot, and two runs agree."""
    result = {"backend": target.backend, "precision": target.precision, "stages": {},
              "decoder_stage": target.decoder_stage}  # fmt: skip
    groups = {g: target.stages[g] for g in STAGE_GROUPS if target.stages.get(g)}
    decoders = {ctx: target.decode_at(ctx, s.decode_steps + s.warmup) for ctx in s.contexts}
    stage_s = {g: [] for g in groups}
    decode_s = {ctx: [] for ctx in s.contexts}
    e2e, tokens = [], []
    per_round = -(-s.runs // s.rounds)
    seconds_per_round = s.min_seconds / s.rounds
    with TegraStats() as power:
        for r in range(s.rounds):
            first = s.warmup if r == 0 else 0
            for g, fns in groups.items():
                stage_s[g] += sample(lambda fns=fns: [fn() for fn in fns], first, per_round,
                                     seconds_per_round)  # fmt: skip
            for ctx, (prepare, step) in decoders.items():
                decode_s[ctx] += decode_samples(prepare, step, s.warmup, s.decode_steps,
                                                seconds_per_round)  # fmt: skip
            e2e += sample(lambda: tokens.append(target.end_to_end()), 1 if r == 0 else 0,
                          -(-end_to_end_runs(s.runs) // s.rounds))  # fmt: skip
    result["stages"] = {g: summarize(x) for g, x in stage_s.items()}
    stages = result["stages"]
    result["ttft_ms"] = sum(
        stages[g]["p50_ms"] for g in ("preprocess", "vision", "prefill") if g in stages
    )
    result["decode"] = {}
    for ctx in s.contexts:
        figures = summarize(decode_s[ctx])
        tok_s = 1000 / figures["p50_ms"]
        bytes_per_token = target.weight_bytes + s.kv_bytes_per_pos * ctx
        result["decode"][str(ctx)] = figures | {
            "tokens_per_s": tok_s,
            "bytes_per_token": bytes_per_token,
            "achieved_gb_s": bytes_per_token * tok_s / 1e9,
            "roofline_ratio": bytes_per_token * tok_s / s.bandwidth,
        }
    result["end_to_end"] = summarize(e2e) | {"answer_tokens": tokens[-1]}
    # Jetson power is sampled over the whole measuring window: energy per token counts every
    # token generated in it (decode steps and whole answers)
    generated = sum(tokens) + sum(len(x) for x in decode_s.values())
    result["power"] = power.summary(generated)
    result["gpu_peak_mb"] = gpu_peak_mb(target.backend)
    result["sizes_bytes"] = target.sizes
    result["decode_weight_bytes"] = target.weight_bytes
    return result


def end_to_end_runs(runs: int) -> int:
    """Whole answers timed per target: half ``--runs`` (each is seconds long), at least 3."""
    return max(3, runs // 2)


def decode_samples(prepare, step, warmup: int, steps: int, min_seconds: float) -> list[float]:
    """Seconds per decode step after a prefill (``prepare``): rounds of (prefill, ``warmup`` +
    ``steps`` steps) until ``min_seconds`` are sampled (at most 8), so a fast decoder's p50 is not
    taken over a fraction of a second; each starts again at the prefill's context, so the figure
    stays the cost at that context."""
    samples: list[float] = []
    for _ in range(8):
        prepare()
        samples += sample(step, warmup, steps)
        if sum(samples) >= min_seconds:
            break
    return samples


def gpu_peak_mb(backend: str) -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20 if backend == "torch" else None
    except ImportError:
        pass
    return None


def run_bench(artifacts: str | Path, checkpoint: str | Path | None, backends: Sequence[str],
              precisions: Sequence[str], images: str | Path | None = None,
              contexts: Sequence[int] = (128, 512, 2048), warmup: int = 3, runs: int = 20,
              decode_steps: int = 32, answer_tokens: int = 32, threads: int | None = None,
              prompt: str = "Describe the image.", decoders: Sequence[str] = ("auto",),
              min_seconds: float = 0.0, rounds: int = 5) -> dict:  # fmt: skip
    """``decoders``: which decoder graphs the onnxruntime backend runs (``auto``, ``gqa``,
    ``portable``; several give one column each). ``min_seconds``: each stage and decode context
    is sampled at least this long (more runs for short stages, for p50s that hold from run to
    run). ``rounds``: passes over all figures of a target that its samples are spread across."""
    if rounds < 1:
        raise FilaError(f"--rounds must be at least 1 (got {rounds})")
    if "torch" in backends and checkpoint is None:
        raise FilaError("the torch baseline needs --checkpoint (or leave torch out of --backends)")
    from fila_export.validate import find_images
    from runtime.manifest import Manifest

    artifacts = Path(artifacts)
    manifest = Manifest.load(artifacts)
    max_ctx = min(
        s["axes"]["total"]["max"] for n, s in manifest.stages.items() if n.startswith("decoder")
    )
    bw = measure_bandwidth(threads=threads)
    settings = BenchSettings(
        image=find_images(images)[0], prompt=prompt, answer_tokens=answer_tokens, threads=threads,
        warmup=warmup, runs=runs, decode_steps=decode_steps, min_seconds=min_seconds,
        rounds=rounds, bandwidth=bw["best"],
        contexts=tuple(c for c in contexts if c + decode_steps + warmup < max_ctx),
        kv_bytes_per_pos=DecoderShape.from_text_config(manifest.model["text"]).kv_bytes_per_position(),
    )  # fmt: skip
    columns = [(b, p, d) for b in backends
               for p in (["fp32"] if b == "torch" else precisions)
               for d in (decoders if b == "onnxruntime" else ["auto"])]  # fmt: skip
    spawn = multiprocessing.get_context("spawn")
    results = []
    # each column in a fresh process: no allocator state, thread pools or leftover memory of the
    # columns before it (one run in-process had its ONNX Runtime decode 13 % off), its peak RSS is
    # its own, and its allocator keeps freed buffers (see steady_allocator)
    with steady_allocator():
        for backend, precision, decoder in columns:
            with spawn.Pool(1) as pool:
                results.append(pool.apply(bench_column, (backend, precision, decoder, artifacts,
                                                         checkpoint, settings)))  # fmt: skip
    out = {"machine": machine_info() | {"measured_bandwidth_gb_s": bw["best"] / 1e9,
                                        "bandwidth_gb_s": {k: v / 1e9 for k, v in bw.items()}},
           "artifacts": str(artifacts), "image": str(settings.image), "prompt": prompt,
           "settings": settings.sampling(),
           "model": {"preset_text": manifest.model["text"], "vision": manifest.model["vision"]},
           "results": results}  # fmt: skip
    add_speedups(out)
    return out


def bench_column(backend: str, precision: str, decoder: str, artifacts: Path,
                 checkpoint: str | Path | None, s: BenchSettings) -> dict:  # fmt: skip
    """One backend x precision x decoder column, loaded and measured start to finish."""
    rss_at_start = rss_mb()  # the interpreter and imports; the process is this column's alone
    if backend == "torch":
        target = torch_target(Path(checkpoint), s.image, s.prompt, s.answer_tokens, s.threads)
    else:
        target = runtime_target(Path(artifacts), backend, precision, s.image, s.prompt,
                                s.answer_tokens, s.threads, decoder)  # fmt: skip
    result = bench_target(target, s)
    peak = peak_rss_bytes() / 2**20
    return result | {"peak_rss_mb": peak, "rss_at_start_mb": rss_at_start,
                     "peak_rss_scope": "process" if math.isnan(rss_at_start) else "target",
                     "allocator_env": {k: os.environ.get(k) for k in STEADY_MALLOC_ENV}}  # fmt: skip


def add_speedups(out: dict) -> None:
    base = next((r for r in out["results"] if r["backend"] == "torch"), None)
    if base is None:
        return
    for r in out["results"]:
        r["speedup_vs_torch"] = {
            "end_to_end": base["end_to_end"]["p50_ms"] / r["end_to_end"]["p50_ms"],
            **{g: base["stages"][g]["p50_ms"] / r["stages"][g]["p50_ms"]
               for g in r["stages"] if g in base["stages"]},
        }  # fmt: skip


def save(out: dict, folder: str | Path) -> list[Path]:
    from benchmarks.report import markdown, plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "results.json", folder / "results.md"]
    paths[0].write_text(json.dumps(out, indent=2))
    paths[1].write_text(markdown(out))
    paths += plots(out, folder)
    return paths
