"""``fila calibrate``: INT8 vision and weight-only INT8/INT4 decoder variants, with their report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fila_export.cli.common import joined


def add_parsers(sub) -> None:
    p = sub.add_parser("calibrate", help="INT8 vision and weight-only INT8/INT4 decoder variants")
    p.add_argument("--artifacts", required=True, help="folder written by fila export (updated)")
    p.add_argument("--images", required=True, help="folder of real images (jpg/png/webp)")
    p.add_argument("--prompts", help='JSONL of {"prompt": ..., "image": optional path}')
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--num-calib", type=int, default=32, help="calibration images")
    p.add_argument("--num-eval", type=int, default=8, help="held-out images")
    p.add_argument(
        "--gate-cosine", type=float, default=0.99, help="per-stage cosine vs fp32 to reach"
    )
    p.add_argument(
        "--max-excluded",
        type=int,
        default=16,
        help="most nodes per stage the sensitivity pass may keep in fp32",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm", default="w8,w4", help="decoder variants: w8, w4, w8,w4 or none")
    p.add_argument(
        "--llm-accuracy-level",
        type=int,
        choices=[0, 1, 2, 3, 4],
        default=4,
        help="MatMulNBits accuracy_level: 4 = int8 activations (fast on CPU), 0 = fp32",
    )
    p.add_argument(
        "--llm-block-size",
        type=int,
        choices=[16, 32, 64, 128, 256],
        default=32,
        help="MatMulNBits block (weights per scale): 32 = llama.cpp Q4_0's; larger decodes "
        "faster on CPU and loses accuracy (benchmarks/README.md, 'Peers')",
    )
    p.add_argument(
        "--stages", nargs="+", help="only these vision stages (default: all; none: the LLM only)"
    )
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens compared per image")
    p.add_argument("--e2e-images", type=int, default=3, help="held-out images for greedy agreement")
    p.add_argument(
        "--questions",
        help="JSONL of {image, question, answer}: also score exact-match "
        "task accuracy of fp32 and every variant",
    )
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_calibrate)


SETTINGS = (
    "method",
    "num_calib",
    "num_eval",
    "gate_cosine",
    "seed",
    "llm",
    "max_excluded",
    "prompts",
    "tokens",
    "e2e_images",
    "llm_accuracy_level",
    "llm_block_size",
    "threads",
    "questions",
)


def cmd_calibrate(args: argparse.Namespace) -> int:
    import warnings

    from calibration.calibrate import calibrate

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    settings = {name: getattr(args, name) for name in SETTINGS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = calibrate(
            args.artifacts,
            args.images,
            stages=joined(args.stages) or None,
            log=None if args.quiet else log,
            **settings,
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(report.markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    for message in report.messages:
        print(f"error: {message}", file=sys.stderr)
    return 0 if report.validated else 1
