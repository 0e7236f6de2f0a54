"""``fila check-trt`` (will TensorRT build every graph? no TensorRT needed) and ``fila build``
(engines from an export, or the equivalent trtexec script)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fila_export.cli.common import PRECISION_HELP, joined, split_list


def add_parsers(sub) -> None:
    p = sub.add_parser("check-trt", help="check, without TensorRT, that every graph will build")
    p.add_argument("--artifacts", required=True, help="folder written by fila export")
    p.add_argument("--trt-version", default="10.3", help="default: 10.3 (JetPack 6)")
    p.add_argument("--precision", help="only these variants, e.g. fp32,fp16 (default: all)")
    p.add_argument("--json", help="also write the findings as JSON here")
    p.set_defaults(func=cmd_check_trt)

    p = sub.add_parser("build", help="build TensorRT engines from an export")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--precision", default="fp16", help=PRECISION_HELP)
    p.add_argument("--stages", nargs="+", help="default: vision, embed and TensorRT's decoder")
    p.add_argument("--workspace-mb", type=int)
    p.add_argument(
        "--max-batch", type=int, default=1, help="decoder batch the engine is built for (default 1)"
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 layers (default: off)")
    p.add_argument("--timing-cache", help="timing cache file (read and updated)")
    p.add_argument(
        "--emit-trtexec",
        metavar="SCRIPT",
        help="write an equivalent trtexec shell script instead of building",
    )
    p.add_argument(
        "--record", action="store_true", help="write build_info.json for plans trtexec built"
    )
    p.add_argument(
        "--trt-version",
        default="10.3",
        help="with --emit-trtexec: the board's TensorRT (default 10.3; 8.6 gets --fp16/--int8 "
        "instead of --stronglyTyped)",
    )
    p.set_defaults(func=cmd_build)


def cmd_check_trt(args: argparse.Namespace) -> int:
    from fila_export.tensorrt.check import check_artifacts, load_table

    table = load_table(args.trt_version)  # unknown version: one-line error before any loading
    report = check_artifacts(args.artifacts, args.trt_version, split_list(args.precision) or None)
    for finding in report:
        print(finding.line())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
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


def cmd_build(args: argparse.Namespace) -> int:
    from fila_export.tensorrt import build

    stages = joined(args.stages) or None
    cache = Path(args.timing_cache) if args.timing_cache else None
    opts = build.BuildOptions(args.workspace_mb, cache, args.max_batch, args.tf32)
    if args.emit_trtexec:
        script = build.trtexec_script(
            args.artifacts, args.precision, stages, opts, args.trt_version
        )
        path = Path(args.emit_trtexec)
        path.write_text(script)
        path.chmod(0o755)
        print(f"wrote {path}: run it where trtexec is, from {args.artifacts}")
        return 0
    if args.record:
        print(f"wrote {build.record_engines(args.artifacts, args.precision, stages, opts)}")
        return 0
    info = build.build_engines(args.artifacts, args.precision, stages, opts)
    print(f"engines and {info} written")
    return 0
