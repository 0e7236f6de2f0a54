"""The bytes of an image a request names: a ``data:`` URL, or a file under ``--image-root``.

A board does not fetch remote URLs on a client's behalf (no outbound requests from the robot's
network), and a path outside the root a server was given is refused, as is anything over the
size limit, before it is decoded."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from runtime.serve.errors import ImageTooLarge, RequestError


def image_bytes(url: str, image_root: Path | None, max_bytes: int) -> bytes:
    """The encoded image ``url`` names; a ``RequestError`` saying why when it cannot be had."""
    if url.startswith("data:"):
        return _data_url(url, max_bytes)
    if url.startswith(("http://", "https://", "ftp://")):
        raise RequestError(
            "remote image URLs are not fetched by this server; send the image inline as a "
            "data:image/...;base64 URL",
            "image_url",
        )
    return _local_file(url.removeprefix("file://"), image_root, max_bytes)


def _data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(
            "a data URL must be data:image/<type>;base64,<data>", "image_url", "invalid_image"
        )
    if len(payload) * 3 // 4 > max_bytes:
        raise _too_large(len(payload) * 3 // 4, max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            f"the image's base64 data does not decode ({exc})", "image_url", "invalid_image"
        ) from None


def _local_file(path: str, image_root: Path | None, max_bytes: int) -> bytes:
    if image_root is None:
        raise RequestError(
            "local image paths are off on this server (start it with --image-root DIR); send "
            "a data: URL",
            "image_url",
        )
    root = image_root.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise RequestError(f"{path} is outside the server's image root", "image_url")
    if not target.is_file():
        raise RequestError(f"no image file {path} under the image root", "image_url")
    if target.stat().st_size > max_bytes:
        raise _too_large(target.stat().st_size, max_bytes)
    return target.read_bytes()


def _too_large(size: int, max_bytes: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"the image is {size / 2**20:.1f} MB, over this server's {max_bytes / 2**20:.0f} MB "
        "limit (--max-image-mb); send a smaller image",
        "image_url",
        "image_too_large",
    )
