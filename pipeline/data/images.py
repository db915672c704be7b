"""Decoding images the same way everywhere: RGB, fully loaded, in the annotations' pixel space.

Why one reader: RefCOCO's COCO images include greyscale and CMYK JPEGs, and phone photos carry EXIF
orientation; if the index measured one size and training decoded another, masks (stored at the
``instances.json`` size) would silently misalign with pixels. Truncated files must fail loudly instead of
being padded with grey by PIL's ``LOAD_TRUNCATED_IMAGES``.

Orientation convention: dataset images are read as stored, ignoring the EXIF orientation tag. That is
the space COCO/REFER annotations were drawn in (their tooling reads stored pixels without EXIF
transpose), so pixels and masks agree for all eight orientations and for square images, where a
rotation would not even change the size. ``exif_transpose=True`` gives the upright, displayed image; it
is for a user's own photo in ``pipeline.predict``, never for indexed data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps


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


def read_image_rgb(path: str | Path, *, exif_transpose: bool = False) -> np.ndarray:
    """Decode ``path`` to an ``(H, W, 3)`` uint8 RGB array (greyscale, CMYK, palette handled).

    As stored by default (the annotation space, see the module docstring); ``exif_transpose=True``
    applies the EXIF orientation tag first, giving the image as a viewer displays it.
    """
    path = Path(path)
    image = _load(path)
    if exif_transpose:
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as err:
            raise UnreadableImageError(f"{path}: cannot apply EXIF orientation ({err})") from err
    return np.ascontiguousarray(np.asarray(_to_rgb(image), dtype=np.uint8))


def decoded_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of the image as :func:`read_image_rgb` returns it by default (as stored).

    Decodes fully, so truncation is detected, but skips the RGB conversion: the index calls it once
    per image.
    """
    return _load(Path(path)).size
