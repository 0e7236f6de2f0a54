"""Synthetic document-style images (text, tables, small print across tile boundaries) for tests
and demos of calibration: ``python -m calibration.documents OUT --count 24``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

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
