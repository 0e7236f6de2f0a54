"""The artifact manifest: the contract between export and everything that runs an export.

Written by ``fila export``, read by the runtime, the TensorRT builder and the validator. Loading
verifies every file's sha256 and refuses paths that leave the artifact folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ManifestError
from runtime.preprocess import PreprocessConfig

FORMAT = 1
MANIFEST_NAME = "manifest.json"
REEXPORT = "re-export it with `fila export --checkpoint DIR --out DIR --force`"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_path(folder: Path, name: str) -> Path:
    """``folder / name``, refusing absolute names, ``..`` and links that lead outside."""
    path = (folder / name).resolve()
    root = folder.resolve()
    if Path(name).is_absolute() or (path != root and root not in path.parents):
        raise ManifestError(
            f"manifest names {name!r}, which is outside the artifact folder {folder}; {REEXPORT}"
        )
    return path


@dataclass
class Manifest:
    folder: Path
    data: dict[str, Any]

    # --- reading -------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Manifest:
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ManifestError(f"artifact folder {folder} does not exist; run `fila export` first")
        if not path.is_file():
            raise ManifestError(f"{path} not found: {folder} is not an export; {REEXPORT}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc}); {REEXPORT}") from exc
        if data.get("format") != FORMAT:
            raise ManifestError(
                f"{path} has format {data.get('format')!r}, this toolkit reads format {FORMAT}; "
                f"{REEXPORT}"
            )
        for key in ("stages", "preprocess", "model"):
            if key not in data:
                raise ManifestError(f"{path} has no {key!r} section; {REEXPORT}")
        manifest = cls(folder, data)
        if verify:
            manifest.verify()
        return manifest

    def verify(self) -> None:
        """Every listed file exists inside the folder and has the recorded sha256."""
        for name, entry in self.files().items():
            path = safe_path(self.folder, entry["file"])
            if not path.is_file():
                raise ManifestError(f"{name}: file {entry['file']} is missing; {REEXPORT}")
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise ManifestError(
                    f"{name}: {entry['file']} does not match the manifest (sha256 {actual[:12]}..., "
                    f"expected {entry['sha256'][:12]}...): the file was changed after export; "
                    f"{REEXPORT}"
                )

    def files(self) -> dict[str, dict]:
        """Every hashed file: stage variants and the side files (tokenizer, newline vector)."""
        out = {}
        for stage, entry in self.stages.items():
            for precision, variant in entry["variants"].items():
                out[f"stage {stage} ({precision})"] = variant
        for name, entry in self.data.get("files", {}).items():
            out[name] = entry
        return out

    # --- access --------------------------------------------------------------------------
    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def stage(self, name: str) -> dict:
        if name not in self.stages:
            raise ManifestError(
                f"stage {name!r} is not in this export (it has {', '.join(self.stages)}); "
                "export it with `fila export --stages ...`"
            )
        return self.stages[name]

    def variant(self, name: str, precision: str = "fp32") -> dict:
        variants = self.stage(name)["variants"]
        if precision not in variants:
            raise ManifestError(
                f"stage {name!r} has no {precision} variant (it has {', '.join(variants)}); "
                f"export with --precision {precision}"
            )
        return variants[precision]

    def stage_path(self, name: str, precision: str = "fp32") -> Path:
        return safe_path(self.folder, self.variant(name, precision)["file"])

    def file_path(self, name: str) -> Path:
        entry = self.data.get("files", {}).get(name)
        if entry is None:
            raise ManifestError(f"the manifest lists no {name!r} file; {REEXPORT}")
        return safe_path(self.folder, entry["file"])

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.data["preprocess"])

    @property
    def model(self) -> dict:
        return self.data["model"]

    # --- writing -------------------------------------------------------------------------
    def save(self) -> Path:
        path = self.folder / MANIFEST_NAME
        path.write_text(json.dumps(self.data, indent=2))
        return path


def file_entry(folder: Path, path: Path, **extra: Any) -> dict:
    """A manifest entry for a file written into ``folder``."""
    return {"file": path.relative_to(folder).as_posix(), "sha256": sha256_file(path), **extra}
