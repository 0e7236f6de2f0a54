"""The ``fila`` command line. Heavy imports live inside commands so ``fila --help`` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime.errors import FilaError


def cmd_init(args: argparse.Namespace) -> int:
    from fila_export.checkpoint import init_checkpoint
    from fila_export.errors_io import ensure_new_folder

    ensure_new_folder(args.out, args.force)
    path = init_checkpoint(args.preset, args.out, seed=args.seed)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fila_export.reference import ReferencePipeline

    pipe = ReferencePipeline.from_checkpoint(args.checkpoint)
    sampling = {}
    if args.temperature and args.temperature > 0:
        sampling = {
            "do_sample": True,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
        }
    result = pipe.generate(
        args.image,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        raw_prompt=args.raw_prompt,
        **sampling,
    )
    print(result.text)
    if args.json:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "prompt_token_ids": result.prompt_token_ids,
                    "backend": "torch",
                }
            )
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fila_export.export import export_artifacts

    stages = [s for part in args.stages or [] for s in part.split(",") if s]
    precisions = ["fp32"] + (["fp16"] if args.precision == "fp16" else [])
    manifest = export_artifacts(
        args.checkpoint,
        args.out,
        precisions=precisions,
        stages=stages,
        force=args.force,
        max_context=args.max_context,
    )
    total = sum(s["export_seconds"] for s in manifest.stages.values())
    print(
        f"exported {len(manifest.stages)} stage(s) ({', '.join(precisions)}) to {args.out} "
        f"in {total:.1f} s"
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from fila_export.validate import validate, write_json

    if args.questions:
        return _validate_answers(args)
    report = validate(
        args.artifacts,
        args.checkpoint,
        args.images,
        backend=args.backend,
        precision=args.precision,
        tokens=args.tokens,
        max_images=args.max_images,
    )
    print(report.markdown())
    if args.json:
        write_json(report, args.json)
    return 0 if report.passed else 1


def _validate_answers(args: argparse.Namespace) -> int:
    """``fila validate --questions``: exact-match answer accuracy, PyTorch vs the export."""
    from fila_export.validate import accuracy_markdown, answer_accuracy

    precisions = [p for p in (args.precisions or args.precision).split(",") if p]
    report = answer_accuracy(
        args.questions,
        args.checkpoint,
        args.artifacts,
        precisions,
        backend=args.backend,
        max_new_tokens=args.tokens,
        limit=args.limit,
        **({"threads": args.threads} if args.threads else {}),
    )
    print(accuracy_markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def cmd_check_trt(args: argparse.Namespace) -> int:
    from fila_export.trt_check import check_artifacts, load_table

    table = load_table(args.trt_version)  # unknown version: one-line error before any loading
    precisions = [p for p in (args.precision or "").split(",") if p] or None
    report = check_artifacts(args.artifacts, args.trt_version, precisions=precisions)
    for finding in report:
        print(finding.line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    kinds = ", ".join(dict.fromkeys(p for _, p in report.graphs))
    if report.skipped:
        print(f"not checked (ONNX Runtime only): {', '.join(report.skipped)}")
    if report:
        bad = len({(f.stage, f.precision) for f in report})
        print(
            f"{len(report)} finding(s) in {bad} of {len(report.graphs)} graphs ({kinds}): "
            f"TensorRT {table['tensorrt']} would not build this export as it is"
        )
        return 1
    print(
        f"OK: {len(report.graphs)} graphs ({kinds}) in {args.artifacts} build with TensorRT "
        f"{table['tensorrt']} (checked against onnx-tensorrt's operator table, no TensorRT run)"
    )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import warnings

    from calibration.calibrate import calibrate

    stages = [s for part in args.stages or [] for s in part.split(",") if s] or None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = calibrate(
            args.artifacts,
            args.images,
            method=args.method,
            num_calib=args.num_calib,
            num_eval=args.num_eval,
            gate_cosine=args.gate_cosine,
            seed=args.seed,
            llm=args.llm,
            max_excluded=args.max_excluded,
            stages=stages,
            prompts=args.prompts,
            tokens=args.tokens,
            e2e_images=args.e2e_images,
            llm_accuracy_level=args.llm_accuracy_level,
            threads=args.threads,
            questions=args.questions,
            log=None if args.quiet else log,
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(report.markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    for message in report.messages:
        print(f"error: {message}", file=sys.stderr)
    return 0 if report.validated else 1


def _sampling(args: argparse.Namespace) -> dict:
    return {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
    }


def cmd_run(args: argparse.Namespace) -> int:
    from runtime.pipeline import FilaPipeline

    pipe = FilaPipeline.from_artifacts(
        args.artifacts,
        backend=args.backend,
        precision=args.precision,
        decoder=args.decoder,
        **_runner_options(args),
    )
    stream = None if args.quiet else (lambda piece: print(piece, end="", flush=True))
    result = pipe.generate(
        args.image,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        raw_prompt=args.raw_prompt,
        stop=args.stop or (),
        on_text=stream,
        **_sampling(args),
    )
    if stream:
        print()
    elif not args.json:
        print(result.text)
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn session on one image: each turn sees the earlier questions and answers."""
    from runtime.errors import FilaError as _FilaError
    from runtime.pipeline import FilaPipeline

    pipe = FilaPipeline.from_artifacts(
        args.artifacts,
        backend=args.backend,
        precision=args.precision,
        decoder=args.decoder,
        **_runner_options(args),
    )
    history: list[tuple[str, str]] = []
    print("fila chat: type a question, an empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            question = input("> ")
        except EOFError:
            break
        if not question.strip():
            break
        try:
            result = pipe.generate(
                args.image,
                question,
                max_new_tokens=args.max_new_tokens,
                history=history,
                on_text=lambda p: print(p, end="", flush=True),
                **_sampling(args),
            )
        except _FilaError as exc:  # keep the session alive: report and take the next question
            print(f"error: {exc}", file=sys.stderr)
            continue
        print()
        if not history:
            question = "<image>\n" + question
        history.append((question, result.text))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from fila_export import trt_build

    stages = [s for part in args.stages or [] for s in part.split(",") if s] or None
    if args.emit_trtexec:
        script = trt_build.trtexec_script(args.artifacts, args.precision, stages, args.workspace_mb)
        path = Path(args.emit_trtexec)
        path.write_text(script)
        path.chmod(0o755)
        print(f"wrote {path}: run it where trtexec is, from {args.artifacts}")
        return 0
    if args.record:
        print(f"wrote {trt_build.record_engines(args.artifacts, args.precision, stages)}")
        return 0
    info = trt_build.build_engines(
        args.artifacts, args.precision, stages, args.workspace_mb, args.timing_cache
    )
    print(f"engines and {info} written")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks import bench, report

    if args.compare:
        print(report.compare(*args.compare))
        return 0
    if not args.artifacts:
        raise FilaError("fila bench needs --artifacts (or --compare A.json B.json)")

    def split(text: str) -> list:
        return [x for x in text.split(",") if x]

    out = bench.run_bench(
        args.artifacts,
        args.checkpoint,
        split(args.backends),
        split(args.precisions),
        images=args.images,
        contexts=[int(c) for c in split(args.contexts)],
        warmup=args.warmup,
        runs=args.runs,
        decode_steps=args.decode_steps,
        answer_tokens=args.answer_tokens,
        threads=args.threads,
        decoders=split(args.decoders),
        min_seconds=args.min_seconds,
        rounds=args.rounds,
    )
    out["command"] = "fila " + " ".join(sys.argv[1:])
    paths = bench.save(out, args.out)
    print(report.markdown(out))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _runner_options(args: argparse.Namespace) -> dict:
    opts = {}
    if args.backend == "onnxruntime":
        if args.providers:
            opts["providers"] = args.providers.split(",")
        if args.threads:
            opts["threads"] = args.threads
    return opts


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", required=True, help="folder written by fila export")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument(
        "--precision",
        default="fp32",
        help="stage variants: fp32, fp16, int8, w8, w4; a list (int8,w4: each stage "
        "takes the first it has) or per stage (vision=int8,decoder=w4)",
    )
    p.add_argument("--providers", help="onnxruntime providers, e.g. cuda,cpu (default: cpu)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument(
        "--decoder",
        choices=["auto", "gqa", "portable"],
        default="auto",
        help="decoder graph: gqa (onnxruntime's in-place GroupQueryAttention), portable "
        "(standard ONNX, what TensorRT builds); auto: gqa on onnxruntime",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fila", description="Export, build, run, validate and benchmark FILA models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a deterministic random checkpoint from a preset")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="answer with the PyTorch reference model")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", action="append", required=True, help="image path (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-prompt", action="store_true", help="skip the chat template")
    p.add_argument("--json", action="store_true", help="also print a JSON line")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export every stage to ONNX with a manifest")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="fp16 also writes strongly typed fp16 variants",
    )
    p.add_argument("--stages", nargs="+", help="only these stages (default: all)")
    p.add_argument("--max-context", type=int, help="decoder context (default: model's, <= 4096)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="build TensorRT engines from an export")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    p.add_argument("--stages", nargs="+", help="default: vision, embed, decoder")
    p.add_argument("--workspace-mb", type=int)
    p.add_argument("--timing-cache", help="timing cache file (read and updated)")
    p.add_argument(
        "--emit-trtexec",
        metavar="SCRIPT",
        help="write an equivalent trtexec shell script instead of building",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="write build_info.json for plans the trtexec script built",
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("bench", help="latency, throughput, memory per stage and backend")
    p.add_argument("--artifacts")
    p.add_argument("--checkpoint", help="for the PyTorch eager baseline (backend torch)")
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--precisions", default="fp32")
    p.add_argument("--images", help="folder; the first image is used (default: examples/)")
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="intra-op threads for torch and onnxruntime")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="sample each stage and decode "
        "context at least this long (more runs for short stages: steadier p50s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="fresh processes per column, the columns "
        "taking turns; each p50 pools all rounds (steady on a shared machine)",
    )
    p.add_argument(
        "--decoders",
        default="auto",
        help="onnxruntime decoder graph(s): auto, gqa, "
        "portable, or gqa,portable for one column each",
    )
    p.add_argument("--out", default="benchmarks/results/latest")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("validate", help="per-stage and end-to-end parity against PyTorch")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", help="folder of real images (default: examples/)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens compared per image")
    p.add_argument("--max-images", type=int, default=3)
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument(
        "--questions",
        help="JSONL of {image, question, answer}: score exact-match "
        "answers of PyTorch fp32 and the export instead of stage parity",
    )
    p.add_argument("--precisions", help="with --questions: e.g. fp32,fp16,int8,w8,w4")
    p.add_argument("--limit", type=int, help="with --questions: only the first N questions")
    p.add_argument("--threads", type=int, help="with --questions: onnxruntime intra-op threads")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("calibrate", help="INT8 vision and weight-only INT8/INT4 decoder variants")
    p.add_argument("--artifacts", required=True, help="folder written by fila export (updated)")
    p.add_argument("--images", required=True, help="folder of real images (jpg/png/webp)")
    p.add_argument("--prompts", help='JSONL of {"prompt": ..., "image": optional path}')
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--num-calib", type=int, default=32, help="calibration images")
    p.add_argument("--num-eval", type=int, default=8, help="held-out images")
    p.add_argument(
        "--gate-cosine",
        type=float,
        default=0.99,
        help="per-stage cosine vs fp32 a variant must reach",
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
    p.add_argument("--stages", nargs="+", help="only these vision stages (default: all)")
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

    p = sub.add_parser("check-trt", help="check, without TensorRT, that every graph will build")
    p.add_argument("--artifacts", required=True, help="folder written by fila export")
    p.add_argument("--trt-version", default="10.3", help="default: 10.3 (JetPack 6)")
    p.add_argument("--precision", help="only these variants, e.g. fp32,fp16 (default: all)")
    p.add_argument("--json", help="also write the findings as JSON here")
    p.set_defaults(func=cmd_check_trt)

    p = sub.add_parser("run", help="answer with the torch-free runtime (streams text)")
    _add_backend(p)
    p.add_argument("--image", action="append", required=True, help="image path (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--raw-prompt",
        action="store_true",
        help="no chat template; <image> stays where written (first if absent)",
    )
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    p.add_argument("--quiet", action="store_true", help="no streaming")
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="multi-turn session on one image")
    _add_backend(p)
    p.add_argument("--image", required=True)
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FilaError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
