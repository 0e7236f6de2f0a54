"""``fila export``: every stage (or the chosen ones) to ONNX, with a manifest."""

from __future__ import annotations

import argparse

from fila_export.cli.common import joined


def add_parsers(sub) -> None:
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


def cmd_export(args: argparse.Namespace) -> int:
    from fila_export.export.exporter import export_artifacts

    precisions = ["fp32"] + (["fp16"] if args.precision == "fp16" else [])
    manifest = export_artifacts(
        args.checkpoint,
        args.out,
        precisions=precisions,
        stages=joined(args.stages),
        force=args.force,
        max_context=args.max_context,
    )
    total = sum(s["export_seconds"] for s in manifest.stages.values())
    print(
        f"exported {len(manifest.stages)} stage(s) ({', '.join(precisions)}) to {args.out} "
        f"in {total:.1f} s"
    )
    return 0
