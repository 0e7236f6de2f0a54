"""`fila bench`: every stage of every backend x precision on the same inputs, in one run.

Per-stage latency (p50/p90/p99/mean), time to first token, decode tokens/s at each context,
end-to-end latency for a fixed answer length, memory, sizes, and the decode roofline (bytes read
per token vs the machine's measured memory bandwidth), with PyTorch eager as the baseline column.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.machine import TegraStats, machine_info, measure_bandwidth, peak_rss_bytes
from benchmarks.stats import summarize, time_it
from benchmarks.targets import STAGE_GROUPS, runtime_target, torch_target
from runtime.errors import FilaError


def bench_target(target, warmup: int, runs: int, contexts: Sequence[int], decode_steps: int,
                 bandwidth: float, kv_bytes_per_pos: int, min_seconds: float = 0.0) -> dict:  # fmt: skip
    result = {"backend": target.backend, "precision": target.precision, "stages": {},
              "decoder_stage": target.decoder_stage}  # fmt: skip
    for group in STAGE_GROUPS:
        fns = target.stages.get(group)
        if not fns:
            continue

        def run_all(fns=fns):
            for fn in fns:
                fn()

        result["stages"][group] = time_it(run_all, warmup, runs, min_seconds)
    stages = result["stages"]
    result["ttft_ms"] = sum(
        stages[g]["p50_ms"] for g in ("preprocess", "vision", "prefill") if g in stages
    )
    result["decode"] = {}
    for ctx in contexts:
        prepare, step = target.decode_at(ctx, decode_steps + warmup)
        prepare()
        s = time_it(step, warmup, decode_steps)
        tok_s = 1000 / s["p50_ms"]
        bytes_per_token = target.weight_bytes + kv_bytes_per_pos * ctx
        result["decode"][str(ctx)] = s | {
            "tokens_per_s": tok_s,
            "bytes_per_token": bytes_per_token,
            "achieved_gb_s": bytes_per_token * tok_s / 1e9,
            "roofline_ratio": bytes_per_token * tok_s / bandwidth,
        }
    with TegraStats() as power:
        e2e = []
        tokens = 0
        for _ in range(max(2, runs // 4)):
            t0 = time.perf_counter()
            tokens += target.end_to_end()
            e2e.append(time.perf_counter() - t0)
    result["end_to_end"] = summarize(e2e) | {"answer_tokens": tokens // len(e2e)}
    result["power"] = power.summary(tokens)
    result["peak_rss_mb"] = peak_rss_bytes() / 2**20
    result["gpu_peak_mb"] = gpu_peak_mb(target.backend)
    result["sizes_bytes"] = target.sizes
    result["decode_weight_bytes"] = target.weight_bytes
    return result


def gpu_peak_mb(backend: str) -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20 if backend == "torch" else None
    except ImportError:
        pass
    return None


def kv_bytes_per_position(manifest_model: dict) -> int:
    text = manifest_model["text"]
    heads = text["num_attention_heads"]
    kv = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return 2 * text["num_hidden_layers"] * kv * head_dim * 4


def run_bench(artifacts: str | Path, checkpoint: str | Path | None, backends: Sequence[str],
              precisions: Sequence[str], images: str | Path | None = None,
              contexts: Sequence[int] = (128, 512, 2048), warmup: int = 3, runs: int = 20,
              decode_steps: int = 32, answer_tokens: int = 32, threads: int | None = None,
              prompt: str = "Describe the image.", decoders: Sequence[str] = ("auto",),
              min_seconds: float = 0.0) -> dict:  # fmt: skip
    """``decoders``: which decoder graphs the onnxruntime backend runs (``auto``, ``gqa``,
    ``portable``; several give one column each). ``min_seconds``: each stage is sampled at least
    this long (more runs for short stages, for p50s that hold from run to run)."""
    from fila_export.validate import find_images
    from runtime.manifest import Manifest

    artifacts = Path(artifacts)
    manifest = Manifest.load(artifacts)
    image = find_images(images)[0]
    max_ctx = min(
        s["axes"]["total"]["max"] for n, s in manifest.stages.items() if n.startswith("decoder")
    )
    contexts = [c for c in contexts if c + decode_steps + warmup < max_ctx]
    bw = measure_bandwidth(threads=threads)
    bandwidth = bw["best"]
    out = {"machine": machine_info() | {"measured_bandwidth_gb_s": bandwidth / 1e9,
                                        "bandwidth_gb_s": {k: v / 1e9 for k, v in bw.items()}},
           "artifacts": str(artifacts), "image": str(image), "prompt": prompt,
           "settings": {"warmup": warmup, "runs": runs, "contexts": contexts, "decode_steps": decode_steps,
                        "answer_tokens": answer_tokens, "threads": threads,
                        "min_seconds": min_seconds},
           "model": {"preset_text": manifest.model["text"], "vision": manifest.model["vision"]},
           "results": []}  # fmt: skip
    kv_pos = kv_bytes_per_position(manifest.model)
    runs_for = [(b, p, d) for b in backends
                for p in (["fp32"] if b == "torch" else precisions)
                for d in (decoders if b == "onnxruntime" else ["auto"])]  # fmt: skip
    for backend, precision, decoder in runs_for:
        if backend == "torch":
            if checkpoint is None:
                raise FilaError("the torch baseline needs --checkpoint")
            target = torch_target(Path(checkpoint), image, prompt, answer_tokens, threads)
        else:
            target = runtime_target(
                artifacts, backend, precision, image, prompt, answer_tokens, threads, decoder
            )
        out["results"].append(
            bench_target(
                target, warmup, runs, contexts, decode_steps, bandwidth, kv_pos, min_seconds
            )
        )
        del target
        gc.collect()
    add_speedups(out)
    return out


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
