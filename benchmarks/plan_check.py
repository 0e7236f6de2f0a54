"""How close ``fila plan`` comes to the peak memory of a real run.

For each export and precision: ``fila run --json`` on one image in a fresh process (its result
carries the process's peak RSS), and ``fila plan`` for the same request (context = the prompt with
its image tokens plus the new tokens, tiles = the image's). Prints planned vs measured and the
ratio; the committed figures are in ``benchmarks/README.md`` ("Memory plan").

    python -m benchmarks.plan_check --artifacts DIR [DIR ...] --precisions fp32,w4 [--image PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fila_export.demo import PHOTOS

PROMPT = "Describe the image."


def measure(artifacts: Path, precision: str, image: Path, tokens: int, threads: int) -> dict:
    """One ``fila run`` in a fresh process: its JSON result (peak RSS, token counts)."""
    cmd = [sys.executable, "-m", "fila_export.cli", "run", "--artifacts", str(artifacts)]
    cmd += ["--image", str(image), "--prompt", PROMPT, "--max-new-tokens", str(tokens)]
    cmd += ["--precision", precision, "--threads", str(threads), "--json", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fila run failed: {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def planned(artifacts: Path, precision: str, image: Path, result: dict, tokens: int):
    from runtime.image_io import load_image
    from runtime.manifest import Manifest
    from runtime.plan import plan_memory
    from runtime.preprocess import preprocess

    manifest = Manifest.load(artifacts)
    pre = preprocess(load_image(image), manifest.preprocess)
    context = len(result["prompt_token_ids"]) - 1 + pre.num_tokens + tokens
    return plan_memory(
        manifest, precision=precision, context=context, max_tiles=pre.pixel_values.shape[0]
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", nargs="+", required=True)
    p.add_argument("--precisions", default="fp32")
    p.add_argument("--image", default=str(PHOTOS / "grace_hopper.jpg"))
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    print("| export | precision | planned MB | measured peak MB | planned / measured |")
    print("|---|---|---|---|---|")
    for folder in map(Path, args.artifacts):
        for precision in args.precisions.split(","):
            result = measure(folder, precision, Path(args.image), args.tokens, args.threads)
            plan = planned(folder, precision, Path(args.image), result, args.tokens)
            ratio = plan.total / 1e6 / (result["peak_rss_mb"] * 2**20 / 1e6)
            row = {"export": folder.name, "precision": precision, "planned_mb": plan.total / 1e6}
            row |= {"measured_mb": result["peak_rss_mb"] * 2**20 / 1e6, "ratio": ratio}
            row["terms"] = {t.name: round(t.bytes / 1e6, 1) for t in plan.terms}
            rows.append(row)
            line = f"| {row['export']} | {precision} | {row['planned_mb']:,.0f} | "
            print(line + f"{row['measured_mb']:,.0f} | {ratio:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
