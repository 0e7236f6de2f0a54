"""``fila run`` from process start to its first token, with every opened file hashed (what each
start did before the verification record) and with the record (``runtime.verified``): the two
alternate round by round, each a fresh process, medians and their ratio printed.

    python -m benchmarks.startup --artifacts ART --precision w4 --rounds 5 [--cold] [--threads 2]

``--cold`` drops the page cache before each run (root only), as a board's first start after a
reboot reads its files from eMMC or an SD card; without it the files are in memory and the
difference is the hashing itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fila_export.demo import PHOTOS
from runtime.verified import RECORD, cache_record

MODES = ("hash every file", "verification record")


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def one_run(args, mode: str) -> dict:
    """One ``fila run`` in a fresh process: its wall time to exit after one token, and the run's
    own figures."""
    art = Path(args.artifacts)
    if mode == MODES[0]:  # the old start: nothing is known to be unchanged
        (art / RECORD).unlink(missing_ok=True)
        cache_record(art).unlink(missing_ok=True)
    if args.cold:
        drop_page_cache()
    cmd = [sys.executable, "-m", "fila_export.cli", "run", "--artifacts", str(art)]
    cmd += ["--image", str(PHOTOS / "grace_hopper.jpg"), "--prompt", "Describe the image."]
    cmd += ["--max-new-tokens", "1", "--json", "--quiet"]
    cmd += ["--precision", args.precision] if args.precision else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "ttft_s": result["timings"]["ttft_s"]}


def hashed_bytes(art: Path, precision: str | None) -> tuple[int, int]:
    """(files, bytes) a start without the record hashes: what loading the pipeline reads."""
    from runtime.pipeline import FilaPipeline

    (art / RECORD).unlink(missing_ok=True)
    cache_record(art).unlink(missing_ok=True)
    with FilaPipeline.from_artifacts(art, precision=precision) as pipe:
        names = list(pipe.manifest.hashed)
    return len(names), sum((art / n).stat().st_size for n in names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--precision")
    p.add_argument("--threads", type=int)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    args = p.parse_args(argv)
    files, nbytes = hashed_bytes(Path(args.artifacts), args.precision)
    one_run(args, MODES[1])  # writes the record, warms the page cache
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:  # alternating: a slow spell of the machine lands on both
            runs[mode].append(one_run(args, mode))
    print(f"{args.artifacts} ({args.precision or 'base'}): {files} files, {nbytes / 2**20:,.0f} MB")
    print(f"hashed at each start without the record; {args.rounds} rounds, cold={args.cold}")
    print("| start | process start to first token, median s | the request's ttft | before it |")
    print("|---|---|---|---|")
    wall, before = {}, {}
    for mode in MODES:
        wall[mode] = statistics.median(r["wall_s"] for r in runs[mode])
        ttft = statistics.median(r["ttft_s"] for r in runs[mode])
        before[mode] = statistics.median(r["wall_s"] - r["ttft_s"] for r in runs[mode])
        print(f"| {mode} | {wall[mode]:.2f} | {ttft:.2f} | {before[mode]:.2f} |")
    a, b = MODES
    print(
        f"to first token: {wall[a] / wall[b]:.2f}x ({wall[a] - wall[b]:+.2f} s); "
        f"before the request: {before[a] / before[b]:.2f}x ({before[a] - before[b]:+.2f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
