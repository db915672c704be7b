"""Small numpy/PIL drawing helpers for looking at response maps, masks and galleries of cases.

Everything returns new ``uint8 (H, W, 3)`` arrays (inputs are never modified), so panels compose with
plain function calls. No matplotlib: the colormap is a few lines of numpy, the text is PIL's default font.
"""

from __future__ import annotations

import html
import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from pipeline.atomic import atomic_dir

RGB = tuple[int, int, int]
GT_COLOR: RGB = (0, 255, 0)
POINT_COLOR: RGB = (255, 0, 255)
PRED_COLOR: RGB = (255, 255, 0)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return image


def jet(values01: np.ndarray) -> np.ndarray:
    """Jet colormap: 0 -> dark blue, 0.5 -> light green, 1 -> dark red; ``(..., 3)`` uint8."""
    v = np.clip(np.asarray(values01, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # r, g, b ramps peak at v = 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def overlay(image_rgb: np.ndarray, map01: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a ``(H, W)`` map in [0, 1] (values outside are clipped) as a jet heat map over the image."""
    image = _check_image(image_rgb)
    map01 = np.asarray(map01, dtype=np.float32)
    if map01.shape != image.shape[:2]:
        raise ValueError(f"map shape {map01.shape} != image shape {image.shape[:2]}")
    if not np.isfinite(map01).all():
        raise ValueError("map contains NaN or infinite values")
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * jet(map01).astype(np.float32)
    return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def draw_contour(image: np.ndarray, mask: np.ndarray, color: RGB = GT_COLOR) -> np.ndarray:
    """Paint the inner boundary pixels of a bool mask (``find_boundaries(mode="inner")``)."""
    out = _check_image(image).copy()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != out.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} != image shape {out.shape[:2]}")
    out[find_boundaries(mask, mode="inner")] = color
    return out


def draw_point(
    image: np.ndarray, point: tuple[int, int], color: RGB = POINT_COLOR, radius: int = 3
) -> np.ndarray:
    """Mark ``(y, x)`` with a filled disc of ``radius`` pixels ringed in black, clipped at the borders."""
    out = _check_image(image).copy()
    h, w = out.shape[:2]
    y, x = point
    yy, xx = np.ogrid[:h, :w]
    d2 = (yy - y) ** 2 + (xx - x) ** 2
    out[d2 <= (radius + 1) ** 2] = 0
    out[d2 <= radius**2] = color
    return out


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def caption(image: np.ndarray, text: str, background: RGB = (255, 255, 255)) -> np.ndarray:
    """Add a band above the image with ``text`` in black, wrapped to the image width."""
    image = _check_image(image)
    h, w = image.shape[:2]
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    char_w = max(1.0, measure.textlength("x" * 20, font=font) / 20)
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width=max(1, int((w - 4) // char_w))) or [""]
    top, bottom = measure.textbbox((0, 0), "Ag", font=font)[1::2]
    line_h = bottom - top + 3
    band = Image.new("RGB", (w, line_h * len(lines) + 4), background)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((2, 2 + i * line_h - top), line, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(band, dtype=np.uint8), image], axis=0)


def hstack(images: Sequence[np.ndarray], pad: int = 4, background: RGB = (255, 255, 255)) -> np.ndarray:
    """Place images side by side, top-aligned, ``pad`` pixels apart, filling the rest with ``background``."""
    if not images:
        raise ValueError("hstack needs at least one image")
    images = [_check_image(im) for im in images]
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + pad * (len(images) - 1)
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = background
    x = 0
    for im in images:
        out[: im.shape[0], x : x + im.shape[1]] = im
        x += im.shape[1] + pad
    return out


def _fit(panel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D map (bilinear) or mask (nearest) to ``size`` = (H, W) if it differs."""
    panel = np.asarray(panel)
    if panel.shape == size:
        return panel
    h, w = size
    if panel.dtype == bool:
        return np.asarray(Image.fromarray(panel).resize((w, h), Image.NEAREST), dtype=bool)
    img = Image.fromarray(panel.astype(np.float32)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def render_case(
    image: np.ndarray,
    map01: np.ndarray,
    gt_mask: np.ndarray | None,
    text: str,
    point: tuple[int, int] | None = None,
    extra_panels: Sequence[tuple[str, np.ndarray]] = (),
) -> np.ndarray:
    """One inspection row: the image with the GT contour, then the map over it with its maximum point,
    then each extra panel (a float map in [0, 1] as a heat overlay, a bool mask as a yellow contour);
    the expression ``text`` captions the row. Maps and masks are resized to the image if needed."""
    image = _check_image(image)
    size = image.shape[:2]
    if gt_mask is not None:
        gt_mask = _fit(np.asarray(gt_mask, dtype=bool), size)
    with_gt = draw_contour(image, gt_mask) if gt_mask is not None else image
    heat = overlay(image, _fit(map01, size))
    if gt_mask is not None:
        heat = draw_contour(heat, gt_mask)
    if point is not None:
        heat = draw_point(heat, point)
    panels = [caption(with_gt, "image + GT"), caption(heat, "response")]
    for title, panel in extra_panels:
        panel = _fit(panel, size)
        drawn = draw_contour(image, panel, PRED_COLOR) if panel.dtype == bool else overlay(image, panel)
        panels.append(caption(drawn, title))
    return caption(hstack(panels), text)


def _png_bytes(image: bytes | np.ndarray) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    buf = io.BytesIO()
    Image.fromarray(_check_image(image)).save(buf, format="PNG")
    return buf.getvalue()


def select_sections(scores: Sequence[float], per_section: int) -> dict[str, list[int]]:
    """Indices of the ``per_section`` best, median and worst cases by score (ties keep input order).

    With fewer than ``3 * per_section`` cases the sections overlap rather than shrink.
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    k = min(per_section, len(order))
    mid = (len(order) - k + 1) // 2  # the window holding the median (upper one if even)
    return {"best": order[:k], "median": order[mid : mid + k], "worst": order[len(order) - k :][::-1]}


def write_gallery(
    out_dir: str | Path,
    cases: Sequence[Mapping[str, Any]],
    title: str,
    per_section: int = 4,
    score_name: str = "IoU",
) -> Path:
    """Write ``case_NNN.png`` files and an ``index.html`` with "best", "median" and "worst" sections.

    Each case is ``{"title": str, "image": PNG bytes or uint8 (H, W, 3), "score": float}`` plus an
    optional ``"point_m": bool``; the caption shows the title, ``score_name`` = score and the PointM
    hit. ``out_dir`` is replaced as a whole (atomically), so stale cases never linger. Returns the
    path of ``index.html``.
    """
    for i, case in enumerate(cases):
        missing = {"title", "image", "score"} - set(case)
        if missing:
            raise ValueError(f"gallery case {i} lacks {sorted(missing)}")
    sections = select_sections([float(c["score"]) for c in cases], per_section)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        used = sorted({i for idx in sections.values() for i in idx})
        for i in used:
            (tmp / f"case_{i:03d}.png").write_bytes(_png_bytes(cases[i]["image"]))
        parts = [
            "<!doctype html>",
            '<html><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif} figure{display:inline-block;margin:6px;vertical-align:top}"
            " figcaption{max-width:480px;font-size:13px}</style>",
            f"</head><body><h1>{html.escape(title)}</h1>",
            f"<p>{len(cases)} cases, sorted by {html.escape(score_name)}.</p>",
        ]
        for name, idx in sections.items():
            parts.append(f'<h2 id="{name}">{name}</h2><div class="section">')
            for i in idx:
                case = cases[i]
                bits = [f"{html.escape(score_name)} {float(case['score']):.3f}"]
                if "point_m" in case:
                    bits.append("PointM " + ("hit" if case["point_m"] else "miss"))
                text = html.escape(str(case["title"]))
                parts.append(
                    f'<figure><img src="case_{i:03d}.png" alt="{text}">'
                    f"<figcaption>{text}<br>{' · '.join(bits)}</figcaption></figure>"
                )
            parts.append("</div>")
        parts.append("</body></html>")
        (tmp / "index.html").write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out_dir / "index.html"
