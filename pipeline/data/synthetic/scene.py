"""Scene painter of the synthetic dataset: which shapes an image holds, where, and its pixels.

Objects are painted through the pycocotools raster of their own COCO polygon, so the ground-truth mask
that the index decodes covers exactly the painted pixels (PIL's polygon fill differs on the boundary).
Nothing here knows about expressions: :mod:`.expressions` reads :class:`SceneObject` and the visual
vocabulary (``SHAPES``, ``COLOURS``, ``SIZES``) from here.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.rle import decode_rle

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 215, 40),
    "purple": (140, 50, 185),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")


@dataclass(frozen=True)
class SceneObject:
    """One shape in an image; ``radius`` is the circumradius in pixels, (cx, cy) its centre."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    rotation: float = 0.0


def _unit_shape(shape: str) -> np.ndarray:
    """Vertices of ``shape`` with circumradius 1, centred at the origin, y pointing down."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if shape == "square":
        angles = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if shape == "diamond":  # taller than wide so it never looks like a turned square
        return np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]])
    if shape == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if shape == "hexagon":
        angles = np.arange(6) * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    if shape == "cross":
        norm = math.hypot(0.33, 1.0)  # arms of half-width 0.33 and length 1, scaled so tips reach radius 1
        a, b = 0.33 / norm, 1.0 / norm
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a],
                         [-b, a], [-b, -a], [-a, -a]])
    raise ValueError(f"unknown shape {shape!r}")


def object_polygon(obj: SceneObject) -> list[float]:
    """COCO polygon ``[x1, y1, x2, y2, ...]`` (2 decimals) of ``obj`` in image pixels."""
    c, s = math.cos(obj.rotation), math.sin(obj.rotation)
    unit = _unit_shape(obj.shape) @ np.array([[c, s], [-s, c]])
    points = unit * obj.radius + np.array([obj.cx, obj.cy])
    return [round(float(v), 2) for v in points.ravel()]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted low-frequency colour noise plus faint stripes or checks (never a flat colour)."""
    hue, sat, val = rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.65)
    base = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255
    gh, gw = (int(v) for v in rng.integers(3, 7, size=2))
    shading = rng.normal(0, 20, size=(gh, gw, 1)) + rng.normal(0, 6, size=(gh, gw, 3))  # mostly brightness
    coarse = np.clip(base + shading, 0, 255).astype(np.uint8)
    field_ = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    period, amp, kind = rng.uniform(6, 22), rng.uniform(5, 11), int(rng.integers(3))
    if kind == 0:  # stripes at a random angle: sin(u + v) = sin u cos v + cos u sin v, separable
        theta = rng.uniform(0, np.pi)
        u, v = 2 * np.pi * x * np.cos(theta) / period, 2 * np.pi * y * np.sin(theta) / period
        pattern = np.sin(u) * np.cos(v) + np.cos(u) * np.sin(v)
    elif kind == 1:  # checks
        pattern = np.sign(np.sin(np.pi * x / period)) * np.sign(np.sin(np.pi * y / period))
    else:  # soft grid
        pattern = np.cos(2 * np.pi * x / period) * np.cos(2 * np.pi * y / period)
    grain = (rng.random(size=(height, width), dtype=np.float32) - 0.5) * 10
    return field_ + (amp * pattern + grain)[..., None]


def _attributes(rng: np.random.Generator, placed: list[SceneObject],
                distractor_rate: float) -> tuple[str, str, str] | None:
    """Shape, colour, size of a new object; may copy an existing colour or shape, never a whole triple."""
    taken = {(o.shape, o.colour, o.size) for o in placed}
    for _ in range(50):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = SIZES[int(rng.integers(2))]
        if placed and rng.random() < distractor_rate:
            source = placed[int(rng.integers(len(placed)))]
            if rng.random() < 0.5:
                colour = source.colour
            else:
                shape = source.shape
        if (shape, colour, size) not in taken:
            return shape, colour, size
    return None


def place_objects(rng: np.random.Generator, n: int, height: int, width: int,
                   object_scale: tuple[float, float], distractor_rate: float) -> list[SceneObject] | None:
    """``n`` non-overlapping objects by rejection sampling (None if the scene cannot be completed)."""
    lo, hi = object_scale
    margin = 3.0
    placed: list[SceneObject] = []
    for _ in range(n):
        attrs = _attributes(rng, placed, distractor_rate)
        if attrs is None:
            return None
        shape, colour, size = attrs
        frac = rng.uniform(0.6, 1.0) if size == "large" else rng.uniform(0.0, 0.4)
        radius = (lo + frac * (hi - lo)) * min(height, width) / 2
        rotation = 0.0 if shape == "circle" else float(np.deg2rad(rng.uniform(-10, 10)))
        for _ in range(200):
            cx = rng.uniform(radius + margin, width - radius - margin)
            cy = rng.uniform(radius + margin, height - radius - margin)
            if all(math.hypot(cx - o.cx, cy - o.cy) >= radius + o.radius + margin for o in placed):
                placed.append(SceneObject(shape, colour, size, round(float(cx), 2), round(float(cy), 2),
                                          round(float(radius), 2), round(rotation, 4)))
                break
        else:
            return None
    return placed


def paint(rng: np.random.Generator, height: int, width: int,
          objects: list[SceneObject]) -> tuple[np.ndarray, list[dict]]:
    """Pixels of a ``height x width`` scene of ``objects`` and each object's COCO RLE (painted through
    that very RLE)."""
    canvas = _background(rng, height, width)
    rles = []
    for obj in objects:
        polygon = object_polygon(obj)
        rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
        mask = decode_rle(rle)
        colour = np.array(COLOURS[obj.colour], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        shade = 1.0 + rng.uniform(-0.04, 0.04)
        canvas[mask] = colour * shade
        rles.append(rle)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), rles
