"""``fila verify``: hash-check every file an export lists (a run checks only what it opens)."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    p = sub.add_parser("verify", help="hash-check every file of an export against its manifest")
    p.add_argument("artifacts", help="folder written by fila export")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from runtime.manifest import Manifest

    manifest = Manifest.load(args.artifacts)
    checked = manifest.verify()
    print(f"OK: {len(checked)} files of {args.artifacts} match manifest.json")
    return 0
