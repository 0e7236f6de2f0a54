"""Checks on output folders shared by the commands that write artifacts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from runtime.errors import FilaError


class OutputError(FilaError):
    """An output folder exists already or cannot be written."""


def ensure_new_folder(path: str | Path, force: bool) -> Path:
    """Refuse to overwrite an existing folder without ``force``; check the parent is writable."""
    path = Path(path)
    if path.exists():
        if not force:
            raise OutputError(f"{path} already exists; pass --force to replace it")
        if not path.is_dir():
            raise OutputError(
                f"{path} exists and is not a folder; remove it or choose another path"
            )
        shutil.rmtree(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create {parent} ({exc.strerror}); choose a writable --out"
        ) from exc
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}; choose a writable --out")
    return path
