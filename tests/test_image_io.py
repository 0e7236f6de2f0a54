"""runtime.image_io: every input kind gives the same RGB pixels; bad input gives a clear ImageError.

All images are made here with Pillow / numpy (plus scikit-image's bundled astronaut photo).
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, UnidentifiedImageError

from runtime.errors import FilaError, ImageError
from runtime.image_io import DEFAULT_MAX_PIXELS, image_from_array, load_image

pytestmark = pytest.mark.board

ROOT = Path(__file__).resolve().parent.parent


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched to claim ``width`` x ``height`` (CRC recomputed)."""
    data = bytearray(_encode(Image.new("RGB", (1, 1), (10, 20, 30))))
    assert data[12:16] == b"IHDR"  # 8-byte signature, 4-byte length, then the chunk type
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # type + 13 data bytes
    return bytes(data)


@pytest.fixture
def load_calls(monkeypatch) -> list[tuple[int, int]]:
    """Records every ImageFile.load (i.e. every pixel decode) while still decoding."""
    calls: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# ---------------------------------------------------------------- every input kind, same pixels


def test_path_bytes_pil_and_array_give_the_same_rgb_pixels(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    data = path.read_bytes()
    sources = {
        "Path": path,
        "str": str(path),
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "PIL": Image.fromarray(arr),
        "lazy PIL": Image.open(path),
        "array": arr,
    }
    for name, source in sources.items():
        out = load_image(source)
        assert isinstance(out, Image.Image), name
        assert out.size == (5, 7), name
        np.testing.assert_array_equal(_pixels(out), arr, err_msg=name)


def test_pil_input_is_not_mutated_and_a_new_image_is_returned():
    src = Image.new("RGBA", (3, 2), (0, 0, 0, 0))
    out = load_image(src)
    assert out is not src
    assert src.mode == "RGBA" and src.getpixel((0, 0)) == (0, 0, 0, 0)
    rgb = Image.new("RGB", (3, 2), (1, 2, 3))
    out = load_image(rgb)
    assert out is not rgb
    out.putpixel((0, 0), (9, 9, 9))
    assert rgb.getpixel((0, 0)) == (1, 2, 3)


def test_real_photo_from_skimage_loads_with_the_right_size(tmp_path):
    data = pytest.importorskip("skimage.data")
    photo = data.astronaut()
    assert photo.shape == (512, 512, 3)
    jpeg, png = tmp_path / "astronaut.jpg", tmp_path / "astronaut.png"
    Image.fromarray(photo).save(jpeg, quality=95)
    Image.fromarray(photo).save(png)
    out = load_image(jpeg)
    assert out.mode == "RGB" and out.size == (512, 512)
    assert np.abs(_pixels(out).astype(int) - photo).mean() < 3.0
    np.testing.assert_array_equal(_pixels(load_image(png)), photo)


# ------------------------------------------------------------------------- paths that are wrong


@pytest.mark.parametrize("as_str", [False, True])
def test_missing_path_raises_image_error_naming_the_path(tmp_path, as_str):
    missing = tmp_path / "nope" / "missing_photo.jpg"
    with pytest.raises(ImageError, match="does not exist") as err:
        load_image(str(missing) if as_str else missing)
    assert "missing_photo.jpg" in str(err.value)
    assert isinstance(err.value, FilaError)


def test_directory_raises_image_error(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("name", ["notes.txt", "disguised.png"])
def test_text_file_is_not_a_readable_image(tmp_path, name):
    path = tmp_path / name
    path.write_text("hello, this is not an image\n" * 10)
    with pytest.raises(ImageError, match="not a readable image") as err:
        load_image(path)
    msg = str(err.value)
    assert name in msg and "PNG" in msg and "JPEG" in msg
    assert isinstance(err.value.__cause__, UnidentifiedImageError)


def test_empty_bytes_and_garbage_bytes_raise_image_error():
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"\x00\x01garbage" * 50)


@pytest.mark.parametrize("source", [42, None, [[1, 2], [3, 4]], {"path": "x.png"}])
def test_unsupported_source_type_raises_image_error(source):
    with pytest.raises(ImageError, match=type(source).__name__):
        load_image(source)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_max_pixels_is_a_value_error(bad):
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(np.zeros((2, 2), np.uint8), max_pixels=bad)


# ------------------------------------------------------------------------ truncated / corrupt


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("as_path", [True, False])
def test_truncated_file_raises_truncated_or_corrupt(tmp_path, fmt, as_path):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), fmt)
    cut = data[: len(data) // 2]
    Image.open(io.BytesIO(cut))  # the header survives: only decoding can notice
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(cut)
    with pytest.raises(ImageError, match="truncated or corrupt") as err:
        load_image(path if as_path else cut)
    assert err.value.__cause__ is not None
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data_raises_truncated_or_corrupt():
    noise = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = bytearray(_encode(Image.fromarray(noise)))
    idat = data.index(b"IDAT")
    for i in range(idat + 20, idat + 60):
        data[i] ^= 0xFF
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(bytes(data))


def test_truncated_lazy_pil_image_raises_truncated_or_corrupt(tmp_path):
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as lazy, pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(lazy)


# ----------------------------------------------------------------------- decompression bombs


def test_spy_sees_a_normal_decode(load_calls):
    """Control for the bomb tests: the spy does record a real decode."""
    load_image(_encode(Image.new("RGB", (4, 3))))
    assert load_calls and set(load_calls) == {(4, 3)}


@pytest.mark.parametrize(
    ("width", "height", "count"),
    [
        (9_000, 9_000, "81,000,000"),  # under Pillow's own limit: refused by max_pixels
        (10_000, 10_000, "100,000,000"),  # Pillow's DecompressionBombWarning range
        (100_000, 100_000, "10,000,000,000"),  # Pillow's DecompressionBombError range
    ],
)
@pytest.mark.parametrize("as_path", [True, False])
def test_bomb_is_refused_from_the_header_without_decoding(
    tmp_path, load_calls, width, height, count, as_path
):
    bomb = _png_claiming(width, height)
    assert len(bomb) < 100
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    limit_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError) as err:
            load_image(path if as_path else bomb)
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert "limit" in msg and "pixels" in msg and count in msg
    assert "64,000,000" in msg
    assert "downscale" in msg and "truncated" not in msg
    assert load_calls == []  # no pixel was decoded
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_max_pixels_applies_to_every_input_kind(load_calls):
    img = Image.new("RGB", (200, 100))
    for source in (_encode(img), img, np.zeros((100, 200, 3), np.uint8)):
        with pytest.raises(ImageError, match="20,000 pixels") as err:
            load_image(source, max_pixels=10_000)
        assert "10,000" in str(err.value)
    assert load_calls == []
    assert load_image(img, max_pixels=20_000).size == (200, 100)
    assert DEFAULT_MAX_PIXELS == 64_000_000


