"""Images as users hold them, decoded to one uint8 [H, W, C] shape with PIL.

Every image is brought upright (EXIF orientation) and to 8-bit grey or RGB: palette images
through PIL's conversion (never their indices), 16-bit images scaled to 8 bits (not their
low byte), alpha composited on black, any other mode converted. Then `data.channels` and
`data.image_size` / `data.resize` bring a mixed source to one shape; without them a mix is
refused naming the field that would fix it. Each fix is a bit per row, summed into
partition/stats.json as `decode_fixes`.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from runstore.errors import InputError

FIXES = ("palette", "16bit", "alpha", "exif", "mode", "resized")
FIX_BIT = {name: 1 << index for index, name in enumerate(FIXES)}
RESIZE_MODES = ("center_crop", "pad", "stretch")
_ALPHA_MODES = {"LA": "LA", "La": "LA", "RGBA": "RGBA", "RGBa": "RGBA", "PA": "RGBA"}
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112
DECODE_THREADS = min(8, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class ImageOptions:
    channels: int | None = None  # 1 or 3; None: as the data is (one kind only)
    image_size: int | None = None  # square side; None: as the data is (one size only)
    resize: str = "center_crop"


def _upright(image: Image.Image) -> tuple[Image.Image, int]:
    """8-bit L or RGB, the right way up; the fixes it took."""
    fixes = 0
    if image.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
        image = ImageOps.exif_transpose(image)
        fixes |= FIX_BIT["exif"]
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info
                              else "RGB")
        fixes |= FIX_BIT["palette"]
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)), \
            fixes | FIX_BIT["16bit"]
    if image.mode in _ALPHA_MODES:
        pixels = np.asarray(image.convert(_ALPHA_MODES[image.mode]), dtype=np.uint16)
        colour = pixels[..., :-1] * pixels[..., -1:] // 255  # on black
        colour = colour.astype(np.uint8)
        return Image.fromarray(colour[..., 0] if colour.shape[-1] == 1 else colour), \
            fixes | FIX_BIT["alpha"]
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB" if len(image.getbands()) >= 3 else "L")
        fixes |= FIX_BIT["mode"]
    return image, fixes


def _fitted(image: Image.Image, options: ImageOptions) -> tuple[Image.Image, int]:
    fixes = 0
    if options.channels is not None and len(image.getbands()) != options.channels:
        image = image.convert("L" if options.channels == 1 else "RGB")
        fixes |= FIX_BIT["mode"]
    side = options.image_size
    if side is not None and image.size != (side, side):
        method = Image.Resampling.BICUBIC
        if options.resize == "stretch":
            image = image.resize((side, side), method)
        elif options.resize == "pad":
            image = ImageOps.pad(image, (side, side), method=method, color=0)
        else:
            image = ImageOps.fit(image, (side, side), method=method)
        fixes |= FIX_BIT["resized"]
    return image, fixes


def decode_image(value: Any, options: ImageOptions) -> tuple[np.ndarray, int]:
    """uint8 [H, W, C] from encoded bytes or a 2-D uint8 array, and the fixes it took."""
    if isinstance(value, np.ndarray):
        image, fixes = Image.fromarray(value), 0
    else:
        opened = Image.open(io.BytesIO(value))
        opened.load()
        image, fixes = _upright(opened)
    image, more = _fitted(image, options)
    pixels = np.asarray(image, dtype=np.uint8)
    return (pixels[..., None] if pixels.ndim == 2 else pixels), fixes | more


def _decode_chunk(values: list[Any], options: ImageOptions) -> list[tuple[np.ndarray, int]
                                                                      | None]:
    out: list[tuple[np.ndarray, int] | None] = []
    for value in values:
        try:
            out.append(None if value is None else decode_image(value, options))
        except Exception:  # reported with its row number by the caller
            out.append(None)
    return out


def decode_many(values: list[Any], options: ImageOptions) -> list[tuple[np.ndarray, int]
                                                                     | None]:
    """Decode in chunks across threads: PIL's decoders release the GIL."""
    global _pool
    if len(values) < 256 or DECODE_THREADS == 1:
        return _decode_chunk(values, options)
    if _pool is None:
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
    step = -(-len(values) // DECODE_THREADS)
    parts = _pool.map(_decode_chunk, [values[i:i + step] for i in range(0, len(values), step)],
                      [options] * DECODE_THREADS)
    return [item for part in parts for item in part]


def _describe(shape: tuple[int, ...]) -> str:
    kind = {1: "grey", 3: "RGB"}.get(shape[2], f"{shape[2]}-channel")
    return f"{shape[0]}x{shape[1]} {kind}"


class ShapeCheck:
    """Every decoded image must share the first one's shape; a mix is refused naming the
    field that would bring it to one (`data.channels`, `data.image_size`)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.shape: tuple[int, ...] | None = None
        self.row = -1

    def check(self, shape: tuple[int, ...], row: int) -> None:
        if self.shape is None:
            self.shape, self.row = shape, row
            return
        if shape == self.shape:
            return
        first, this = (f"row {self.row} is {_describe(self.shape)}",
                       f"row {row} is {_describe(shape)}")
        if shape[2] != self.shape[2]:
            raise InputError("data.channels", f"{self.where} mixes grey and colour images "
                             f"({first}, {this}); set data.channels: 1 or 3")
        raise InputError("data.image_size", f"{self.where} mixes image sizes ({first}, "
                         f"{this}); set data.image_size (and data.resize: center_crop, pad "
                         "or stretch)")


def decode_batch(values: list[Any], ids: np.ndarray, options: ImageOptions,
                 shapes: ShapeCheck, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, H, W, C], uint8 [n] fix bits) of one batch of rows `ids`."""
    decoded = decode_many(values, options)
    for index, item in enumerate(decoded):
        if item is None:
            kind = "has no image" if values[index] is None else "is not a decodable image"
            raise InputError(where, f"row {int(ids[index])} {kind} (expected PNG, JPEG, "
                             "WebP, ... bytes)")
        shapes.check(item[0].shape, int(ids[index]))  # type: ignore[index]
    if not decoded:
        return np.zeros((0, *(shapes.shape or (0, 0, 0))), np.uint8), np.zeros(0, np.uint8)
    return (np.stack([item[0] for item in decoded]),  # type: ignore[index]
            np.array([item[1] for item in decoded], np.uint8))  # type: ignore[index]
