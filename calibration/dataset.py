"""Calibration data: real images -> the inputs every vision stage really sees.

A folder of images (jpg/png/webp, searched recursively) and optional prompts are split, with a
seed, into a calibration set and a held-out set. Each image goes through the runtime's own
preprocessing and the exported **fp32** upstream stages, so ConvNeXt, every ViT segment, every
CVFM block, the projector and the fused ``vision`` graph are calibrated (and evaluated) on the
activations they will see at inference time. Activations are kept on disk (``ActivationStore``),
not in memory: a high-resolution image gives tens of MB of hidden states per stage.

Synthetic document images for tests and demos are in ``calibration.documents``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.backends import load_runner
from runtime.errors import FilaError, ImageError
from runtime.image_io import find_images, load_image
from runtime.manifest import Manifest, sha256_file
from runtime.preprocess import preprocess
from runtime.vision import image_feeds, walk_chain

DEFAULT_PROMPT = "Describe the image."


class CalibrationError(FilaError):
    """Calibration data is missing or unusable, or a quantization step cannot proceed."""


class CalibrationWarning(UserWarning):
    """Calibration went ahead with less than was asked for (fewer images, no held-out set)."""


# --- images and the split -------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord:
    path: Path
    sha256: str
    prompt: str = DEFAULT_PROMPT


@dataclass
class CalibrationSplit:
    calibration: list[ImageRecord]
    held_out: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    requested: int = 0
    seed: int = 0
    notes: list[str] = field(default_factory=list)  # the warnings that were issued

    @property
    def calibration_set_sha256(self) -> str:
        """Hash of the sorted per-file hashes: names and order do not matter, content does."""
        return hash_images(self.calibration)

    def to_dict(self) -> dict:
        return {
            "calibration_images": [str(r.path) for r in self.calibration],
            "held_out_images": [str(r.path) for r in self.held_out],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "requested_calibration_images": self.requested,
            "seed": self.seed,
            "calibration_set_sha256": self.calibration_set_sha256,
            "notes": self.notes,
        }


def hash_images(records: Sequence[ImageRecord]) -> str:
    digest = hashlib.sha256()
    for h in sorted(r.sha256 for r in records):
        digest.update(h.encode() + b"\n")
    return digest.hexdigest()


def find_image_files(folder: str | Path) -> list[Path]:
    """Every image under ``folder`` (recursive, sorted); a clear error if there are none."""
    try:
        return find_images(folder, "calibration image folder")
    except ImageError as exc:
        raise CalibrationError(str(exc)) from exc


def load_prompts(path: str | Path | None, root: Path) -> tuple[dict[str, str], list[str]]:
    """Prompts JSONL: ``{"prompt": ..., "image": "relative/path.png"}`` per line.

    Lines naming an image give that image's prompt; lines without one form a pool that is dealt
    to the other images in turn. Returns (per-image prompts keyed by resolved path, pool).
    """
    if path is None:
        return {}, []
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"prompts file {path} does not exist")
    per_image, pool = {}, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt = item["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CalibrationError(
                f'{path} line {n}: expected a JSON object with a "prompt" (and optionally '
                f'"image"), found {line[:60]!r}'
            ) from exc
        if not isinstance(prompt, str) or not prompt.strip():
            raise CalibrationError(f"{path} line {n}: the prompt is empty")
        if item.get("image"):
            per_image[str((root / item["image"]).resolve())] = prompt
        else:
            pool.append(prompt)
    return per_image, pool


def split_images(
    folder: str | Path,
    num_calib: int,
    num_eval: int = 8,
    seed: int = 0,
    prompts: str | Path | None = None,
) -> CalibrationSplit:
    """Readable images of ``folder`` split with ``seed`` into calibration and held-out sets.

    Unreadable files are skipped and counted (an error only if none remain). The held-out set is
    the first ``num_eval`` images of a seeded permutation (so it does not change with
    ``num_calib``), keeping at least one image for calibration; calibration takes up to
    ``num_calib`` of the rest, with a warning when there are fewer.
    """
    if num_calib < 1:
        raise CalibrationError(f"--num-calib must be at least 1, got {num_calib}")
    if num_eval < 0:
        raise CalibrationError(f"--num-eval must be 0 or more, got {num_eval}")
    root = Path(folder)
    files = find_image_files(root)
    per_image, pool = load_prompts(prompts, root)
    good: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for path in files:
        try:
            load_image(path)
        except ImageError as exc:
            skipped.append((str(path), str(exc)))
            continue
        good.append(path)
    notes: list[str] = []
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable image file(s) of {len(files)} in {root}")
    if not good:
        raise CalibrationError(
            f"none of the {len(files)} image file(s) in {root} could be read "
            f"(first: {skipped[0][0]}: {skipped[0][1]}); replace them with valid jpg/png/webp files"
        )
    order = np.random.default_rng(seed).permutation(len(good))
    ordered = [good[i] for i in order]
    n_eval = min(num_eval, len(good) - 1)
    held = ordered[:n_eval]
    calib = ordered[n_eval : n_eval + num_calib]
    if len(calib) < num_calib:
        notes.append(
            f"only {len(calib)} image(s) left for calibration (asked for --num-calib {num_calib}, "
            f"{len(good)} readable, {n_eval} held out); using what exists"
        )
    if not held:
        held = list(calib)
        if num_eval > 0:
            notes.append(
                "no images left for a held-out set; accuracy is measured on the "
                "calibration images (optimistic)"
            )

    def record(path: Path, index: int) -> ImageRecord:
        prompt = per_image.get(str(path.resolve()))
        if prompt is None:
            prompt = pool[index % len(pool)] if pool else DEFAULT_PROMPT
        return ImageRecord(path, sha256_file(path), prompt)

    position = {p: i for i, p in enumerate(ordered)}
    for note in notes:
        warnings.warn(note, CalibrationWarning, stacklevel=2)
    return CalibrationSplit(
        calibration=[record(p, position[p]) for p in calib],
        held_out=[record(p, position[p]) for p in held],
        skipped=skipped,
        requested=num_calib,
        seed=seed,
        notes=notes,
    )


# --- stage inputs from the fp32 upstream stages ------------------------------------------------
class ActivationStore:
    """Per (set, image, stage): the stage's inputs and its fp32 outputs, as .npz files on disk."""

    def __init__(self, root: str | Path | None = None) -> None:
        self._own = root is None
        self.root = Path(tempfile.mkdtemp(prefix="fila-calib-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.counts: dict[str, int] = {}

    def _path(self, part: str, index: int, stage: str) -> Path:
        return self.root / part / f"{index:05d}" / f"{stage}.npz"

    def put(self, part: str, index: int, stage: str, inputs: dict, outputs: dict) -> None:
        path = self._path(part, index, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"in.{k}": v for k, v in inputs.items()} | {
            f"out.{k}": v for k, v in outputs.items()
        }
        np.savez(path, **arrays)
        self.counts[part] = max(self.counts.get(part, 0), index + 1)

    def get(self, part: str, index: int, stage: str) -> tuple[dict, dict]:
        with np.load(self._path(part, index, stage)) as f:
            inputs = {k[3:]: f[k] for k in f.files if k.startswith("in.")}
            outputs = {k[4:]: f[k] for k in f.files if k.startswith("out.")}
        return inputs, outputs

    def inputs(self, part: str, stage: str, limit: int | None = None) -> Iterator[dict]:
        for i in range(min(self.counts.get(part, 0), limit or 1 << 30)):
            yield self.get(part, i, stage)[0]

    def pairs(self, part: str, stage: str, limit: int | None = None) -> Iterator[tuple[dict, dict]]:
        for i in range(min(self.counts.get(part, 0), limit or 1 << 30)):
            yield self.get(part, i, stage)

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def vision_stages(manifest: Manifest) -> list[str]:
    """The vision stages of an export: the modular chain in order, then the fused graph."""
    return manifest.vision_chain + (["vision"] if "vision" in manifest.stages else [])


def collect_stage_data(
    manifest: Manifest,
    split: CalibrationSplit,
    store: ActivationStore,
    stages: Sequence[str] | None = None,
    threads: int | None = None,
) -> ActivationStore:
    """Run every image through preprocessing and the fp32 vision stages, storing what each stage
    takes and gives. ``stages`` limits which stages are recorded (all vision stages by default);
    upstream stages still run when a later one needs their output."""
    wanted = list(stages) if stages is not None else vision_stages(manifest)
    chain = manifest.vision_chain
    last = max((chain.index(s) for s in wanted if s in chain), default=-1)
    chain = [manifest.spec(name) for name in chain[: last + 1]]
    names = [s.name for s in chain] + (["vision"] if "vision" in wanted else [])
    runners = {
        n: load_runner("onnxruntime", manifest, n, manifest.base, threads=threads) for n in names
    }
    for part, records in (("calib", split.calibration), ("eval", split.held_out)):
        for index, rec in enumerate(records):
            image = preprocess(load_image(rec.path), manifest.preprocess)
            for name, (feeds, outputs) in _stage_io(runners, chain, image).items():
                if name in wanted:
                    store.put(part, index, name, feeds, outputs)
    for runner in runners.values():
        runner.close()
    return store


def _stage_io(runners: dict, chain: list, image) -> dict[str, tuple[dict, dict]]:
    """Stage -> (what it was fed, what it gave) for one image: the fused graph, and the chain
    walked by its declared names."""
    feeds: dict[str, dict] = {}
    outputs: dict[str, dict] = {}

    def run(name: str, stage_feeds: dict) -> dict:
        outputs[name] = runners[name].infer(stage_feeds)
        return outputs[name]

    if "vision" in runners:
        feeds["vision"] = image_feeds(image)
        run("vision", feeds["vision"])
    walk_chain(chain, run, image_feeds(image), record=feeds)
    return {name: (feeds[name], outputs[name]) for name in outputs}
