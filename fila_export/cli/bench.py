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
    peers = p.add_argument_group("side by side with other engines (LLM only)")
    peers.add_argument(
        "--peers",
        help="llama.cpp,onnxruntime-genai: each converted from --checkpoint's LLM, same token ids "
        "(precisions fp32, w8, w4; contexts from --contexts; one thread unless --threads)",
    )
    peers.add_argument(
        "--llama-cpp", help="llama.cpp source tree built with cmake (or $FILA_LLAMA_CPP)"
    )
    peers.add_argument("--prefill-tokens", type=int, default=512, help="prefill length timed")
    peers.add_argument(
        "--peers-work", default="build/peers", help="where the peers' converted files are kept"
    )
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


def cmd_peers(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from benchmarks.peers import report, run

    if not (args.artifacts and args.checkpoint):
        raise FilaError("fila bench --peers needs --artifacts and --checkpoint (the LLM weights)")
    contexts = tuple(int(c) for c in split_list(args.contexts))
    vocab, eos = run.vocab_and_eos(args.artifacts)
    settings = run.PeerSettings(
        threads=args.threads or 1,
        contexts=contexts,
        decode_steps=args.decode_steps,
        prefill_tokens=args.prefill_tokens,
        rounds=args.rounds,
        check_tokens=args.answer_tokens,
        vocab=vocab,
        eos=eos,
    )
    folder = Path(args.out)
    out = run.run_peers(
        args.artifacts,
        args.checkpoint,
        split_list(args.peers),
        split_list(args.precisions or "fp32,w4"),
        settings,
        Path(args.peers_work),
        args.llama_cpp,
    )
    out["command"] = "fila " + " ".join(sys.argv[1:])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "peers.json").write_text(json.dumps(out, indent=2))
    table = report.markdown(out)
    (folder / "peers.md").write_text(f"`{out['command']}`\n\n{table}\n")
    print(table)
    if not out["fp32_same_tokens"]:
        print(
            "error: a peer's fp32 greedy tokens differ from ours (table above): the figures "
            "may not compare the same model",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks import bench, report

    if args.compare:
        print(report.compare(*args.compare))
        return 0
    if args.serve:
        return cmd_serve_load(args)
    if args.peers:
        return cmd_peers(args)
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
