"""What a follow-up question on the same image costs with and without reuse.

Each round, in one process: turn 1 (image + question) on a fresh ``Reuse``, then the follow-up
(same image, turn 1 in the history) with that ``Reuse`` — the image's features and the prompt
prefix come from the caches — and the same follow-up without reuse. Prints each time to first
token's median over the rounds, the follow-up/first-turn ratio, and whether the answers with and
without reuse are the same tokens.

    python -m benchmarks.reuse_check --artifacts DIR [--threads 1] [--rounds 5] [--image PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from fila_export.demo import PHOTOS

FIRST = "Describe the image."
FOLLOW_UP = "What else is in it?"


def one_round(pipe, image: str, tokens: int) -> dict:
    from runtime.reuse import Reuse

    reuse = Reuse()
    first = pipe.generate(image, FIRST, max_new_tokens=tokens, reuse=reuse)
    history = [(FIRST, first.text)]
    fresh = pipe.generate(image, FOLLOW_UP, max_new_tokens=tokens, history=history)
    again = pipe.generate(image, FOLLOW_UP, max_new_tokens=tokens, history=history, reuse=reuse)
    return {
        "first_ttft_s": first.timings["ttft_s"],
        "follow_up_ttft_s": again.timings["ttft_s"],
        "follow_up_no_reuse_ttft_s": fresh.timings["ttft_s"],
        "cached_positions": again.timings["cached_positions"],
        "prompt_positions": len(again.prompt_token_ids),
        "same_tokens": again.token_ids == fresh.token_ids,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from runtime.pipeline import FilaPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--image", default=str(PHOTOS / "grace_hopper.jpg"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--json", help="also write the rounds here")
    args = p.parse_args(argv)
    pipe = FilaPipeline.from_artifacts(args.artifacts, threads=args.threads)
    one_round(pipe, args.image, 2)  # warm-up: first-run allocations
    rounds = [one_round(pipe, args.image, args.tokens) for _ in range(args.rounds)]

    def med(key):
        return statistics.median(r[key] for r in rounds)

    print(f"rounds {args.rounds}, threads {args.threads}, {Path(args.artifacts).name}")
    print(f"first turn TTFT p50          {med('first_ttft_s') * 1e3:9.1f} ms")
    print(f"follow-up TTFT, no reuse p50 {med('follow_up_no_reuse_ttft_s') * 1e3:9.1f} ms")
    print(f"follow-up TTFT, reuse p50    {med('follow_up_ttft_s') * 1e3:9.1f} ms")
    ratio = med("follow_up_ttft_s") / med("first_ttft_s")
    print(f"follow-up with reuse / first turn: {ratio:.3f}")
    print(
        f"cached positions {rounds[0]['cached_positions']} (prompt ids before image expansion "
        f"{rounds[0]['prompt_positions']})"
    )
    print(f"same tokens with and without reuse: {all(r['same_tokens'] for r in rounds)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
