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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.machine import (
    STEADY_MALLOC_ENV,
    TegraStats,
    machine_info,
    measure_bandwidth,
    merge_power,
    steady_allocator,
)
from benchmarks.stats import sample, summarize
from benchmarks.targets import STAGE_GROUPS, decode_weight_bytes, runtime_target
from fila_export.demo import PHOTOS
from runtime import onnx_io
from runtime.errors import FilaError
from runtime.generate import DecoderShape
from runtime.image_io import find_images
from runtime.manifest import Manifest
from runtime.memory import peak_rss_bytes, rss_mb
from runtime.variants import decoder_stages


@dataclass(frozen=True)
class BenchSettings:
    """What every column of one run shares: the request it answers, how each figure is sampled,
    and the decode roofline's terms (the machine's measured bandwidth, KV bytes per position)."""

    image: Path
    prompt: str
    answer_tokens: int
    threads: int | None
    providers: tuple[str, ...] | None  # ONNX Runtime execution providers (None: CPU)
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
        keys = (
            "warmup",
            "runs",
            "contexts",
            "decode_steps",
            "answer_tokens",
            "threads",
            "providers",
            "min_seconds",
            "rounds",
        )
        return {k: getattr(self, k) for k in keys} | {"contexts": list(self.contexts)}


def measure_round(target, s: BenchSettings) -> dict:
    """One round of one target: after a warm-up (each round is a fresh process), its share of every
    figure's samples — each stage, decode at each context, whole answers — as raw seconds."""
    groups = {g: target.stages[g] for g in STAGE_GROUPS if target.stages.get(g)}
    per_round = -(-s.runs // s.rounds)
    seconds = s.min_seconds / s.rounds
    tokens: list[int] = []
    with TegraStats() as power:
        stage_s = {
            g: sample(lambda fns=fns: [fn() for fn in fns], s.warmup, per_round, seconds)
            for g, fns in groups.items()
        }
        decode_s = {}
        for ctx in s.contexts:
            prepare, step = target.decode_at(ctx, s.decode_steps + s.warmup)
            decode_s[str(ctx)] = decode_samples(prepare, step, s.warmup, s.decode_steps, seconds)
        e2e = sample(
            lambda: tokens.append(target.end_to_end()), 1, -(-end_to_end_runs(s.runs) // s.rounds)
        )
    # Jetson power is sampled over the whole round, warm-ups included, and divided by the tokens
    # of its timed decode steps and whole answers (warm-up answer included): an upper bound
    generated = sum(tokens) + sum(len(x) for x in decode_s.values())
    return {
        "backend": target.backend,
        "precision": target.precision,
        "decoder_stage": target.decoder_stage,
        "stage_s": stage_s,
        "decode_s": decode_s,
        "end_to_end_s": e2e,
        "answer_tokens": tokens[-1],
        "power": power.summary(generated),
        "gpu_peak_mb": gpu_peak_mb(target.backend),
        "sizes_bytes": target.sizes,
        "memory_mb": target.memory_mb,
        "vision": target.vision,
    }


def column_result(rounds: list[dict], s: BenchSettings, weight_bytes: int) -> dict:
    """One column's figures: each p50 pools the samples of all its rounds, so a slow spell of the
    machine or one process's bad luck (memory placement, allocator state) moves it a little."""
    first = rounds[0]
    result = {
        k: first[k]
        for k in (
            "backend",
            "precision",
            "decoder_stage",
            "answer_tokens",
            "sizes_bytes",
            "allocator_env",
            "memory_mb",
            "vision",
            "threads_used",
        )
    }
    result["decode_weight_bytes"] = weight_bytes
    result["rounds"] = len(rounds)
    if first["backend"] == "onnxruntime":  # what ran it: the CPU, or a GPU provider
        result["providers"] = list(s.providers or ["cpu"])
    stages = {g: summarize(pooled(rounds, "stage_s", g)) for g in first["stage_s"]}
    result["stages"] = stages
    result["ttft_ms"] = sum(
        stages[g]["p50_ms"] for g in ("preprocess", "vision", "prefill") if g in stages
    )
    result["decode"] = {}
    for ctx in first["decode_s"]:
        figures = summarize(pooled(rounds, "decode_s", ctx))
        tok_s = 1000 / figures["p50_ms"]
        bytes_per_token = weight_bytes + s.kv_bytes_per_pos * int(ctx)
        result["decode"][ctx] = figures | {
            "tokens_per_s": tok_s,
            "bytes_per_token": bytes_per_token,
            "achieved_gb_s": bytes_per_token * tok_s / 1e9,
            "roofline_ratio": bytes_per_token * tok_s / s.bandwidth,
        }
    result["end_to_end"] = summarize(pooled(rounds, "end_to_end_s")) | {
        "answer_tokens": first["answer_tokens"]
    }
    result["power"] = merge_power([r["power"] for r in rounds])
    gpu_peaks = [r["gpu_peak_mb"] for r in rounds if r["gpu_peak_mb"] is not None]
    result["gpu_peak_mb"] = max(gpu_peaks) if gpu_peaks else None
    # the peak of the round process that went highest, and what it held before loading
    top = max(rounds, key=lambda r: r["peak_rss_mb"])
    result |= {k: top[k] for k in ("peak_rss_mb", "rss_at_start_mb", "peak_rss_scope")}
    return result


def pooled(rounds: list[dict], key: str, name: str | None = None) -> list[float]:
    """One figure's samples from every round (``round[key]``, or ``round[key][name]``)."""
    return [x for r in rounds for x in (r[key] if name is None else r[key][name])]


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


def run_bench(
    artifacts: str | Path,
    checkpoint: str | Path | None,
    backends: Sequence[str],
    precisions: Sequence[str],
    images: str | Path | None = None,
    contexts: Sequence[int] = (128, 512, 2048),
    warmup: int = 3,
    runs: int = 20,
    decode_steps: int = 32,
    answer_tokens: int = 32,
    threads: int | None = None,
    prompt: str = "Describe the image.",
    decoders: Sequence[str] = ("auto",),
    min_seconds: float = 0.0,
    rounds: int = 5,
    providers: Sequence[str] | None = None,
) -> dict:
    """``decoders``: which decoder graphs the onnxruntime backend runs (``auto``, ``gqa``,
    ``portable``; several give one column each). ``min_seconds``: each stage and decode context
    is sampled at least this long (more runs for short stages, for p50s that hold from run to
    run). ``rounds``: fresh processes per column, taking turns with the other columns; each p50
    pools the samples of all of a column's rounds. ``providers``: ONNX Runtime's execution
    providers in order (cuda, tensorrt, cpu; default CPU)."""
    if rounds < 1:
        raise FilaError(f"--rounds must be at least 1 (got {rounds})")
    if "torch" in backends and checkpoint is None:
        raise FilaError("the torch baseline needs --checkpoint (or leave torch out of --backends)")
    if providers and "onnxruntime" in backends:
        onnx_io.choose_providers(providers)  # a provider this build lacks: said before measuring
    artifacts = Path(artifacts)
    manifest = Manifest.load(artifacts)
    max_ctx = min(manifest.stage(n)["axes"]["total"]["max"] for n in decoder_stages(manifest))
    bw = measure_bandwidth(threads=threads)
    settings = BenchSettings(
        image=find_images(images or PHOTOS)[0],
        prompt=prompt,
        answer_tokens=answer_tokens,
        threads=threads,
        providers=tuple(providers) if providers else None,
        warmup=warmup,
        runs=runs,
        decode_steps=decode_steps,
        min_seconds=min_seconds,
        rounds=rounds,
        bandwidth=bw["best"],
        contexts=tuple(c for c in contexts if c + decode_steps + warmup < max_ctx),
        kv_bytes_per_pos=DecoderShape.from_text_config(
            manifest.model["text"]
        ).kv_bytes_per_position(),
    )
    precisions = list(precisions) or [manifest.base]
    columns = [
        (b, p, d)
        for b in backends
        for p in (["fp32"] if b == "torch" else precisions)
        for d in (decoders if b == "onnxruntime" else ["auto"])
    ]
    rounds_of = measure_columns(columns, artifacts, checkpoint, settings)
    machine = machine_info() | {
        "measured_bandwidth_gb_s": bw["best"] / 1e9,
        "bandwidth_gb_s": {k: v / 1e9 for k, v in bw.items()},
    }
    out = {
        "machine": machine,
        "artifacts": str(artifacts),
        "image": str(settings.image),
        "prompt": prompt,
        "settings": settings.sampling(),
        "model": {"preset_text": manifest.model["text"], "vision": manifest.model["vision"]},
        "results": [
            column_result(rounds_of[c], settings, decode_weight_bytes(manifest, *c))
            for c in columns
        ],
    }
    add_speedups(out)
    return out


def measure_columns(columns: list[tuple], artifacts: Path, checkpoint, s: BenchSettings) -> dict:
    """Every round of every column in a fresh process, the columns taking turns round by round: a
    slow spell of the machine lasting minutes lands on every column a little, not on one column
    (one run measuring each column in one go had one column 10 % slow throughout), no column
    inherits another's allocator state, thread pools or memory, and its peak RSS is its own."""
    spawn = multiprocessing.get_context("spawn")
    rounds_of: dict[tuple, list[dict]] = {c: [] for c in columns}
    with steady_allocator():
        for r in range(s.rounds):
            for column in columns:
                t0 = time.perf_counter()
                with spawn.Pool(1) as pool:
                    result = pool.apply(bench_column, (*column, artifacts, checkpoint, s))
                rounds_of[column].append(result)
                print(
                    f"round {r + 1}/{s.rounds}: {' '.join(column)} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return rounds_of


def bench_column(
    backend: str,
    precision: str,
    decoder: str,
    artifacts: Path,
    checkpoint: str | Path | None,
    s: BenchSettings,
) -> dict:
    """One round of one backend x precision x decoder column, loaded and measured in this process."""
    rss_at_start = rss_mb()  # the interpreter and imports; the process is this round's alone
    if backend == "torch":
        from benchmarks.torch_target import torch_target

        target = torch_target(Path(checkpoint), s.image, s.prompt, s.answer_tokens, s.threads)
    else:
        target = runtime_target(
            Path(artifacts),
            backend,
            precision,
            s.image,
            s.prompt,
            s.answer_tokens,
            s.threads,
            decoder,
            s.providers,
        )
    result = measure_round(target, s)
    peak = peak_rss_bytes() / 2**20
    return result | {
        "peak_rss_mb": peak,
        "threads_used": target.threads_used,
        "rss_at_start_mb": rss_at_start,
        "peak_rss_scope": "process" if math.isnan(rss_at_start) else "target",
        "allocator_env": {k: os.environ.get(k) for k in STEADY_MALLOC_ENV},
    }


def add_speedups(out: dict) -> None:
    base = next((r for r in out["results"] if r["backend"] == "torch"), None)
    if base is None:
        return
    for r in out["results"]:
        r["speedup_vs_torch"] = {
            "end_to_end": base["end_to_end"]["p50_ms"] / r["end_to_end"]["p50_ms"],
            **{
                g: base["stages"][g]["p50_ms"] / r["stages"][g]["p50_ms"]
                for g in r["stages"]
                if g in base["stages"]
            },
        }


def save(out: dict, folder: str | Path) -> list[Path]:
    from benchmarks.report import markdown, plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "results.json", folder / "results.md"]
    paths[0].write_text(json.dumps(out, indent=2))
    paths[1].write_text(markdown(out))
    try:
        paths += plots(out, folder)
    except ModuleNotFoundError as exc:  # a board without matplotlib still gets its tables
        if exc.name != "matplotlib":
            raise
        print("plots skipped: matplotlib is not installed", file=sys.stderr)
    return paths
