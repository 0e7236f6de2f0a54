"""``fila run`` (one answer, streamed) and ``fila chat`` (multi-turn on one image): the torch-free
runtime on ONNX Runtime or TensorRT."""

from __future__ import annotations

import argparse
import json
import sys

from fila_export.cli.common import add_backend, add_sampling, load_pipeline, sampling


def add_parsers(sub) -> None:
    p = sub.add_parser("run", help="answer with the torch-free runtime (streams text)")
    add_backend(p)
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
    add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="multi-turn session on one image")
    add_backend(p)
    p.add_argument("--image", required=True)
    add_sampling(p)
    p.set_defaults(func=cmd_chat)


def cmd_run(args: argparse.Namespace) -> int:
    params = sampling(args)  # out-of-range values are refused before anything loads
    stream = None if args.quiet else (lambda piece: print(piece, end="", flush=True))
    with load_pipeline(args) as pipe:
        result = pipe.generate(
            args.image,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            sampling=params,
            raw_prompt=args.raw_prompt,
            stop=args.stop or (),
            on_text=stream,
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
    params = sampling(args)
    with load_pipeline(args) as pipe:
        chat_turns(args, pipe, params)
    return 0


def chat_turns(args: argparse.Namespace, pipe, params) -> None:
    """Questions from stdin until an empty line or EOF; a failed turn is reported, not fatal."""
    from runtime.errors import FilaError
    from runtime.reuse import Reuse

    reuse = Reuse()  # the image is encoded once; each turn prefills only what is new
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
                sampling=params,
                history=history,
                on_text=lambda p: print(p, end="", flush=True),
                reuse=reuse,
            )
        except FilaError as exc:  # keep the session alive: report and take the next question
            print(f"error: {exc}", file=sys.stderr)
            continue
        print()
        history.append((question, result.text))
