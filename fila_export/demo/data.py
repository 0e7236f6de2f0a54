"""A seeded synthetic fine-grained reading task for the demo model (numpy + Pillow only).

Each image holds one short string in a box: a 3-5 digit number or one word of :data:`WORDS`, in
dark ink on a light box of a named colour (:data:`PALETTE`) over a background of any colour, with
varied font, size and position, a few faint background shapes and light noise (``plain=True``:
black on white and nothing else, for a training curriculum). Image sizes are drawn around the
canvases of the anyres grid, so the ViT sees 2-4 tiles. Every sample knows, from
the anyres geometry (``select_best_resolution`` + ``fitted_size``, exactly what preprocessing
does), whether its text straddles a tile boundary: that is the case a ViT reading tiles one by one
finds hard and FILA's whole-image ConvNeXt branch should help with.

Samples are a pure function of ``(seed, index, mode)``, so any set can be regenerated exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from runtime.preprocess import fitted_size, select_best_resolution

DEFAULT_TILE = 56
DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (h * DEFAULT_TILE, w * DEFAULT_TILE) for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
)
WORDS: tuple[str, ...] = tuple(
    "CAT DOG RED BLUE GREEN BLACK WHITE GRAY LEFT RIGHT TOP OPEN CLOSE STORE STREET PRICE TOTAL "
    "DATE NAME CODE LABEL SIGN ITEM COFFEE ROCKET CAMERA MODEL VISION PAGE TABLE".split()
)
QUESTIONS = {"number": "What is the number?", "word": "What word is in the box?"}
COLOUR_QUESTION = "What colour is the box?"
# Named light box colours (also an auxiliary training question); the text is always dark ink on
# the light box, so colours vary but the glyphs keep one polarity.
PALETTE = {
    "WHITE": (242, 242, 242),
    "YELLOW": (245, 225, 95),
    "ORANGE": (250, 180, 95),
    "GREEN": (150, 225, 150),
    "BLUE": (150, 190, 250),
    "RED": (250, 150, 150),
    "GRAY": (190, 190, 190),
}
HELDOUT_SEED = 20240808
HELDOUT_SIZE = 200
HELDOUT_BOUNDARY_SHARE = 0.5
MIN_CUT_FRACTION = 0.2  # a boundary must leave >= this share of the text on each side
FONT_SIZE_RANGE = (0.45, 0.65)  # font size in pixels, as a fraction of the tile size
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
)
_MODES = {None: 0, True: 1, False: 2}


@dataclass
class Sample:
    """One question about one image; ``meta`` is JSON-serialisable."""

    image: Image.Image
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def boundary(self) -> bool:
        return bool(self.meta.get("boundary", False))


# --- geometry --------------------------------------------------------------------------------


def canvas_geometry(
    image_size: tuple[int, int], tile_size: int, pinpoints: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Where an image lands on its anyres canvas, exactly as ``runtime.preprocess`` puts it."""
    canvas = select_best_resolution(image_size, pinpoints)
    new_h, new_w = fitted_size(image_size, canvas)
    return {
        "canvas": tuple(canvas),
        "grid": (canvas[0] // tile_size, canvas[1] // tile_size),
        "scale": (new_h / image_size[0], new_w / image_size[1]),
        "pad": ((canvas[0] - new_h) // 2, (canvas[1] - new_w) // 2),
    }


def text_cuts(
    bbox: Sequence[float],
    image_size: tuple[int, int],
    tile_size: int = DEFAULT_TILE,
    pinpoints: Sequence[Sequence[int]] = DEFAULT_PINPOINTS,
) -> list[dict[str, Any]]:
    """Interior tile boundaries that pass through ``bbox`` (x0, y0, x1, y1 in image pixels).

    Each cut gives its axis (``x``: a vertical boundary at canvas column ``at``; ``y``: a
    horizontal one) and ``fraction``, the share of the box's extent before the boundary.
    """
    geo = canvas_geometry(image_size, tile_size, pinpoints)
    (sy, sx), (py, px) = geo["scale"], geo["pad"]
    rows, cols = geo["grid"]
    x0, y0, x1, y1 = bbox
    spans = {"x": (x0 * sx + px, x1 * sx + px, cols), "y": (y0 * sy + py, y1 * sy + py, rows)}
    cuts = []
    for axis, (lo, hi, n) in spans.items():
        for k in range(1, n):
            at = k * tile_size
            if lo < at < hi:
                cuts.append({"axis": axis, "at": at, "fraction": (at - lo) / (hi - lo)})
    return cuts


def straddles(
    bbox: Sequence[float],
    image_size: tuple[int, int],
    tile_size: int = DEFAULT_TILE,
    pinpoints: Sequence[Sequence[int]] = DEFAULT_PINPOINTS,
    min_fraction: float = MIN_CUT_FRACTION,
) -> bool:
    """True when a tile boundary splits the text with >= ``min_fraction`` of it on each side."""
    return any(
        min(c["fraction"], 1 - c["fraction"]) >= min_fraction
        for c in text_cuts(bbox, image_size, tile_size, pinpoints)
    )


# --- rendering -------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def load_font(name: str, size: int) -> ImageFont.ImageFont:
    """A DejaVu TrueType font when installed, else Pillow's built-in scalable default."""
    path = FONT_DIR / name
    if path.is_file():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _luma(rgb: Sequence[int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _dark(rng: np.random.Generator, max_luma: float = 70) -> tuple[int, int, int]:
    while True:
        c = tuple(int(v) for v in rng.integers(0, 140, 3))
        if _luma(c) <= max_luma:
            return c


def _image_size(rng: np.random.Generator, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(h, w) around a random pinpoint canvas: overall scale 0.8-1.2, aspect jitter +-10%."""
    ch, cw = pinpoints[int(rng.integers(len(pinpoints)))]
    s, a = rng.uniform(0.8, 1.2), math.sqrt(rng.uniform(0.9, 1.1))
    return max(16, round(ch * s * a)), max(16, round(cw * s / a))


def _text(rng: np.random.Generator) -> tuple[str, str]:
    if rng.random() < 0.5:
        digits = int(rng.integers(3, 6))
        first = str(int(rng.integers(1, 10)))
        return "number", first + "".join(str(int(d)) for d in rng.integers(0, 10, digits - 1))
    return "word", WORDS[int(rng.integers(len(WORDS)))]


def _place(
    rng: np.random.Generator,
    size: tuple[int, int],
    text_wh: tuple[int, int],
    margin: int,
    boundary: bool | None,
    tile_size: int,
    pinpoints: Sequence[Sequence[int]],
) -> tuple[float, float] | None:
    """Top-left (x, y) of the text's ink box so the box + margin fits; None when it cannot."""
    h, w = size
    tw, th = text_wh
    x_hi, y_hi = w - tw - margin, h - th - margin
    if x_hi < margin or y_hi < margin:
        return None
    x, y = rng.uniform(margin, x_hi), rng.uniform(margin, y_hi)
    if boundary is not True:
        return x, y
    geo = canvas_geometry(size, tile_size, pinpoints)
    (sy, sx), (py, px) = geo["scale"], geo["pad"]
    rows, cols = geo["grid"]
    options = [("x", k) for k in range(1, cols)] + [("y", k) for k in range(1, rows)]
    # Vertical boundaries (text split left/right) three times as often as horizontal ones.
    weights = np.array([3.0 if a == "x" else 1.0 for a, _ in options])
    axis, k = options[int(rng.choice(len(options), p=weights / weights.sum()))]
    f = rng.uniform(0.3, 0.7)
    if axis == "x":
        x = (k * tile_size - px) / sx - f * tw
    else:
        y = (k * tile_size - py) / sy - f * th
    return min(max(x, margin), x_hi), min(max(y, margin), y_hi)


def make_sample(
    seed: int,
    index: int,
    boundary: bool | None = None,
    tile_size: int = DEFAULT_TILE,
    pinpoints: Sequence[Sequence[int]] = DEFAULT_PINPOINTS,
    font_size_range: tuple[float, float] = FONT_SIZE_RANGE,
    plain: bool = False,
) -> Sample:
    """Sample ``index`` of stream ``seed``. ``boundary``: None places the text anywhere (the flag
    says where it fell), True makes a tile boundary split it, False keeps it inside one tile
    (shrinking the font below ``font_size_range`` when the text is wider than a tile)."""
    rng = np.random.default_rng([seed, index, _MODES[boundary]])
    kind, text = _text(rng)
    font_name = FONT_FILES[int(rng.integers(len(FONT_FILES)))]
    for _attempt in range(200):  # a new image size and font size until the text fits
        size = _image_size(rng, pinpoints)
        lo, hi = font_size_range
        font_size = int(round(rng.uniform(lo, hi) * tile_size))
        font = load_font(font_name, font_size)
        left, top, right, bottom = font.getbbox(text)
        tw, th = right - left, bottom - top
        if boundary is False and tw > 0.8 * tile_size:  # smaller text so one tile can hold it
            font_size = max(6, int(font_size * 0.8 * tile_size / tw))
            font = load_font(font_name, font_size)
            left, top, right, bottom = font.getbbox(text)
            tw, th = right - left, bottom - top
        pad = max(2, round(0.3 * th))
        pos = _place(rng, size, (tw, th), pad + 2, boundary, tile_size, pinpoints)
        if pos is None:
            continue
        bbox = (pos[0], pos[1], pos[0] + tw, pos[1] + th)
        is_cut = straddles(bbox, size, tile_size, pinpoints)
        if boundary is True and not is_cut:
            continue
        if boundary is False and text_cuts(bbox, size, tile_size, pinpoints):
            continue
        break
    else:  # pragma: no cover - the size ranges above always leave room
        raise RuntimeError(f"could not place text for sample {seed}/{index}")
    names = list(PALETTE)
    box_colour = names[int(rng.integers(len(names)))]
    image = _render(
        rng, size, text, font, (pos[0] - left, pos[1] - top), bbox, pad, box_colour, plain
    )
    geo = canvas_geometry(size, tile_size, pinpoints)
    meta = {
        "seed": seed,
        "index": index,
        "mode": {None: "random", True: "boundary", False: "inside"}[boundary],
        "kind": kind,
        "text": text,
        "font": font_name,
        "font_size": font_size,
        "box_colour": box_colour,
        "image_size": list(size),
        "text_bbox": [round(v, 2) for v in bbox],
        "canvas": list(geo["canvas"]),
        "grid": list(geo["grid"]),
        "cuts": [
            {**c, "fraction": round(c["fraction"], 4)}
            for c in text_cuts(bbox, size, tile_size, pinpoints)
        ],
        "boundary": bool(is_cut),
    }
    return Sample(image, QUESTIONS[kind], text, meta)


def _render(rng, size, text, font, origin, bbox, pad, box_colour, plain=False) -> Image.Image:
    """Background + distractors, the box around ``bbox`` (the text's ink box), text, noise."""
    h, w = size
    box = (bbox[0] - pad, bbox[1] - pad, bbox[2] + pad, bbox[3] + pad)
    if plain:  # black on white, nothing else
        image = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        draw.rectangle(box, outline=(0, 0, 0), width=1)
        draw.text(origin, text, font=font, fill=(0, 0, 0))
        return image
    fill = np.array(PALETTE[box_colour]) + rng.integers(-15, 16, 3)
    fill = tuple(int(c) for c in np.clip(fill, 0, 255))
    bg = _colour(rng)
    while np.linalg.norm(np.subtract(bg, fill)) < 100:  # the box stands out from the background
        bg = _colour(rng)
    image = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):  # a few faint distractor shapes
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0, y1 = sorted(rng.uniform(0, h, 2))
        col = tuple(int(c) for c in np.clip(np.array(bg) + rng.integers(-50, 51, 3), 0, 255))
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=col, width=int(rng.integers(1, 4)))
        else:
            draw.rectangle((x0, y0, x1, y1), outline=col, width=int(rng.integers(1, 3)))
    ink = _dark(rng)
    outline = _dark(rng)
    draw.rectangle(box, fill=fill, outline=outline, width=int(rng.integers(1, 3)))
    draw.text(origin, text, font=font, fill=ink)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(2.0, 8.0), pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


# --- sets ------------------------------------------------------------------------------------


def forced_boundary(i: int, share: float) -> bool:
    """Spread ``share`` of the indices evenly: exactly round-down(n * share) in the first n."""
    return math.floor((i + 1) * share) > math.floor(i * share)


def generate(
    seed: int,
    n: int | None = None,
    boundary_share: float = 0.0,
    start: int = 0,
    **kwargs: Any,
) -> Iterator[Sample]:
    """Samples ``start, start+1, ...`` of stream ``seed`` (endless when ``n`` is None); a
    ``boundary_share`` of them are made to straddle a tile boundary, the rest fall anywhere."""
    i = start
    while n is None or i < start + n:
        yield make_sample(seed, i, True if forced_boundary(i, boundary_share) else None, **kwargs)
        i += 1


def heldout_set(
    n: int = HELDOUT_SIZE,
    seed: int = HELDOUT_SEED,
    boundary_share: float = HELDOUT_BOUNDARY_SHARE,
    **kwargs: Any,
) -> list[Sample]:
    """The fixed evaluation set: half made to straddle a tile boundary, half placed anywhere."""
    return list(generate(seed, n, boundary_share, **kwargs))


def boundary_subset(samples: Sequence[Sample]) -> list[Sample]:
    """The samples whose answer text straddles a tile boundary."""
    return [s for s in samples if s.boundary]


# --- files -----------------------------------------------------------------------------------

QUESTIONS_FILE = "questions.jsonl"


def write_question_set(samples: Sequence[Sample], folder: str | Path) -> Path:
    """PNGs under ``folder/images`` + ``folder/questions.jsonl`` (one JSON object per line:
    ``image`` relative to the folder, ``question``, ``answer``, ``boundary``, ``meta``)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / QUESTIONS_FILE
    with path.open("w") as f:
        for i, s in enumerate(samples):
            name = f"images/{i:05d}.png"
            s.image.save(folder / name)
            record = {
                "id": i,
                "image": name,
                "question": s.question,
                "answer": s.answer,
                "boundary": s.boundary,
                "meta": s.meta,
            }
            f.write(json.dumps(record) + "\n")
    return path


def read_question_set(path: str | Path) -> list[Sample]:
    """Samples back from ``questions.jsonl`` (or its folder), images loaded as RGB."""
    path = Path(path)
    if path.is_dir():
        path = path / QUESTIONS_FILE
    samples = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        with Image.open(path.parent / rec["image"]) as im:
            image = im.convert("RGB")
        meta = dict(rec.get("meta") or {})
        meta["boundary"] = bool(rec["boundary"])
        samples.append(Sample(image, rec["question"], rec["answer"], meta))
    return samples
