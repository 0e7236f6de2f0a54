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
    p.add_argument(
        "--precisions", help="one column per spec, e.g. fp32,int8,w4,int8+w4 (default: the base)"
    )
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
    load = p.add_argument_group("load on a running fila serve")
    load.add_argument("--serve", metavar="URL", help="e.g. http://127.0.0.1:8000 (this machine)")
    load.add_argument("--concurrency", default="1,2,4,8", help="streams at once, per level")
    load.add_argument("--requests", type=int, default=32, help="requests per level")
    load.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    load.add_argument("--malformed-every", type=int, default=0, help="every k-th malformed")
    p.set_defaults(func=cmd_bench)


def cmd_serve_load(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from benchmarks import serve_load

    try:
        levels = [int(c) for c in split_list(args.concurrency)]
    except ValueError as exc:
        raise FilaError(f"--concurrency takes whole numbers, e.g. 1,2,4 ({exc})") from exc
    if args.requests < 1 or min(levels) < 1:
        raise FilaError("--requests and every --concurrency level must be at least 1")
    out = serve_load.run_load(
        args.serve, levels, args.requests, args.max_tokens, args.malformed_every
    )
    out["command"] = "fila " + " ".join(sys.argv[1:])
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "serve_load.json").write_text(json.dumps(out, indent=2))
    table = serve_load.markdown(out["levels"])
    (folder / "serve_load.md").write_text(f"`{out['command']}`\n\n{table}\n")
    print(table)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks import bench, report

    if args.compare:
        print(report.compare(*args.compare))
        return 0
    if args.serve:
        return cmd_serve_load(args)
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
