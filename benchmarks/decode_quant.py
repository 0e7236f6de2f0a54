"""Decode tokens/s of the fp32 decoder against a weight-only quantized variant (w4 or w8), on CPU.

Both graphs run through the runtime's own ``Decoder`` (preallocated KV cache, IO binding), at the
same fixed context: a prefill of ``--context`` seeded random embeddings, then ``--warmup`` untimed
and ``--steps`` timed single-token steps (each fed the embedding of the greedy token, as in
generation). The graphs run one after the other, alternating ``--rounds`` times, so drift of a
shared machine hits both.

    python -m benchmarks.decode_quant --artifacts DIR [--precision w4] [--context 512] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def decode_rate(runner, embed, manifest, context: int, steps: int, warmup: int) -> float:
    """Tokens/s of ``steps`` decode steps after a ``context``-long prefill."""
    from runtime.generate import Decoder, DecoderShape

    text = manifest.model["text"]
    dec = Decoder(runner, DecoderShape.from_text_config(text), 1, context + warmup + steps + 1)
    rng = np.random.default_rng(0)
    prompt = (rng.standard_normal((1, context, text["hidden_size"])) * 0.02).astype(np.float32)
    logits = dec.prefill(prompt, np.ones((1, context), dtype=np.int64))
    for _ in range(warmup):
        logits = dec.decode_one_token(embed(logits.argmax(-1)[:, None].astype(np.int64)))
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = dec.decode_one_token(embed(logits.argmax(-1)[:, None].astype(np.int64)))
    return steps / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    from runtime import onnx_io
    from runtime.backends import load_runner
    from runtime.manifest import Manifest
    from runtime.variants import choose_decoder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True, help="export with a w4 (or w8) decoder variant")
    p.add_argument("--precision", default="w4", help="the quantized decoder variant (w4, w8)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="alternating fp32 / quantized runs")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    manifest = Manifest.load(args.artifacts)
    opts = {"threads": args.threads} if args.threads else {}
    embed_runner = load_runner("onnxruntime", manifest, "embed", "fp32", **opts)

    def embed(ids):
        return embed_runner.infer({"input_ids": ids})["inputs_embeds"]

    precisions = ["fp32", args.precision]
    stage = choose_decoder(manifest, "onnxruntime")
    runners = {q: load_runner("onnxruntime", manifest, stage, q, **opts) for q in precisions}
    rates: dict[str, list[float]] = {q: [] for q in precisions}
    for _ in range(args.rounds):
        for q in precisions:
            rates[q].append(
                decode_rate(runners[q], embed, manifest, args.context, args.steps, args.warmup)
            )
    result = {
        "context": args.context,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "variants": {},
    }
    for q in precisions:
        size = onnx_io.graph_bytes(manifest.stage_path(stage, q))
        med = statistics.median(rates[q])
        result["variants"][q] = {"tokens_per_s": med, "all_rounds": rates[q], "bytes": size}
        print(
            f"{stage} {q:>4}: {med:7.2f} tokens/s (rounds: "
            f"{', '.join(f'{r:.2f}' for r in rates[q])}), {size / 1e6:8.1f} MB"
        )
    fp32, quant = result["variants"]["fp32"], result["variants"][args.precision]
    result["speedup"] = quant["tokens_per_s"] / fp32["tokens_per_s"]
    result["size_ratio"] = fp32["bytes"] / quant["bytes"]
    print(
        f"{args.precision} vs fp32 at context {args.context}: {result['speedup']:.2f}x tokens/s, "
        f"{result['size_ratio']:.2f}x smaller"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
