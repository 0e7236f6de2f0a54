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
import time
from pathlib import Path

RECORD = ".fila-verified.json"
FORMAT = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# A file changed this recently may change again within the same timestamp tick (a coarse clock
# keeps ctime equal), so it is hashed but not recorded (git's "racily clean" rule).
RACY_S = 0.05


def identity(st: os.stat_result) -> list[int]:
    """What changes whenever the file's bytes do (ctime cannot be set back from user space)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def hash_stable(path: Path, keep: bool = False) -> tuple[str, list[int] | None, bytearray | None]:
    """(sha256, the identity the bytes hashed belong to, the bytes when ``keep``): hashed from
    one open file whose identity is the same before and after reading and is still the path's
    (else no identity: the file was replaced or written meanwhile, and nothing is recorded).
    Kept bytes are read into one buffer of the file's size (a plan is not held twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        st0 = os.fstat(f.fileno())
        buf = bytearray(st0.st_size) if keep else bytearray(1 << 22)
        view, offset = memoryview(buf), 0
        while True:
            chunk = view[offset : offset + (1 << 22)] if keep else view
            n = f.readinto(chunk)
            if not n:
                break
            digest.update(chunk[:n])
            offset += n if keep else 0
        after = identity(os.fstat(f.fileno()))
    st = os.stat(path)
    settled = time.time() - max(st.st_mtime, st.st_ctime) > RACY_S
    complete = not keep or offset == st0.st_size
    stable = identity(st0) == after == identity(st) and settled and complete
    return digest.hexdigest(), identity(st0) if stable else None, buf if keep else None


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
        actual, ident, _ = hash_stable(path)
        self.hashed.append(name)
        if actual == expected:
            self.remember(name, ident, actual)
        return actual

    def read(self, name: str, path: Path, expected: str) -> tuple[bytes | bytearray, str]:
        """(the file's bytes, their sha256), read once: the sha256 is ``expected`` untouched
        when the open file is the one the record vouches for, else hashed from those bytes."""
        entry = self.entries.get(name)
        if isinstance(entry, dict) and entry.get("sha256") == expected:
            with open(path, "rb") as f:
                before = identity(os.fstat(f.fileno()))
                data = f.read()
                if entry.get("identity") == before == identity(os.fstat(f.fileno())):
                    return data, expected
            del data
        data_hash, ident, data = hash_stable(path, keep=True)
        self.hashed.append(name)
        if data_hash == expected:
            self.remember(name, ident, data_hash)
        return data, data_hash

    def matches(self, name: str, path: Path, sha256: str) -> bool:
        """Whether ``path`` is unchanged since it last hashed to ``sha256``."""
        entry = self.entries.get(name)
        if not isinstance(entry, dict) or entry.get("sha256") != sha256:
            return False
        try:
            return entry.get("identity") == identity(os.stat(path))
        except OSError:
            return False

    def remember(self, name: str, ident: list[int] | None, sha256: str) -> None:
        """Record that the file with identity ``ident`` (hashed just now) matched ``sha256``;
        nothing when it changed while it was read (``ident`` None)."""
        if ident is None:
            self.entries.pop(name, None)
            return
        self.entries[name] = {"sha256": sha256, "identity": ident}
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
