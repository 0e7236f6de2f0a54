"""The artifact manifest: the contract between export and everything that runs an export.

Written by ``fila export``, read by the runtime, the TensorRT builder and the validator. A load
reads the JSON only; each file is hash-checked the first time something opens it (a 7 B export
holds tens of GB of variants a run never touches), unless the verification record says it has not
changed since it last matched (``runtime.verified``); ``verify`` (``fila verify``) re-hashes them
all. Paths that leave the artifact folder are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ManifestError
from runtime.preprocess import PreprocessConfig
from runtime.spec import StageSpec
from runtime.verified import VerifiedFiles, sha256_file

FORMAT = 1
MANIFEST_NAME = "manifest.json"
REEXPORT = "re-export it with `fila export --checkpoint DIR --out DIR --force`"


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
    checked: set[str] = field(default_factory=set, repr=False)  # files whose hash was checked
    verified: VerifiedFiles = field(init=False, repr=False)  # files unchanged since they matched

    def __post_init__(self) -> None:
        self.verified = VerifiedFiles(self.folder)

    @property
    def hashed(self) -> list[str]:
        """The files this load hashed by reading them (the others the record vouched for)."""
        return self.verified.hashed

    # --- reading -------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read ``manifest.json`` (no file is hashed until it is opened)."""
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
        return cls(folder, data)

    def verify(self) -> list[str]:
        """Hash-check every listed file by reading it (``fila verify``: the verification record
        is refreshed, never trusted); returns what was checked."""
        self.checked.clear()
        for label, entry in self.files().items():
            self._check(label, entry, rehash=True)
        return list(self.files())

    def _check(self, label: str, entry: dict, rehash: bool = False) -> Path:
        """The file of a manifest entry, its sha256 checked once per load: by reading it, or by
        the verification record when the file is unchanged since it last matched."""
        path = safe_path(self.folder, entry["file"])
        if entry["file"] in self.checked:
            return path
        if not path.is_file():
            raise ManifestError(f"{label}: file {entry['file']} is missing; {REEXPORT}")
        name, expected = entry["file"], entry["sha256"]
        actual = self.verified.sha256(name, path, expected, rehash)
        if actual != expected:
            raise ManifestError(
                f"{label}: {name} does not match the manifest (sha256 {actual[:12]}..., "
                f"expected {expected[:12]}...): the file was changed after export; {REEXPORT}"
            )
        self.checked.add(name)
        return path

    def files(self) -> dict[str, dict]:
        """Every hashed file: stage variants and the side files (tokenizer, newline vector)."""
        out = {}
        for stage, entry in self.stages.items():
            for precision, variant in entry["variants"].items():
                out[f"stage {stage} ({precision})"] = variant
                if "external_data" in variant:
                    out[f"stage {stage} ({precision}) weights"] = variant["external_data"]
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

    @property
    def base(self) -> str:
        """The precision the export traced its graphs in (fp32, or fp16 for ``--dtype fp16``)."""
        return self.data.get("dtype", "fp32")

    def variant(self, name: str, precision: str | None = None) -> dict:
        precision = precision or self.base
        variants = self.stage(name)["variants"]
        if precision not in variants:
            raise ManifestError(
                f"stage {name!r} has no {precision} variant (it has {', '.join(variants)}); "
                f"export with --precision {precision}"
            )
        return variants[precision]

    def variants_for(self, name: str, backend: str | None = None) -> list[str]:
        """The stage's variants, those a backend can run when it is named (a variant may be
        narrower than its stage: a ``GatherBlockQuantized`` embedding is ONNX Runtime's)."""
        entry = self.stage(name)
        default = entry.get("backends", ["onnxruntime", "tensorrt"])
        return [
            v
            for v, info in entry["variants"].items()
            if backend is None or backend in info.get("backends", default)
        ]

    def stage_path(self, name: str, precision: str | None = None) -> Path:
        """The graph of one variant (default: the base precision), hash-checked with its external
        data on first use."""
        precision = precision or self.base
        variant = self.variant(name, precision)
        label = f"stage {name} ({precision})"
        if "estimated_from" in variant:
            raise ManifestError(
                f"{label} is a size estimate (fila plan --estimate), not a graph; make it with "
                f"fila calibrate --llm {precision}"
            )
        if "external_data" in variant:
            self._check(f"{label} weights", variant["external_data"])
        return self._check(label, variant)

    def file_path(self, name: str) -> Path:
        """A side file (tokenizer, newline vector), hash-checked on first use."""
        entry = self.data.get("files", {}).get(name)
        if entry is None:
            raise ManifestError(f"the manifest lists no {name!r} file; {REEXPORT}")
        return self._check(name, entry)

    def spec(self, name: str) -> StageSpec:
        """The stage's contract: inputs, outputs, axes, backends."""
        return StageSpec.from_dict(name, self.stage(name))

    @property
    def vision_chain(self) -> list[str]:
        """The modular vision stages of this export in run order (convnext, vit.0, cvfm.0, ...)."""
        return [n for n in self.data.get("vision_chain", []) if n in self.stages]

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.data["preprocess"])

    @property
    def model(self) -> dict:
        return self.data["model"]

    # --- writing -------------------------------------------------------------------------
    def save(self) -> Path:
        estimated = [
            f"{n} ({v})"
            for n, e in self.stages.items()
            for v, info in e["variants"].items()
            if "estimated_from" in info
        ]
        if estimated:
            raise ManifestError(f"will not save size estimates as variants: {', '.join(estimated)}")
        path = self.folder / MANIFEST_NAME
        path.write_text(json.dumps(self.data, indent=2))
        return path


def file_entry(folder: Path, path: Path, **extra: Any) -> dict:
    """A manifest entry for a file written into ``folder``."""
    return {"file": path.relative_to(folder).as_posix(), "sha256": sha256_file(path), **extra}
