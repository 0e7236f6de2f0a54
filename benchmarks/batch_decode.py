"""Aggregate decode tokens/s of continuous batching (``runtime.batching``) against one stream.

For each row count R: R prompts of seeded random ids (lengths ``--context`` + 7 k, so every row
has its own length) are prefilled into their rows of a ``BatchDecoder`` of R rows, then
``--steps`` greedy decode steps advance all R together; tokens/s = R x steps / time. Each row's
greedy tokens are compared with the same prompt decoded alone (the batch-1 pipeline decoder).
The row counts take turns over ``--rounds``; medians are printed (and written with ``--out``).

    python -m benchmarks.batch_decode --artifacts DIR [--rows 1,2,4,8] [--context 512]
        [--steps 32] [--threads 1] [--rounds 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def prompts(pipe, count: int, context: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [pipe.embed(rng.integers(4, 200, (1, context + 7 * k))) for k in range(count)]


def alone(pipe, embeds: np.ndarray, steps: int) -> list[int]:
    """Greedy tokens of one prompt on the batch-1 decoder."""
    dec = pipe.new_decoder(embeds.shape[1] + steps + 1)
    logits = dec.prefill(embeds, np.ones(embeds.shape[:2], dtype=np.int64))
    tokens = [int(logits[0].argmax())]
    for _ in range(steps):
        logits = dec.decode_one_token(pipe.embed(np.array([[tokens[-1]]])))
        tokens.append(int(logits[0].argmax()))
    return tokens


def batched(pipe, embeds: list[np.ndarray], steps: int) -> tuple[float, list[list[int]]]:
    """Seconds for ``steps`` steps of all rows together, and each row's greedy tokens."""
    from runtime.batching import BatchDecoder

    rows = len(embeds)
    longest = max(e.shape[1] for e in embeds)
    batch = BatchDecoder(
        pipe.runners[pipe.decoder_stage], pipe.decoder_shape, rows, longest + steps + 1
    )
    tokens = [[int(batch.prefill(r, e).argmax())] for r, e in enumerate(embeds)]
    active = np.ones(rows, dtype=bool)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = np.array([[t[-1]] for t in tokens])
        logits = batch.step(pipe.embed(last), active)
        for r in range(rows):
            tokens[r].append(int(logits[r].argmax()))
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default=None)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from benchmarks.machine import cpu_identity
    from benchmarks.report import publish
    from runtime.pipeline import FilaPipeline

    counts = [int(x) for x in args.rows.split(",")]
    pipe = FilaPipeline.from_artifacts(
        args.artifacts, precision=args.precision, threads=args.threads
    )
    embeds = prompts(pipe, max(counts), args.context)
    expected = [alone(pipe, e, args.steps) for e in embeds]
    seconds: dict[int, list[float]] = {r: [] for r in counts}
    identical: dict[int, bool] = {}
    for _ in range(args.rounds):
        for r in counts:
            s, tokens = batched(pipe, embeds[:r], args.steps)
            seconds[r].append(s)
            identical[r] = identical.get(r, True) and tokens == expected[:r]
    rows = []
    for r in counts:
        tok_s = r * args.steps / statistics.median(seconds[r])
        rows.append(
            {"rows": r, "tokens_per_s": round(tok_s, 1), "identical_to_alone": identical[r]}
        )
    one = rows[0]["tokens_per_s"] if counts[0] == 1 else None
    for row in rows:
        row["vs_one_stream"] = round(row["tokens_per_s"] / one, 2) if one else None
    result = {
        "command": "python -m benchmarks.batch_decode "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_identity(),
        "decoder": pipe.decoder_stage,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    publish(result, report, args.out)
    pipe.close()
    return result


def report(r: dict) -> str:
    from benchmarks.report import script_header, table

    header = ["streams decoded together", "aggregate decode tok/s", "vs one stream"]
    rows = [
        [x["rows"], x["tokens_per_s"], f"{x['vs_one_stream']}x"]
        + ["yes" if x["identical_to_alone"] else "NO"]
        for x in r["rows"]
    ]
    lines = [*script_header(r), f"decoder graph: {r['decoder']}", ""]
    return "\n".join(lines + table([*header, "greedy tokens as alone"], rows))


if __name__ == "__main__":
    main()
