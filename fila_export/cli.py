"""The ``fila`` command line. Heavy imports live inside commands so ``fila --help`` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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
