"""Which files of an export matched their sha256, and as what: a start skips re-hashing a file
whose size, modification and change times, inode and device are what they were when it last
matched (``edge``'s shared weight file alone is 2-4 GB: tens of seconds on a board's eMMC at every
``fila run`` / ``fila serve`` start). Any change to the file changes its ctime, which no user
call can set back, so a changed file is hashed again and refused; ``fila verify`` re-hashes all.

The record is ``.fila-verified.json`` in the artifact folder, or, where that folder is read-only,
one file per folder under ``$XDG_CACHE_HOME/fila/verified/``. A record that cannot be written is
no error: the next start hashes again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

RECORD = ".fila-verified.json"
FORMAT = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def identity(path: Path) -> list[int]:
    """What changes whenever the file's bytes do (ctime cannot be set back from user space)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def cache_record(folder: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    return base / "fila" / "verified" / f"{key}.json"


class VerifiedFiles:
    """The record of one artifact folder: file name -> (identity, sha256) when it last matched."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.entries: dict[str, dict] = {}
        self.hashed: list[str] = []  # the files read to hash them, in order
        for path in (self.folder / RECORD, cache_record(self.folder)):
            self.entries = self._read(path)
            if self.entries:
                break

    @staticmethod
    def _read(path: Path) -> dict[str, dict]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return {}
        files = data.get("files")
        return files if isinstance(files, dict) else {}

    def sha256(self, name: str, path: Path, expected: str, rehash: bool = False) -> str:
        """``path``'s sha256: ``expected`` without reading the file when the record says it is
        unchanged since it last hashed to that (unless ``rehash``), else read and hashed (and
        recorded when it matches). The caller compares it with ``expected``."""
        if not rehash and self.matches(name, path, expected):
            return expected
        actual = sha256_file(path)
        self.hashed.append(name)
        if actual == expected:
            self.remember(name, path, actual)
        return actual

    def matches(self, name: str, path: Path, sha256: str) -> bool:
        """Whether ``path`` is unchanged since it last hashed to ``sha256``."""
        entry = self.entries.get(name)
        if not isinstance(entry, dict) or entry.get("sha256") != sha256:
            return False
        try:
            return entry.get("identity") == identity(path)
        except OSError:
            return False

    def remember(self, name: str, path: Path, sha256: str) -> None:
        """Record that ``path`` (hashed just now) matched ``sha256``."""
        try:
            self.entries[name] = {"sha256": sha256, "identity": identity(path)}
        except OSError:
            return
        body = json.dumps({"format": FORMAT, "files": self.entries}, indent=1)
        for target in (self.folder / RECORD, cache_record(self.folder)):
            if _write(target, body):
                return


def _write(path: Path, text: str) -> bool:
    """Atomically (a reader sees the old record or the new one); False when it cannot."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