# ------------------------------------------------------------------------------------ modes


def test_grayscale_becomes_gray_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (3, 2), 77).save(path)
    out = load_image(path)
    assert out.size == (3, 2)
    assert (_pixels(out) == 77).all()


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    rgba = np.array(
        [[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128], [10, 200, 30, 255]]], dtype=np.uint8
    )
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    px = _pixels(load_image(path))[0]
    assert tuple(px[0]) == (255, 0, 0)
    assert tuple(px[1]) == (255, 255, 255)  # fully transparent -> white, not black
    assert np.abs(px[2].astype(int) - 127).max() <= 1  # half-transparent black over white
    assert tuple(px[3]) == (10, 200, 30)


@pytest.mark.parametrize("mode", ["LA", "PA"])
def test_la_and_pa_alpha_composited_onto_white(mode):
    if mode == "LA":
        img = Image.new("LA", (2, 1))
        img.putpixel((0, 0), (40, 255))
        img.putpixel((1, 0), (40, 0))
        opaque = (40, 40, 40)
    else:
        img = Image.new("PA", (2, 1))
        img.putpalette([0, 90, 180] + [0, 0, 0] * 255)
        img.putpixel((0, 0), (0, 255))
        img.putpixel((1, 0), (0, 0))
        opaque = (0, 90, 180)
    px = _pixels(load_image(img))[0]
    assert tuple(px[0]) == opaque
    assert tuple(px[1]) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_becomes_white(tmp_path, fmt):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0, 0, 0] * 253)
    for x, index in enumerate((0, 1, 2)):
        img.putpixel((x, 0), index)
    path = tmp_path / f"pal.{fmt.lower()}"
    img.save(path, transparency=1)
    with Image.open(path) as check:
        check.load()
        assert check.mode == "P" and "transparency" in check.info
    px = _pixels(load_image(path))[0]
    assert [tuple(p) for p in px] == [(255, 0, 0), (255, 255, 255), (0, 0, 255)]


