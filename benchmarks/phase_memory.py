"""Where a run's peak memory goes: the resident memory before, and the peak during, each graph
run of one request (vision stages, embedding, prefill; decode steps are left out).

Linux only: the peak (``VmHWM``) is reset before each run by writing 5 to
``/proc/self/clear_refs``. The figures behind ``benchmarks/README.md`` ("Memory plan")::

    python -m benchmarks.phase_memory --artifacts DIR --precision w4 --threads 2 [--image PATH]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from fila_export.demo import PHOTOS
from runtime.memory import status_kb
from runtime.pipeline import FilaPipeline

CLEAR_REFS = Path("/proc/self/clear_refs")
MB_PER_KB = 1024 / 1e6  # megabytes of 10^6 bytes, as fila plan counts


def reset_peak() -> None:
    CLEAR_REFS.write_text("5")


def watch(runner, rows: list[dict]) -> None:
    """Record the memory around each of this runner's runs (its methods wrapped on the
    instance)."""

    def measured(method):
        def run(feeds, *args, **kwargs):
            reset_peak()
            before, t0 = status_kb("VmRSS"), time.perf_counter()
            out = method(feeds, *args, **kwargs)
            tokens = next(iter(feeds.values())).shape
            row = {"graph": runner.name, "input": "x".join(map(str, tokens))}
            row |= {"rss_mb": before * MB_PER_KB, "peak_mb": status_kb("VmHWM") * MB_PER_KB}
            rows.append(row | {"seconds": time.perf_counter() - t0})
            return out

        return run

    runner.infer = measured(runner.infer)
    if hasattr(runner, "infer_into"):
        runner.infer_into = measured(runner.infer_into)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--precision")
    p.add_argument("--threads", type=int)
    p.add_argument("--vision", default="auto", help="auto, fused or modular")
    p.add_argument("--level", help="ONNX Runtime optimization level for every graph")
    p.add_argument("--image", default=str(PHOTOS / "grace_hopper.jpg"))
    p.add_argument("--prompt", default="Describe the image.")
    args = p.parse_args(argv)
    if not CLEAR_REFS.exists():
        raise SystemExit("needs Linux's /proc/self/clear_refs to reset the peak")
    options = {"threads": args.threads} if args.threads else {}
    options |= {"level": args.level} if args.level else {}
    pipe = FilaPipeline.from_artifacts(
        args.artifacts, precision=args.precision, vision=args.vision, **options
    )
    loaded = status_kb("VmRSS") * MB_PER_KB
    rows: list[dict] = []
    for runner in pipe.runners.values():
        watch(runner, rows)
    pipe.generate(args.image, args.prompt, max_new_tokens=1)
    print(f"loaded: {loaded:,.0f} MB resident")
    print("| graph | input | RSS before MB | peak during MB | over before MB | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        over = r["peak_mb"] - r["rss_mb"]
        print(
            f"| {r['graph']} | {r['input']} | {r['rss_mb']:,.0f} | {r['peak_mb']:,.0f} | "
            f"{over:,.0f} | {r['seconds']:.1f} |"
        )
    print(f"run peak: {max(r['peak_mb'] for r in rows):,.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
