"""``fila serve``: the OpenAI-compatible chat-completions server (``runtime.serve``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fila_export.cli.common import add_backend, load_pipeline

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible chat-completions server")
    add_backend(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients ask for (default: the folder name)")
    p.add_argument("--max-queue", type=int, default=16, help="waiting requests before a 429")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest image accepted")
    p.add_argument("--image-root", help="folder whose files requests may name by path")
    p.add_argument("--no-reuse", action="store_true", help="no image-feature or prefix cache")
    p.add_argument(
        "--max-batch",
        type=int,
        default=1,
        help="requests decoded together (continuous batching; needs an export made with "
        "fila export --max-batch N or more; turns prefix reuse off)",
    )
    p.set_defaults(func=cmd_serve)


def check_serve_args(args: argparse.Namespace) -> None:
    from runtime.errors import ParameterError

    if not 0 < args.port < 65536:
        raise ParameterError(f"--port must be 1-65535, got {args.port}")
    if args.max_queue < 1:
        raise ParameterError(f"--max-queue must be at least 1, got {args.max_queue}")
    if not 1 <= args.max_batch <= 64:
        raise ParameterError(f"--max-batch must be 1-64, got {args.max_batch}")
    if args.max_image_mb <= 0:
        raise ParameterError(f"--max-image-mb must be positive, got {args.max_image_mb}")
    if args.image_root and not Path(args.image_root).is_dir():
        raise ParameterError(f"--image-root {args.image_root} is not a folder")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from runtime.reuse import Reuse
    from runtime.serve.app import create_app
    from runtime.serve.engine import Settings

    check_serve_args(args)
    settings = Settings(
        max_queue=args.max_queue,
        max_image_bytes=int(args.max_image_mb * 2**20),
        image_root=Path(args.image_root) if args.image_root else None,
        max_batch=args.max_batch,
    )
    pipeline = load_pipeline(args)
    name = args.model_name or Path(args.artifacts).resolve().name
    reuse = Reuse(features=None, prefixes=None) if args.no_reuse else Reuse()
    if args.host not in LOOPBACK:
        print(
            f"fila serve: listening on {args.host}, not loopback: anyone who can reach it "
            "can use the model",
            file=sys.stderr,
        )
    with pipeline:
        app = create_app(pipeline, name, settings, reuse)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
