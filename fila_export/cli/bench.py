"""``fila bench``: latency, throughput, memory per stage and backend (``benchmarks/``), and
``--compare`` of two result files."""

from __future__ import annotations

import argparse
import sys

from fila_export.cli.common import split_list
from runtime.errors import FilaError


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="latency, throughput, memory per stage and backend")
    p.add_argument("--artifacts")
    p.add_argument("--checkpoint", help="for the PyTorch eager baseline (backend torch)")
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--precisions", help="one column per spec, e.g. fp32,w4 (default: the base)")
    p.add_argument("--images", help="folder; the first image is used (default: demo photos)")
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="intra-op threads for torch and onnxruntime")
    p.add_argument(
        "--providers",
        help="ONNX Runtime execution providers in order, e.g. cuda,cpu or tensorrt,cuda,cpu "
        "(default: cpu; on a Jetson needs onnxruntime-gpu)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="sample each stage and decode context at least this long (more runs for short "
        "stages: steadier p50s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="fresh processes per column, the columns taking turns; each p50 pools all rounds "
        "(steady on a shared machine)",
    )
    p.add_argument(
        "--decoders",
        default="auto",
        help="onnxruntime decoder graph(s): auto, gqa, portable, or gqa,portable for one "
        "column each",
    )
    p.add_argument("--out", default="benchmarks/results/latest")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks import bench, report

    if args.compare:
        print(report.compare(*args.compare))
        return 0
    if not args.artifacts:
        raise FilaError("fila bench needs --artifacts (or --compare A.json B.json)")
    try:
        contexts = [int(c) for c in split_list(args.contexts)]
    except ValueError as exc:
        raise FilaError(f"--contexts takes whole numbers, e.g. 128,512 ({exc})") from exc
    out = bench.run_bench(
        args.artifacts,
        args.checkpoint,
        split_list(args.backends),
        split_list(args.precisions),
        images=args.images,
        contexts=contexts,
        warmup=args.warmup,
        runs=args.runs,
        decode_steps=args.decode_steps,
        answer_tokens=args.answer_tokens,
        threads=args.threads,
        decoders=split_list(args.decoders),
        min_seconds=args.min_seconds,
        rounds=args.rounds,
        providers=split_list(args.providers) if args.providers else None,
    )
    out["command"] = "fila " + " ".join(sys.argv[1:])
    paths = bench.save(out, args.out)
    print(report.markdown(out))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
