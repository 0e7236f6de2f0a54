"""``fila validate``: per-stage and greedy-token parity against PyTorch, or (``--questions``)
exact-match task accuracy of PyTorch and each exported precision."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fila_export.cli.common import PRECISION_HELP, split_list
from runtime.errors import FilaError


def add_parsers(sub) -> None:
    p = sub.add_parser("validate", help="per-stage and end-to-end parity against PyTorch")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--checkpoint", help="the PyTorch checkpoint (not with --reference)")
    p.add_argument(
        "--record",
        action="store_true",
        help="store PyTorch's stage outputs and greedy tokens in ARTIFACTS/reference/ for "
        "--reference",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="validate against the recorded reference instead of PyTorch (no torch needed)",
    )
    p.add_argument("--images", help="folder of real images (default: the demo's photos)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--precision", help=PRECISION_HELP + " (default: the export's base)")
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


def cmd_validate(args: argparse.Namespace) -> int:
    if args.reference:
        return validate_reference(args)
    if not args.checkpoint:
        raise FilaError(
            "fila validate needs --checkpoint (the PyTorch model), or --reference to compare "
            "with what fila validate --record stored next to the export"
        )
    if args.record:
        return record(args)
    if args.questions:
        return validate_answers(args)
    from fila_export.validation.parity import validate
    from runtime.parity import write_json

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


def record(args: argparse.Namespace) -> int:
    from fila_export.validation.record import record_reference

    folder = record_reference(
        args.artifacts, args.checkpoint, args.images, args.tokens, args.max_images
    )
    print(f"recorded the PyTorch reference in {folder}: fila validate --reference checks it")
    return 0


def validate_reference(args: argparse.Namespace) -> int:
    """``fila validate --reference``: parity against the recorded bundle, torch not needed."""
    from runtime.parity import write_json
    from runtime.reference import check_reference

    report = check_reference(args.artifacts, backend=args.backend, precision=args.precision)
    print(report.markdown())
    if args.json:
        write_json(report, args.json)
    return 0 if report.passed else 1


def validate_answers(args: argparse.Namespace) -> int:
    """``fila validate --questions``: exact-match answer accuracy, PyTorch vs the export."""
    from fila_export.validation.accuracy import accuracy_markdown, answer_accuracy

    report = answer_accuracy(
        args.questions,
        args.checkpoint,
        args.artifacts,
        split_list(args.precisions or args.precision),
        backend=args.backend,
        max_new_tokens=args.tokens,
        limit=args.limit,
        **({"threads": args.threads} if args.threads else {}),
    )
    print(accuracy_markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1