def test_palette_without_transparency_and_one_bit_images():
    pal = Image.new("P", (1, 1))
    pal.putpalette([0, 200, 100] + [0, 0, 0] * 255)
    assert tuple(_pixels(load_image(pal))[0, 0]) == (0, 200, 100)
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    assert [tuple(p) for p in _pixels(load_image(_encode(bits)))[0]] == [(0, 0, 0), (255,) * 3]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_file_is_scaled_not_clipped(tmp_path, fmt):
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / f"deep.{fmt.lower()}"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    px = _pixels(load_image(path))
    np.testing.assert_array_equal(px[0, :, 0], [0, 0, 1, 128, 255])
    assert (px == px[:, :, :1]).all()


def test_16_bit_big_endian_and_32_bit_int_modes():
    values = np.array([0, 256, 32768, 65535], dtype=">u2")
    big = Image.frombytes("I;16B", (4, 1), values.tobytes())
    assert big.mode == "I;16B"
    np.testing.assert_array_equal(_pixels(load_image(big))[0, :, 0], [0, 1, 128, 255])
    wide = Image.fromarray(np.array([[-5, 0, 256, 32768, 65535, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(_pixels(load_image(wide))[0, :, 0], [0, 0, 1, 128, 255, 255])


def test_float_mode_is_clipped_to_0_255():
    img = Image.fromarray(np.array([[-10.0, 0.0, 127.6, 300.0]], dtype=np.float32))
    assert img.mode == "F"
    np.testing.assert_array_equal(_pixels(load_image(img))[0, :, 0], [0, 0, 128, 255])


@pytest.mark.parametrize(("fmt", "atol"), [("TIFF", 0), ("JPEG", 8)])
def test_cmyk_converts_to_rgb(tmp_path, fmt, atol):
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    img.paste((255, 0, 255, 0), (4, 0, 8, 8))  # pure green on the right half
    path = tmp_path / f"cmyk.{fmt.lower()}"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    px = _pixels(load_image(path)).astype(int)
    assert np.abs(px[4, 1] - (255, 0, 0)).max() <= atol
    assert np.abs(px[4, 6] - (0, 255, 0)).max() <= atol


def test_ycbcr_converts_to_rgb():
    img = Image.new("RGB", (2, 2), (200, 100, 50)).convert("YCbCr")
    px = _pixels(load_image(img)).astype(int)
    assert np.abs(px - (200, 100, 50)).max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    img.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (20, 10)
    out = load_image(path)
    assert out.size == (10, 20)
    px = _pixels(out).astype(int)
    assert np.abs(px[2, 5] - (255, 0, 0)).max() < 30  # left edge rotated to the top
    assert np.abs(px[17, 5] - (0, 0, 255)).max() < 30
    assert load_image(path.read_bytes()).size == (10, 20)


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_zero_size_pil_image_raises(size):
    with pytest.raises(ImageError, match="non-empty"):
        load_image(Image.new("RGB", size))


# ----------------------------------------------------------------------------------- arrays


def test_array_gray_and_single_channel():
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    for arr in (gray, gray[:, :, None]):
        px = _pixels(image_from_array(arr))
        np.testing.assert_array_equal(px, np.repeat(gray[:, :, None], 3, axis=2))


def test_array_uint16_is_shifted_and_float_is_scaled():
    u16 = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(_pixels(image_from_array(u16))[0, :, 0], [0, 0, 1, 128, 255])
    big = u16.astype(">u2")
    np.testing.assert_array_equal(_pixels(image_from_array(big))[0, :, 0], [0, 0, 1, 128, 255])
    rgb16 = np.full((2, 2, 3), 32768, dtype=np.uint16)
    assert (_pixels(load_image(rgb16)) == 128).all()
    for dtype in (np.float16, np.float32, np.float64):
        f = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=dtype)
        np.testing.assert_array_equal(_pixels(image_from_array(f))[0, :, 0], [0, 64, 128, 255])


def test_array_rgba_composited_onto_white_and_non_contiguous_ok():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    px = _pixels(load_image(rgba))
    assert tuple(px[0, 0]) == (10, 20, 30)
    assert tuple(px[1, 1]) == (255, 255, 255)
    arr = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    np.testing.assert_array_equal(_pixels(load_image(arr[:, ::2])), arr[:, ::2])
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1)).transpose(1, 2, 0)
    np.testing.assert_array_equal(_pixels(load_image(chw)), arr)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((2, 2), dtype=np.int64),
        np.zeros((2, 2), dtype=np.int32),
        np.zeros((2, 2, 3), dtype=bool),
        np.zeros((2, 2), dtype=np.complex64),
        np.zeros((2, 2), dtype=np.uint32),
    ],
)
def test_array_bad_dtype_named_in_error(arr):
    with pytest.raises(ImageError, match=str(arr.dtype)) as err:
        load_image(arr)
    assert str(arr.shape) in str(err.value)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros(5, dtype=np.uint8),
        np.zeros((2, 2, 2), dtype=np.uint8),
        np.zeros((2, 2, 5), dtype=np.uint8),
        np.zeros((1, 2, 2, 3), dtype=np.uint8),
    ],
)
def test_array_bad_shape_named_in_error(arr):
    with pytest.raises(ImageError, match="expected shape") as err:
        load_image(arr)
    assert str(arr.shape) in str(err.value)


