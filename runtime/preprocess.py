"""Image preprocessing for the hybrid encoder: anyres tiles for the ViT, a global view for ConvNeXt.

Torch-free (numpy + Pillow) and pixel-identical to transformers' ``LlavaNextImageProcessor`` (PIL
backend) for the ViT tiles; the reference model and the runtime both call this one implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.errors import ImageError

RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class PreprocessConfig:
    """What preprocessing needs; it travels in the artifact manifest."""

    tile_size: int
    patch_size: int
    grid_pinpoints: tuple[tuple[int, int], ...]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    global_tile_size: int | None = None  # ConvNeXt-view pixels per tile; None: no ConvNeXt branch
    global_mean: tuple[float, float, float] | None = None
    global_std: tuple[float, float, float] | None = None

    @property
    def tokens_per_side(self) -> int:
        return self.tile_size // self.patch_size

    def grid_shapes(self) -> list[tuple[int, int]]:
        """(rows, cols) of every canvas in the pinpoints."""
        return [(h // self.tile_size, w // self.tile_size) for h, w in self.grid_pinpoints]

    def global_size(self, canvas: tuple[int, int]) -> tuple[int, int]:
        """Size (h, w) of the ConvNeXt view for a canvas: each tile becomes global_tile_size px."""
        assert self.global_tile_size is not None
        t = self.tile_size
        return (canvas[0] // t * self.global_tile_size, canvas[1] // t * self.global_tile_size)

    def to_dict(self) -> dict:
        return {
            "tile_size": self.tile_size,
            "patch_size": self.patch_size,
            "grid_pinpoints": [list(p) for p in self.grid_pinpoints],
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "global_tile_size": self.global_tile_size,
            "global_mean": None if self.global_mean is None else list(self.global_mean),
            "global_std": None if self.global_std is None else list(self.global_std),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        def tup(v):
            return None if v is None else tuple(v)

        return cls(
            tile_size=int(d["tile_size"]),
            patch_size=int(d["patch_size"]),
            grid_pinpoints=tuple(tuple(int(x) for x in p) for p in d["grid_pinpoints"]),
            image_mean=tuple(d["image_mean"]),
            image_std=tuple(d["image_std"]),
            global_tile_size=d.get("global_tile_size"),
            global_mean=tup(d.get("global_mean")),
            global_std=tup(d.get("global_std")),
        )


@dataclass
class PreprocessedImage:
    """One image ready for the vision stages."""

    pixel_values: np.ndarray  # (1 + rows*cols, 3, tile, tile) float32: base thumbnail first
    image_size: tuple[int, int]  # original (height, width)
    canvas: tuple[int, int]  # chosen anyres canvas (height, width)
    global_view: np.ndarray | None  # (1, 3, H, W) float32 for ConvNeXt, or None
    token_index: np.ndarray  # the packing index: which feature row becomes each image token

    @property
    def grid(self) -> tuple[int, int]:
        tile = self.pixel_values.shape[-1]
        return self.canvas[0] // tile, self.canvas[1] // tile

    @property
    def num_tokens(self) -> int:
        """How many image tokens this image becomes in the prompt."""
        return int(self.token_index.shape[0])


def select_best_resolution(
    image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """The canvas (h, w) keeping most of the image's pixels, then wasting least (LLaVA-NeXT)."""
    orig_h, orig_w = image_size
    best, best_effective, best_wasted = None, 0, math.inf
    for height, width in pinpoints:
        scale = min(width / orig_w, height / orig_h)
        down_w, down_h = int(orig_w * scale), int(orig_h * scale)
        effective = min(down_w * down_h, orig_w * orig_h)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (height, width), effective, wasted
    return best


