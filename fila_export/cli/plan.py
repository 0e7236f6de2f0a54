"""``fila plan``: the memory budget of an export on a board, before anything runs."""

from __future__ import annotations

import argparse
import json

from fila_export.cli.common import PRECISION_HELP


def add_parsers(sub) -> None:
    from runtime.plan import BOARDS

    p = sub.add_parser("plan", help="memory budget of an export on a board, before running it")
    p.add_argument("--artifacts", required=True, help="folder written by fila export")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--board", choices=list(BOARDS), help="a Jetson module")
    target.add_argument("--memory-gb", type=float, help="memory the model may use")
    p.add_argument("--precision", help=PRECISION_HELP)
    p.add_argument("--context", type=int, help="positions the KV cache holds (default: the max)")
    p.add_argument("--max-tiles", type=int, help="most sub-images per image (default: the grid's)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="plan w4/w8 variants the export lacks from the sizes of its base graphs (before "
        "fila calibrate makes them)",
    )
    p.add_argument("--json", help="also write the plan as JSON here")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from runtime.manifest import Manifest
    from runtime.plan import plan_memory, suggestions, with_target, with_weight_only_estimates
    from runtime.variants import WEIGHT_ONLY_BITS

    manifest = Manifest.load(args.artifacts)
    if args.estimate:
        manifest = with_weight_only_estimates(manifest, list(WEIGHT_ONLY_BITS))
    options = {"backend": args.backend, "precision": args.precision, "context": args.context}
    options["max_tiles"] = args.max_tiles
    plan = with_target(plan_memory(manifest, **options), args.board, args.memory_gb)
    print(
        f"# Memory plan: {args.artifacts} on {args.backend}"
        + (f", {plan.target}" if plan.target else "")
    )
    print()
    print(plan.table())
    if plan.fits is not None:
        left = (plan.available - plan.total) / 1e6
        print()
        if plan.fits:
            print(f"FITS: {left:,.0f} MB to spare")
        else:
            print(f"DOES NOT FIT: {-left:,.0f} MB over. Changes that would fit:")
            for line in suggestions(manifest, options, plan.available):
                print(f"- {line}")
            if args.estimate:
                print("(w4/w8 sizes estimated: fila calibrate --llm makes those variants)")
    if args.json:
        record = {"terms": [vars(t) for t in plan.terms], "total": plan.total}
        record |= {"available": plan.available, "fits": plan.fits, "target": plan.target}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0 if plan.fits in (None, True) else 1
