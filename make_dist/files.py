"""Files at any fsspec URL or local path: atomic writes, bytes, images.

A file written here appears complete or not at all: it is written beside its
final name and renamed, so a crash or a stop never leaves half a file where a
reader (a resumed run, another node) would take it for whole.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import fsspec
from PIL import Image


@contextlib.contextmanager
def atomic_writer(url: str, mode: str = "wb") -> Iterator[io.IOBase]:
    """A file object whose content appears at `url` only when the block ends
    without an error (written to a hidden name beside it, then renamed)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.tmp"
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, mode) as f:
            yield f
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise
    fs.mv(tmp, path)


def write_atomic(url: str, data: bytes | str) -> None:
    """`data` at `url`, all of it or nothing."""
    with atomic_writer(url, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def read_bytes(url: str) -> bytes:
    with fsspec.open(str(url), "rb") as f:
        return f.read()


def open_image(data: bytes, fit: int | None = None) -> Image.Image:
    """A decoded image (its own mode). A JPEG is decoded at the smallest DCT
    scale whose sides still cover `fit` pixels: a 1600-px photo for a 224-px
    crop decodes at an eighth of the work. Raises on truncated or empty files."""
    image = Image.open(io.BytesIO(data))
    if fit and image.format == "JPEG" and max(image.size) > fit:
        image.draft("RGB", (fit, fit))
    image.load()
    if image.width < 1 or image.height < 1:
        raise ValueError("empty image")
    return image