@pytest.mark.parametrize(
    ("values", "match"),
    [([[0.0, 1.5]], r"\[0, 1.5\]"), ([[-0.1, 0.5]], r"\[-0.1, 0.5\]"), ([[np.nan, 0.5]], "NaN")],
)
def test_array_float_out_of_range_raises(values, match):
    with pytest.raises(ImageError, match=match):
        load_image(np.array(values, dtype=np.float32))


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0), (0, 0, 4)])
def test_array_zero_size_raises(shape):
    with pytest.raises(ImageError, match="non-empty"):
        load_image(np.zeros(shape, dtype=np.uint8))


# ----------------------------------------------------------------------------------- hygiene


def test_error_messages_are_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x")
    data = _encode(Image.fromarray(np.full((64, 64, 3), 7, np.uint8)))
    bad = [
        tmp_path / "missing.png",
        tmp_path,
        text,
        data[: len(data) // 2],
        _png_claiming(100_000, 100_000),
        np.zeros((2, 2), dtype=np.int64),
        object(),
    ]
    for source in bad:
        with pytest.raises(ImageError) as err:
            load_image(source)
        msg = str(err.value)
        assert "\n" not in msg and "Traceback" not in msg, msg
        assert "expected" in msg, msg


def test_module_imports_without_torch():
    code = (
        "import sys, runtime.image_io\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
