"""``fila export``: every stage (or the chosen ones) to ONNX, with a manifest."""

from __future__ import annotations

import argparse

from fila_export.cli.common import joined


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="export every stage to ONNX with a manifest")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16"],
        default="fp32",
        help="the precision the graphs are traced in, from weights read at it (fp16: a 2-8 B "
        "model's export holds fp16 weights only)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        help="with --dtype fp32: fp16 also writes strongly typed fp16 variants",
    )
    p.add_argument("--stages", nargs="+", help="only these stages (default: all)")
    p.add_argument("--max-context", type=int, help="decoder context (default: model's, <= 4096)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=1,
        help="decoder batch the manifest allows: TensorRT profiles, and the rows fila serve --max-batch decodes together",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from fila_export.export.exporter import export_artifacts

    precisions = list(dict.fromkeys([args.dtype, args.precision or args.dtype]))
    manifest = export_artifacts(
        args.checkpoint,
        args.out,
        precisions=precisions,
        stages=joined(args.stages),
        force=args.force,
        max_context=args.max_context,
        max_batch=args.max_batch,
    )
    total = sum(
        v["export_seconds"] for s in manifest.stages.values() for v in s["variants"].values()
    )
    print(
        f"exported {len(manifest.stages)} stage(s) ({', '.join(precisions)}) to {args.out} "
        f"in {total:.1f} s"
    )
    return 0
