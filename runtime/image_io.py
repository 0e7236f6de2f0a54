"""Turn whatever a user hands us (path, bytes, PIL image, numpy array) into one RGB PIL image.

Why this module exists: every entry point (CLI, examples, benchmarks) must feed the preprocessor
the same RGB pixels the reference pipeline would see, and must refuse decompression bombs,
truncated files and exotic modes with a one-line ``ImageError`` instead of a Pillow traceback, an
out-of-memory kill, or silently wrong pixels (16-bit images clipped to white, transparent pixels
turned black).
Only numpy and Pillow are used so the torch-free runtime can import it.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import ImageError

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest width*height we decode by default: about 192 MB as RGB, far above any model input."""

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

# Modes whose alpha channel must be composited onto white (as transformers' convert_to_rgb does).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes that carry alpha only through a "transparency" entry in ``img.info``.
_TRANSPARENCY_MODES = frozenset({"P", "L"})
_COMMON_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "PPM", "TGA", "ICO")


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


def find_images(folder: str | os.PathLike, what: str = "image folder") -> list[Path]:
    """Every image file under ``folder`` (recursive, sorted by path); a clear error when the
    folder is missing or holds none (``what`` names the folder in it)."""
    root = Path(folder)
    if not root.exists():
        raise ImageError(
            f"{what} {root} does not exist; pass a folder of real images (jpg/png/webp) "
            "like the ones the model will see"
        )
    if not root.is_dir():
        raise ImageError(f"{root} is a file; pass the folder that holds the images")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ImageError(f"no images (jpg/png/webp/bmp/tiff) in {root} or its subfolders")
    return found


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``source`` as an RGB image, EXIF orientation applied, alpha composited onto white.

    ``source`` is a path (``str`` / ``os.PathLike``), encoded bytes, a ``PIL.Image.Image`` or a
    numpy array (see :func:`image_from_array`). Images with more than ``max_pixels`` pixels are
    refused from their header, before any pixel is decoded, so memory stays bounded. Pillow's own
    ``Image.MAX_IMAGE_PIXELS`` guard also applies (as an error, never a warning); it is not changed.
    Every failure is an :class:`ImageError` whose message says what to do.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        return _finish(source, "the given PIL image", max_pixels)
    if isinstance(source, np.ndarray):
        if source.ndim in (2, 3):
            _check_size(source.shape[1], source.shape[0], "the given array", max_pixels)
        return image_from_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError(
                "image bytes: expected the encoded bytes of an image file, found 0 bytes; "
                "check that the file or download was read completely"
            )
        return _open_and_finish(io.BytesIO(data), f"image bytes ({len(data):,} bytes)", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = f"image file '{path}'"
        if not path.exists():
            where = (
                "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
            )
            raise ImageError(
                f"{label} does not exist{where}; expected a path to an existing image file, "
                "check the path for typos"
            )
        if path.is_dir():
            raise ImageError(
                f"'{path}' is a directory, expected an image file; pass the path of one image "
                "inside it"
            )
        return _open_and_finish(path, label, max_pixels)
    raise ImageError(
        f"expected an image as a path, bytes, PIL.Image.Image or numpy array, found "
        f"{type(source).__name__}; load or convert it into one of those first"
    )


def image_from_array(arr: np.ndarray) -> Image.Image:
    """Convert an HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA) array to an RGB image.

    Why explicit rules: arrays carry no colour metadata, so the value range is fixed by dtype:
    uint8 as is, uint16 scaled to 8 bit (``>> 8``), float taken as [0, 1] (``* 255``, rounded).
    Anything else is refused rather than guessed; RGBA is composited onto white.
    """
    label = "image array"
    if not isinstance(arr, np.ndarray):
        raise ImageError(
            f"{label}: expected a numpy array, found {type(arr).__name__}; pass np.asarray(x)"
        )
    found = f"found dtype {arr.dtype} with shape {arr.shape}"
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not shape_ok:
        raise ImageError(
            f"{label}: expected shape HxW, HxWx3 or HxWx4, {found}; reshape or transpose it "
            "(channels last)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(
            f"{label}: expected a non-empty image, {found} (zero width or height); "
            "check how the array was produced"
        )
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 1:
        pixels = arr
    elif arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        pixels = (arr >> 8).astype(np.uint8)
    elif arr.dtype.kind == "f":
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise ImageError(
                f"{label}: expected finite float values in [0, 1], {found} containing NaN or "
                "inf; clean the array first"
            )
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise ImageError(
                f"{label}: expected float values in [0, 1], {found} ranging over "
                f"[{low:g}, {high:g}]; rescale it (e.g. divide by 255) first"
            )
        pixels = np.rint(values * 255.0).astype(np.uint8)
    else:
        raise ImageError(
            f"{label}: expected dtype uint8, uint16 or float in [0, 1], {found}; "
            "convert it (e.g. arr.astype(np.uint8)) first"
        )
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return _to_rgb(Image.fromarray(np.ascontiguousarray(pixels)), label)


def _open_and_finish(fp: Path | io.BytesIO, label: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only), so the size check in ``_finish`` runs before decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _pillow_bomb_error(label, max_pixels, e) from e
        except UnidentifiedImageError as e:
            raise ImageError(
                f"{label} is not a readable image: expected one of {_accepted_formats()}, found "
                "data Pillow cannot identify; convert it to PNG or JPEG"
            ) from e
        except PermissionError as e:
            raise ImageError(
                f"{label} cannot be read (permission denied); check the file's permissions"
            ) from e
        except Exception as e:  # a plugin choked on a malformed header
            raise ImageError(
                f"{label} is not a readable image: its header is corrupt ({_reason(e)}); "
                f"expected one of {_accepted_formats()}, re-export or re-download it"
            ) from e
    with img:
        return _finish(img, label, max_pixels)


def _finish(img: Image.Image, label: str, max_pixels: int) -> Image.Image:
    """Size-check, decode, orient and convert; returns a new image, never the caller's object."""
    _check_size(img.width, img.height, label, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _pillow_bomb_error(label, max_pixels, e) from e
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... here
            raise ImageError(
                f"{label} is truncated or corrupt: expected complete pixel data, decoding failed "
                f"({_reason(e)}); re-export or re-download the image"
            ) from e
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception as e:
        raise ImageError(
            f"{label} has corrupt EXIF metadata: expected a readable orientation tag, found "
            f"{_reason(e)}; re-save the image without EXIF"
        ) from e
    if oriented is None or oriented is img:
        oriented = img.copy()
    return _to_rgb(oriented, label)


def _check_size(width: int, height: int, label: str, max_pixels: int) -> None:
    """Refuse empty images and images over ``max_pixels`` using the size alone."""
    if width == 0 or height == 0:
        raise ImageError(
            f"{label}: expected a non-empty image, found size {width}x{height}; "
            "check the file or how the image was produced"
        )
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: expected at most {max_pixels:,} pixels (the limit, max_pixels), found "
            f"{width}x{height} = {width * height:,} pixels; refused before decoding to bound "
            "memory, downscale the image or raise the limit"
        )


def _pillow_bomb_error(label: str, max_pixels: int, err: Exception) -> ImageError:
    """Word Pillow's decompression-bomb refusal like ours, pixel count included when known."""
    match = re.search(r"\((\d+) pixels\)", str(err))
    found = f"{int(match.group(1)):,} pixels" if match else "more pixels than that"
    pil_limit = Image.MAX_IMAGE_PIXELS
    limit = max_pixels if pil_limit is None else min(max_pixels, pil_limit)
    return ImageError(
        f"{label}: expected at most {limit:,} pixels (the limit, max_pixels and Pillow's "
        f"Image.MAX_IMAGE_PIXELS), found {found}; refused before decoding as a possible "
        "decompression bomb, downscale the image or raise the limit"
    )


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping high-bit-depth data or losing alpha."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "I" or mode.startswith("I;16"):
        wide = np.asarray(img).astype(np.int64)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        gray = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    try:
        if mode == "La":  # Pillow cannot convert premultiplied La to RGBA directly
            img = img.convert("LA")
        if _has_alpha(img):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(
            f"{label}: expected an image mode convertible to RGB, found mode {mode!r} "
            f"({_reason(e)}); convert it to RGB before passing it in"
        ) from e


def _has_alpha(img: Image.Image) -> bool:
    """True for modes with an alpha channel, and palette/gray images with a transparency entry."""
    if img.mode in _ALPHA_MODES:
        return True
    if img.mode in _TRANSPARENCY_MODES and "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _accepted_formats() -> str:
    """The common formats this Pillow build can open, for error messages."""
    Image.init()
    names = [name for name in _COMMON_FORMATS if name in Image.OPEN]
    return ", ".join(names) + " or another format Pillow can open"


def _reason(err: BaseException) -> str:
    """One-line, bounded summary of a library exception (no traceback in user messages)."""
    text = " ".join(str(err).split()) or "no details"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}"
