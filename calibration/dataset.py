"""Calibration data: real images -> the inputs every vision stage really sees.

A folder of images (jpg/png/webp, searched recursively) and optional prompts are split, with a
seed, into a calibration set and a held-out set. Each image goes through the runtime's own
preprocessing and the exported **fp32** upstream stages, so ConvNeXt, every ViT segment, every
CVFM block, the projector and the fused ``vision`` graph are calibrated (and evaluated) on the
activations they will see at inference time. Activations are kept on disk (``ActivationStore``),
not in memory: a high-resolution image gives tens of MB of hidden states per stage.

Also here: a generator of synthetic document-style images (text, tables, small print across tile
boundaries), for tests and the demo (``python -m calibration.dataset OUT --count 24``).
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
from PIL import Image

from runtime.errors import FilaError, ImageError
from runtime.image_io import load_image
from runtime.manifest import Manifest, sha256_file
from runtime.preprocess import preprocess

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
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
    """Every jpg/png/webp under ``folder`` (recursive, sorted); a clear error if there are none."""
    root = Path(folder)
    if not root.exists():
        raise CalibrationError(
            f"calibration image folder {root} does not exist; pass --images DIR with real images "
            "(jpg/png/webp) like the ones the model will see"
        )
    if not root.is_dir():
        raise CalibrationError(f"--images {root} is a file; pass the folder that holds the images")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise CalibrationError(
            f"no images (jpg/png/webp) in {root} or its subfolders; add real images to calibrate on"
        )
    return found


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
    chain = [s for s in manifest.data.get("vision_chain", []) if s in manifest.stages]
    return chain + (["vision"] if "vision" in manifest.stages else [])


def collect_stage_data(
    manifest: Manifest,
    split: CalibrationSplit,
    store: ActivationStore,
    stages: Sequence[str] | None = None,
    threads: int | None = None,
    progress=None,
) -> ActivationStore:
    """Run every image through preprocessing and the fp32 vision stages, storing what each stage
    takes and gives. ``stages`` limits which stages are recorded (all vision stages by default);
    upstream stages still run when a later one needs their output."""
    from runtime.backends.onnxruntime import OrtRunner

    wanted = list(stages) if stages is not None else vision_stages(manifest)
    chain = [s for s in manifest.data.get("vision_chain", []) if s in manifest.stages]
    last = max((chain.index(s) for s in wanted if s in chain), default=-1)
    run_chain = chain[: last + 1]
    runners = {
        name: OrtRunner(manifest.stage_path(name, "fp32"), name=name, threads=threads)
        for name in [*run_chain, *(["vision"] if "vision" in wanted else [])]
    }
    cfg = manifest.preprocess
    for part, records in (("calib", split.calibration), ("eval", split.held_out)):
        for index, rec in enumerate(records):
            image = preprocess(load_image(rec.path), cfg)
            if "vision" in runners:
                feeds = {"pixel_values": image.pixel_values}
                if image.global_view is not None:
                    feeds["global_view"] = image.global_view
                feeds = _known_inputs(runners["vision"], feeds)
                store.put(part, index, "vision", feeds, runners["vision"].infer(feeds))
            maps: dict[str, np.ndarray] = {}
            hidden = None
            for name in run_chain:
                if name == "convnext":
                    feeds = {"global_view": image.global_view}
                elif name == "vit.0":
                    feeds = {"pixel_values": image.pixel_values}
                elif name.startswith("vit."):
                    feeds = {"hidden": hidden}
                elif name.startswith("cvfm."):
                    k = name.split(".")[1]
                    feeds = {"hidden": hidden, f"stage{k}": maps[f"stage{k}"]}
                else:  # projector
                    feeds = {"hidden": hidden}
                out = runners[name].infer(feeds)
                if name == "convnext":
                    maps = out
                else:
                    hidden = out.get("hidden_out", hidden)
                if name in wanted:
                    store.put(part, index, name, feeds, out)
            if progress is not None:
                progress(part, index, rec)
    return store


def _known_inputs(runner, feeds: dict) -> dict:
    names = {m.name for m in runner.inputs}
    return {k: v for k, v in feeds.items() if k in names}


# --- synthetic document images ----------------------------------------------------------------
WORDS = (
    "invoice total amount date account balance payment due net tax rate unit price quantity "
    "item description customer order number reference page section table figure report annual "
    "revenue cost margin quarter region north south east west sample result value mean median "
    "error limit signal device memory latency throughput model layer token vision encoder"
).split()
SIZES = ((600, 800), (800, 600), (1100, 850), (850, 1100), (1400, 700), (700, 1400), (900, 900))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _sentence(rng: np.random.Generator, n: int) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n)]
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", ":", ";", ""])


def make_document(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """A document-style RGB image: title, paragraphs, a ruled table with numbers, and lines of
    small print placed across the half and third lines where anyres tiles are cut."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size or SIZES[int(rng.integers(len(SIZES)))]
    paper = tuple(int(v) for v in rng.integers(232, 256, 3))
    image = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(image)
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    accent = tuple(int(v) for v in rng.integers(40, 200, 3))
    margin = int(w * rng.uniform(0.04, 0.08))
    y = margin
    draw.text(
        (margin, y),
        _sentence(rng, int(rng.integers(2, 5))).upper(),
        fill=accent,
        font=_font(int(h * 0.04)),
    )
    y += int(h * 0.07)
    body = _font(int(rng.integers(12, 20)))
    while y < h * 0.4:
        draw.text((margin, y), _sentence(rng, int(rng.integers(6, 14))), fill=ink, font=body)
        y += int(body.size * 1.5) if hasattr(body, "size") else 16
    # a table
    rows, cols = int(rng.integers(4, 9)), int(rng.integers(3, 6))
    top, left, right = y + 10, margin, w - margin
    cell_h = int(rng.integers(22, 34))
    cell_w = (right - left) // cols
    small = _font(int(rng.integers(10, 15)))
    for r in range(rows + 1):
        draw.line([(left, top + r * cell_h), (left + cols * cell_w, top + r * cell_h)], fill=ink)
    for c in range(cols + 1):
        draw.line([(left + c * cell_w, top), (left + c * cell_w, top + rows * cell_h)], fill=ink)
    for r in range(rows):
        for c in range(cols):
            text = (
                WORDS[int(rng.integers(len(WORDS)))]
                if r == 0 or c == 0
                else (f"{rng.uniform(0, 10_000):,.2f}")
            )
            draw.text((left + c * cell_w + 4, top + r * cell_h + 4), text, fill=ink, font=small)
    y = top + rows * cell_h + 20
    # small print straddling the tile cuts (halves and thirds of either side)
    tiny = _font(int(rng.integers(8, 11)))
    for frac in (1 / 3, 1 / 2, 2 / 3):
        ty = int(h * frac) - 4
        draw.text((margin, ty), _sentence(rng, 18), fill=ink, font=tiny)
        tx = int(w * frac) - 60
        draw.text((tx, int(h * rng.uniform(0.75, 0.95))), _sentence(rng, 5), fill=ink, font=tiny)
    while y < h - margin:
        draw.text((margin, y), _sentence(rng, int(rng.integers(8, 16))), fill=ink, font=body)
        y += 24
    # a bar chart in one corner
    x0, y0 = int(w * 0.62), int(h * 0.08)
    for i in range(5):
        bar = int(rng.integers(10, int(h * 0.15)))
        draw.rectangle(
            [x0 + i * 18, y0 + int(h * 0.15) - bar, x0 + i * 18 + 12, y0 + int(h * 0.15)],
            fill=accent,
        )
    return image


def write_documents(folder: str | Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` synthetic documents as PNG and JPEG files in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = make_document(seed * 100_003 + i)
        path = folder / f"doc_{i:03d}.{'png' if i % 2 == 0 else 'jpg'}"
        image.save(path, quality=92) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="write synthetic document images")
    parser.add_argument("out", help="folder to write into")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_documents(args.out, args.count, args.seed)
    print(f"wrote {len(paths)} document images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
