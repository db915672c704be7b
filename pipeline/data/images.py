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

High bit depths (greyscale only; PIL has no 16/32-bit colour modes) map to 8 bits by what the values
can mean, never by clipping, which turned every 32-bit image white:

- 16-bit (``I;16*``, or ``I`` declared or found within 0..65535, as older Pillow opens 16-bit PNGs):
  ``v * 255 / 65535``, the full 16-bit range.
- 32-bit integer (``I`` with values outside 0..65535 or a TIFF declaring 32 bits per sample): no display
  range of its own, so the image's actual range ``[min, max]`` maps to ``[0, 255]`` (rounded).
- 32-bit float (``F``): values within ``[0, 1]`` are the float convention, ``v * 255`` (rounded);
  otherwise the actual range maps to ``[0, 255]`` as for integers. NaN or infinite values make the file
  unreadable (:class:`UnreadableImageError`), at the index already.

A constant image outside those conventions has no range to stretch and reads as black.
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
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise UnreadableImageError(f"{path}: 32-bit float image with NaN or infinite pixel values, which "
                                   "have no grey level")
    return image


def _declared_bits(image: Image.Image) -> int | None:
    """Bits per sample a TIFF declares (tag 258), else None."""
    bits = getattr(image, "tag_v2", {}).get(258)
    if isinstance(bits, tuple | list):
        bits = bits[0] if bits else None
    return bits if isinstance(bits, int) else None


def _stretch(values: np.ndarray) -> np.ndarray:
    """The image's actual range ``[min, max]`` onto ``[0, 255]``; a constant image is black."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Mode ``L`` of a 16/32-bit integer or 32-bit float greyscale image (rules: module docstring)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        grey = np.clip(values * (255.0 / 65535.0), 0, 255).astype(np.uint8)
    elif image.mode == "F":
        in_unit = values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0)
        grey = np.rint(values * 255.0).astype(np.uint8) if in_unit else _stretch(values)
    else:  # "I": 32-bit signed integers, or 16-bit data opened as I
        in_16 = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        if in_16 and _declared_bits(image) != 32:
            grey = np.clip(values * (255.0 / 65535.0), 0, 255).astype(np.uint8)
        else:
            grey = _stretch(values)
    return Image.fromarray(grey)  # uint8, 2-D: mode L


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; 16/32-bit greyscale is rescaled (see the module docstring), never
    clipped to white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
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
