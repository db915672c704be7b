"""Decoding images the same way everywhere: upright (EXIF orientation applied), RGB, fully loaded.

Why one reader: RefCOCO's COCO images include greyscale and CMYK JPEGs, and phone photos carry EXIF
orientation; if the index measured one size and training decoded another, masks (stored at the
``instances.json`` size) would silently misalign with pixels. Truncated files must fail loudly instead of
being padded with grey by PIL's ``LOAD_TRUNCATED_IMAGES``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


class UnreadableImageError(OSError):
    """An image file exists but cannot be decoded completely (truncated, corrupt, not an image)."""


def _load(path: Path) -> Image.Image:
    """Open and fully decode ``path``; raise :class:`UnreadableImageError` naming it on any decode error."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must raise, not decode to grey
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"{path}: cannot decode image ({err})") from err
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; 16/32-bit greyscale is rescaled rather than clipped to white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode != "F" else 255.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` to an upright ``(H, W, 3)`` uint8 RGB array (greyscale, CMYK, palette handled)."""
    path = Path(path)
    image = _load(path)
    try:
        upright = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImageError(f"{path}: cannot apply EXIF orientation ({err})") from err
    return np.ascontiguousarray(np.asarray(_to_rgb(upright), dtype=np.uint8))


def decoded_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of the upright decoded image, decoding fully (so truncation is detected).

    Cheaper than :func:`read_image_rgb` for indexing: the pixels are decoded but not rotated or
    converted; the EXIF orientation tag decides whether width and height swap, exactly as
    ``ImageOps.exif_transpose`` would.
    """
    path = Path(path)
    image = _load(path)
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):
        orientation = 1
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)
