"""``fila init`` (a deterministic random checkpoint) and ``fila generate`` (the PyTorch reference)."""

from __future__ import annotations

import argparse
import json

from fila_export.cli.common import add_sampling, sampling


def add_parsers(sub) -> None:
    p = sub.add_parser("init", help="create a deterministic random checkpoint from a preset")
    p.add_argument("--preset", choices=["tiny", "small", "edge", "paper"], default="tiny")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="weight dtype of the checkpoint (written tensor by tensor into <= 2 GB shards)",
    )
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="answer with the PyTorch reference model")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", action="append", required=True, help="image path (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw-prompt", action="store_true", help="skip the chat template")
    p.add_argument("--json", action="store_true", help="also print a JSON line")
    add_sampling(p, max_new_tokens=32)
    p.set_defaults(func=cmd_generate)


def cmd_init(args: argparse.Namespace) -> int:
    from fila_export.folders import ensure_new_folder
    from fila_export.model.checkpoint import init_checkpoint

    ensure_new_folder(args.out, args.force)
    path = init_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype)
    print(f"wrote {args.preset} checkpoint ({args.dtype}, seed {args.seed}) to {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fila_export.model.reference import ReferencePipeline
    from runtime.generate import check_max_new_tokens

    params = sampling(args)
    check_max_new_tokens(args.max_new_tokens)
    options = {"repetition_penalty": params.repetition_penalty}
    if not params.greedy:
        options |= {
            "do_sample": True,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "seed": params.seed if params.seed is not None else 0,
        }
    pipe = ReferencePipeline.from_checkpoint(args.checkpoint)
    result = pipe.generate(
        args.image,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        raw_prompt=args.raw_prompt,
        **options,
    )
    print(result.text)
    if args.json:
        record = {
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_token_ids": result.prompt_token_ids,
            "backend": "torch",
        }
        print(json.dumps(record))
    return 0