def fitted_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size (h, w) of the image scaled to fit ``target`` with its aspect ratio kept."""
    orig_h, orig_w = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / orig_w, target_h / orig_h
    if scale_w < scale_h:
        return min(math.ceil(orig_h * scale_w), target_h), target_w
    return target_h, min(math.ceil(orig_w * scale_h), target_w)


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> np.ndarray:
    """Resize keeping aspect ratio, then pad with zeros (centred) to ``target``: (h, w, 3) uint8."""
    new_h, new_w = fitted_size((image.height, image.width), target)
    resized = np.asarray(image.resize((new_w, new_h), resample=RESAMPLE))
    pad_y, rem_y = divmod(target[0] - new_h, 2)
    pad_x, rem_x = divmod(target[1] - new_w, 2)
    return np.pad(resized, ((pad_y, pad_y + rem_y), (pad_x, pad_x + rem_x), (0, 0)))


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (h, w, 3) -> float32 (3, h, w), with transformers' exact rounding order."""
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    out = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def split_tiles(canvas: np.ndarray, tile: int) -> list[np.ndarray]:
    """Row-major tiles of a (h, w, 3) canvas whose sides are multiples of ``tile``."""
    return [
        canvas[y : y + tile, x : x + tile]
        for y in range(0, canvas.shape[0], tile)
        for x in range(0, canvas.shape[1], tile)
    ]


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> PreprocessedImage:
    """Tiles + base thumbnail for the ViT, and the high-resolution global view for ConvNeXt."""
    if image.mode != "RGB":
        raise ImageError(
            f"preprocess expects an RGB image, got mode {image.mode!r}; "
            "load it with runtime.image_io.load_image"
        )
    if image.width < 1 or image.height < 1:
        raise ImageError(f"image has no pixels ({image.width}x{image.height})")
    size = (image.height, image.width)
    canvas = select_best_resolution(size, cfg.grid_pinpoints)
    tiles = split_tiles(resize_and_pad(image, canvas), cfg.tile_size)
    thumb = np.asarray(image.resize((cfg.tile_size, cfg.tile_size), resample=RESAMPLE))
    pixel_values = np.stack([normalize(t, cfg.image_mean, cfg.image_std) for t in [thumb, *tiles]])
    global_view = None
    if cfg.global_tile_size is not None:
        view = resize_and_pad(image, cfg.global_size(canvas))
        global_view = normalize(view, cfg.global_mean, cfg.global_std)[None]
    grid = (canvas[0] // cfg.tile_size, canvas[1] // cfg.tile_size)
    index = packing_index(size, grid, cfg.tokens_per_side)
    return PreprocessedImage(pixel_values, size, canvas, global_view, index)


def unpadded_extent(image_size: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of the token grid that hold image, not padding (LLaVA-NeXT's unpad)."""
    orig_h, orig_w = image_size
    cur_h, cur_w = grid_hw
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return slice(pad, cur_h - pad), slice(0, cur_w)
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return slice(0, cur_h), slice(pad, cur_w - pad)


NEWLINE = -1


def packing_index(
    image_size: tuple[int, int], grid: tuple[int, int], tokens_per_side: int
) -> np.ndarray:
    """Order in which projected tile features become image tokens (LLaVA-NeXT ``spatial_unpad``).

    Entries index rows of the (num_tiles * tokens_per_side**2, dim) feature matrix, base thumbnail
    first; ``NEWLINE`` (-1) marks where the learned ``image_newline`` embedding goes.
    """
    n = tokens_per_side
    per_tile = n * n
    rows, cols = grid
    base = np.arange(per_tile, dtype=np.int64)
    if rows * cols == 0:
        return np.concatenate([base, [NEWLINE]])
    # Global token grid (rows*n, cols*n) -> index of the feature row that holds it.
    r, i, c, j = np.meshgrid(
        np.arange(rows), np.arange(n), np.arange(cols), np.arange(n), indexing="ij"
    )
    full = ((1 + r * cols + c) * per_tile + i * n + j).reshape(rows * n, cols * n)
    ys, xs = unpadded_extent(image_size, full.shape)
    kept = full[ys, xs]
    with_newline = np.concatenate([kept, np.full((kept.shape[0], 1), NEWLINE)], axis=1)
    return np.concatenate([base, with_newline.reshape(-1)])


def num_image_tokens(image_size: tuple[int, int], cfg: PreprocessConfig) -> int:
    """How many image tokens one image becomes in the prompt."""
    canvas = select_best_resolution(image_size, cfg.grid_pinpoints)
    grid = (canvas[0] // cfg.tile_size, canvas[1] // cfg.tile_size)
    return int(packing_index(image_size, grid, cfg.tokens_per_side).shape[0])
