"""A synthetic referring-expression dataset written in the exact REFER (RefCOCO) file layout.

Why: the pipeline must run end to end, and be tested, without the 20k-image RefCOCO download. Each
scene holds a few non-overlapping coloured shapes on a textured background; every expression is
checked against *all* objects of its image with the same predicate a reader would apply
(:func:`resolve`), so an expression is kept only if it singles out exactly its own object. Attributes
alone are often ambiguous (``distractor_rate`` makes objects share a colour or a shape), so position
("the circle on the left") and relation ("the star left of the blue square") expressions carry real
information, as in RefCOCO.

Files (``out_root`` = the stage output):

- ``<dataset>/refs(<split_by>).p``: REFER's pickled list of ref dicts (``ref_id, ann_id, image_id,
  split, sentences[{raw, sent, tokens, sent_id}], sent_ids, category_id, file_name``);
- ``<dataset>/instances.json``: COCO images / annotations (polygon, xywh bbox, area) / categories;
- ``<dataset>/scenes.json``: each object's shape, colour, size class and geometry (a sidecar the REFER
  readers ignore; tests use it to re-check every expression with :func:`parse_expression`);
- ``images/synth_<image_id, six digits>.jpg``, e.g. ``images/synth_000042.jpg``.

Objects are painted through the pycocotools raster of their own COCO polygon, so the ground-truth mask
that the index decodes covers exactly the painted pixels (PIL's polygon fill differs on the boundary).
Everything is a pure function of ``seed``: each image draws from its own ``numpy`` generator.
"""

from __future__ import annotations

import colorsys
import json
import math
import pickle
import re
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.index import decode_rle

# ----------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------

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
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("big", "large")}
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
               "star": ("star",), "cross": ("cross", "plus"), "diamond": ("diamond",),
               "hexagon": ("hexagon",)}
GENERIC_NOUNS = ("object", "thing", "shape", "one")
POSITIONS = ("left", "right", "top", "bottom", "middle")
RELATIONS = ("left", "right", "above", "below", "next_to")

_POSITION_PREFIX = {"left": ("leftmost", "left"), "right": ("rightmost", "right"),
                    "top": ("top", "topmost", "upper"), "bottom": ("bottom", "lowest", "bottommost"),
                    "middle": ("middle",)}
_POSITION_SUFFIX = {"left": ("on the left", "on the left side"),
                    "right": ("on the right", "on the right side"),
                    "top": ("at the top",), "bottom": ("at the bottom",), "middle": ("in the middle",)}
_RELATION_PHRASES = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
                     "above": ("above",), "below": ("below", "under"),
                     "next_to": ("next to", "beside", "near")}

# Parser tables (inverse of the above).
_SIZE_OF = {w: s for s, words in SIZE_WORDS.items() for w in words}
_SHAPE_OF = {w: s for s, words in SHAPE_WORDS.items() for w in words}
_POSITION_OF = {w: p for p, words in _POSITION_PREFIX.items() for w in words}
_REL_ONE_WORD = {"above": "above", "below": "below", "under": "below", "beside": "next_to", "near": "next_to"}
_FILLER = {"the", "on", "at", "in", "side", "to", "of"}

# Geometry of "clearly": margins in units of the two objects' summed radii.
_SUPERLATIVE_MARGIN = 0.6   # the extreme object leads every other candidate by this much
_DIRECTION_STRICT = (0.6, 0.8)   # along > 0.6 * (r_a + r_b) and |across| < 0.8 * along
_DIRECTION_LOOSE = (0.2, 1.25)   # anything this close to holding counts as a competing referent
_NEAR_STRICT, _NEAR_LOOSE = 0.5, 1.0  # boundary gap / (r_a + r_b)


# ----------------------------------------------------------------------------------------------------
# Scene objects and expression structures
# ----------------------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class Desc:
    """An attribute description; ``None`` means the attribute is not mentioned."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return ((self.size is None or obj.size == self.size)
                and (self.colour is None or obj.colour == self.colour)
                and (self.shape is None or obj.shape == self.shape))


@dataclass(frozen=True)
class Expr:
    """A referring expression's meaning: ``target`` narrowed by a position or a relation to ``anchor``."""

    target: Desc
    position: str | None = None
    relation: str | None = None
    anchor: Desc | None = None

    @property
    def family(self) -> str:
        return "relation" if self.relation else "position" if self.position else "attribute"


# ----------------------------------------------------------------------------------------------------
# The predicate: which object does an expression refer to?
# ----------------------------------------------------------------------------------------------------

def _superlative(position: str, objs: list[SceneObject], idx: list[int]) -> int | None:
    """Index of the object clearly extreme in ``position`` among ``idx`` (None if not clear)."""
    if position == "middle":
        if len(idx) != 3:
            return None
        order = sorted(idx, key=lambda i: objs[i].cx)
        a, m, b = (objs[i] for i in order)
        ok = (m.cx - a.cx > _SUPERLATIVE_MARGIN * (a.radius + m.radius)
              and b.cx - m.cx > _SUPERLATIVE_MARGIN * (b.radius + m.radius))
        return order[1] if ok else None
    if not idx:
        return None
    key = {"left": lambda o: o.cx, "right": lambda o: -o.cx, "top": lambda o: o.cy,
           "bottom": lambda o: -o.cy}[position]
    best = min(idx, key=lambda i: key(objs[i]))
    for i in idx:
        lead = key(objs[i]) - key(objs[best])
        if i != best and lead <= _SUPERLATIVE_MARGIN * (objs[i].radius + objs[best].radius):
            return None
    return best


def relation_holds(relation: str, obj: SceneObject, anchor: SceneObject, strict: bool) -> bool:
    """Whether ``obj`` stands in ``relation`` to ``anchor``: clearly (``strict``) or possibly (loose)."""
    reach = obj.radius + anchor.radius
    if relation == "next_to":
        gap = math.hypot(obj.cx - anchor.cx, obj.cy - anchor.cy) - reach
        return gap < (_NEAR_STRICT if strict else _NEAR_LOOSE) * reach
    dx, dy = anchor.cx - obj.cx, anchor.cy - obj.cy  # > 0: obj is left of / above anchor
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    min_along, max_slope = _DIRECTION_STRICT if strict else _DIRECTION_LOOSE
    return along > min_along * reach and abs(across) < max_slope * along


def resolve(expr: Expr, objs: list[SceneObject]) -> int | None:
    """The single object ``expr`` refers to, or None when it is ambiguous or refers to nothing.

    Relations: the anchor must be unique by its description, exactly one candidate may even loosely
    stand in the relation, and that one must stand in it clearly.
    """
    idx = [i for i, o in enumerate(objs) if expr.target.matches(o)]
    if expr.relation is not None:
        anchor = resolve(Expr(expr.anchor or Desc()), objs)
        if anchor is None:
            return None
        loose = [i for i in idx if i != anchor
                 and relation_holds(expr.relation, objs[i], objs[anchor], strict=False)]
        if len(loose) == 1 and relation_holds(expr.relation, objs[loose[0]], objs[anchor], strict=True):
            return loose[0]
        return None
    if expr.position is not None:
        return _superlative(expr.position, objs, idx)
    return idx[0] if len(idx) == 1 else None


# ----------------------------------------------------------------------------------------------------
# Text: rendering and parsing
# ----------------------------------------------------------------------------------------------------

def clean_sentence(raw: str) -> str:
    """REFER's ``sent``: lower case, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", raw.lower()).split())


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _desc_words(desc: Desc, rng: np.random.Generator) -> str:
    words = []
    if desc.size:
        words.append(_pick(rng, SIZE_WORDS[desc.size]))
    if desc.colour:
        words.append(desc.colour)
    words.append(_pick(rng, SHAPE_WORDS[desc.shape]) if desc.shape else _pick(rng, GENERIC_NOUNS))
    return " ".join(words)


def render_expression(expr: Expr, rng: np.random.Generator) -> str:
    """One wording of ``expr`` (synonyms and phrase order drawn from ``rng``)."""
    det = "the " if rng.random() < 0.75 else ""
    target = _desc_words(expr.target, rng)
    if expr.relation is not None:
        anchor = _desc_words(expr.anchor or Desc(), rng)
        return f"{det}{target} {_pick(rng, _RELATION_PHRASES[expr.relation])} the {anchor}"
    if expr.position is not None:
        if rng.random() < 0.5:
            return f"{det}{_pick(rng, _POSITION_PREFIX[expr.position])} {target}"
        return f"{det}{target} {_pick(rng, _POSITION_SUFFIX[expr.position])}"
    return f"{det}{target}"


def _parse_desc(tokens: list[str], text: str, allow_position: bool) -> tuple[Desc, str | None]:
    size = colour = shape = position = None
    for tok in tokens:
        if tok in _FILLER or tok in GENERIC_NOUNS:
            continue
        if tok in _SIZE_OF:
            size = _SIZE_OF[tok]
        elif tok in COLOURS:
            colour = tok
        elif tok in _SHAPE_OF:
            shape = _SHAPE_OF[tok]
        elif allow_position and tok in _POSITION_OF:
            position = _POSITION_OF[tok]
        else:
            raise ValueError(f"cannot parse {text!r}: unknown word {tok!r}")
    return Desc(size, colour, shape), position


def parse_expression(text: str) -> Expr:
    """Recover the meaning of a generated expression from its text (the inverse of the templates)."""
    tokens = clean_sentence(text).split()
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        relation, width = None, 1
        if tok in _REL_ONE_WORD:
            relation = _REL_ONE_WORD[tok]
        elif tok in ("left", "right") and nxt == "of":
            relation, width = tok, 2
        elif tok == "next" and nxt == "to":
            relation, width = "next_to", 2
        if relation is not None:
            target, _ = _parse_desc(tokens[:i], text, allow_position=False)
            anchor, _ = _parse_desc(tokens[i + width:], text, allow_position=False)
            return Expr(target, relation=relation, anchor=anchor)
    target, position = _parse_desc(tokens, text, allow_position=True)
    return Expr(target, position=position)


# ----------------------------------------------------------------------------------------------------
# Choosing expressions for an object
# ----------------------------------------------------------------------------------------------------

_ATTRS = ("size", "colour", "shape")


def _desc_of(obj: SceneObject, attrs: tuple[str, ...]) -> Desc:
    return Desc(**{a: getattr(obj, a) for a in attrs})


def _anchor_desc(k: int, objs: list[SceneObject], rng: np.random.Generator) -> Desc | None:
    """A shortest unique description of object ``k`` to serve as a relation's anchor (shape preferred)."""
    for n in (1, 2, 3):
        unique = [_desc_of(objs[k], a) for a in combinations(_ATTRS, n)
                  if resolve(Expr(_desc_of(objs[k], a)), objs) == k]
        if unique:
            with_shape = [d for d in unique if d.shape is not None]
            pool = with_shape or unique
            return pool[int(rng.integers(len(pool)))]
    return None


def candidate_expressions(t: int, objs: list[SceneObject],
                          anchors: list[Desc | None]) -> dict[str, list[Expr]]:
    """Every template meaning that singles out object ``t``, grouped by family.

    Position and relation expressions are only proposed when their attribute part alone is ambiguous
    (at least two candidates), so they are never padding on an already unique description.
    """
    obj = objs[t]
    found: dict[str, list[Expr]] = {"attribute": [], "position": [], "relation": []}
    subsets = [a for n in (0, 1, 2, 3) for a in combinations(_ATTRS, n)]
    for attrs in subsets:
        desc = _desc_of(obj, attrs)
        group = [i for i, o in enumerate(objs) if desc.matches(o)]
        if len(group) == 1:
            if attrs:
                found["attribute"].append(Expr(desc))
            continue
        for position in POSITIONS:
            expr = Expr(desc, position=position)
            if resolve(expr, objs) == t:
                found["position"].append(expr)
        if "size" in attrs:
            continue  # relations read best with colour / shape targets; keeps the candidate set small
        for a, anchor in enumerate(anchors):
            if a == t or anchor is None:
                continue
            for relation in RELATIONS:
                expr = Expr(desc, relation=relation, anchor=anchor)
                if resolve(expr, objs) == t:
                    found["relation"].append(expr)
    return found


def _attribute_count(expr: Expr) -> int:
    t = expr.target
    return sum(v is not None for v in (t.size, t.colour, t.shape))


def choose_expressions(found: dict[str, list[Expr]], k: int, rng: np.random.Generator,
                       family_weights: dict[str, float] | None = None) -> list[Expr]:
    """Up to ``k`` distinct meanings: a family drawn by ``family_weights`` (among families that have a
    candidate), then a meaning of it, favouring descriptions that name more attributes.

    The weights set the mix of attribute / position / relation expressions; fuller descriptions
    ("the large red circle" over "disc") are what make an expression informative across images, which
    the text-only training signal (classification against other images' expressions) relies on.
    """
    weights = family_weights or {"attribute": 1.0, "position": 1.0, "relation": 1.0}
    pools = {f: list(v) for f, v in found.items() if v and weights.get(f, 0.0) > 0}
    if not pools:  # every family weighted out: fall back to whatever singles the object out
        pools = {f: list(v) for f, v in found.items() if v}
    chosen: list[Expr] = []
    while len(chosen) < k and any(pools.values()):
        names = [f for f in pools if pools[f]]
        w = np.array([weights.get(f, 0.0) for f in names], dtype=float)
        w = w / w.sum() if w.sum() > 0 else np.full(len(names), 1 / len(names))
        family = names[int(rng.choice(len(names), p=w))]
        pool = pools[family]
        pw = np.array([1.0 + _attribute_count(e) for e in pool])
        chosen.append(pool.pop(int(rng.choice(len(pool), p=pw / pw.sum()))))
    return chosen


# ----------------------------------------------------------------------------------------------------
# Scenes and pixels
# ----------------------------------------------------------------------------------------------------

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


def _place_objects(rng: np.random.Generator, n: int, height: int, width: int,
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


# ----------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------

def _split_assignment(num_images: int, fractions: dict[str, float], seed: int) -> list[str]:
    """Split name of each image (by image, largest-remainder rounding, every named split non-empty)."""
    names = list(fractions)
    raw = np.array([fractions[n] for n in names], dtype=float) * num_images
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: num_images - counts.sum()]:
        counts[i] += 1
    for i in range(len(names)):  # borrow from the largest split so no named split is empty
        if fractions[names[i]] > 0 and counts[i] == 0 and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    labels = [n for n, c in zip(names, counts, strict=True) for _ in range(int(c))]
    order = np.random.default_rng([seed, 1]).permutation(num_images)
    return [labels[int(j)] for j in order]


def _raw_variant(text: str, rng: np.random.Generator) -> str:
    """RefCOCO's ``raw`` is as typed: sometimes capitalised, sometimes with a full stop."""
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.15:
        text += "."
    return text


@dataclass
class _Scene:
    height: int
    width: int
    objects: list[SceneObject]
    expressions: list[list[Expr]]


def _make_scene(rng: np.random.Generator, image_side: tuple[int, int], objects_per_image: tuple[int, int],
                object_scale: tuple[float, float], expressions_per_object: tuple[int, int],
                distractor_rate: float, family_weights: dict[str, float] | None = None) -> tuple[_Scene, int]:
    """Sample a scene whose every object gets at least one unique expression; return it and the retries."""
    for retry in range(1000):
        width = int(rng.integers(image_side[0], image_side[1] + 1))
        height = int(rng.integers(image_side[0], image_side[1] + 1))
        n = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
        objs = _place_objects(rng, n, height, width, object_scale, distractor_rate)
        if objs is None:
            continue
        anchors = [_anchor_desc(k, objs, rng) for k in range(len(objs))]
        chosen = []
        for t in range(len(objs)):
            k = int(rng.integers(expressions_per_object[0], expressions_per_object[1] + 1))
            chosen.append(choose_expressions(candidate_expressions(t, objs, anchors), max(k, 1), rng,
                                             family_weights))
        if all(chosen):
            return _Scene(height, width, objs, chosen), retry
    raise RuntimeError("could not sample a describable scene in 1000 tries; relax objects_per_image / "
                       "object_scale / image_side")


def _paint(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, list[dict]]:
    """Pixels of ``scene`` and each object's COCO RLE (painted through that very RLE)."""
    canvas = _background(rng, scene.height, scene.width)
    rles = []
    for obj in scene.objects:
        polygon = object_polygon(obj)
        rle = mask_utils.merge(mask_utils.frPyObjects([polygon], scene.height, scene.width))
        mask = decode_rle(rle)
        colour = np.array(COLOURS[obj.colour], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        shade = 1.0 + rng.uniform(-0.04, 0.04)
        canvas[mask] = colour * shade
        rles.append(rle)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), rles


def generate_synthetic_refer(out_root: Path, *, dataset: str, split_by: str, num_images: int,
                             objects_per_image: tuple[int, int], image_side: tuple[int, int],
                             expressions_per_object: tuple[int, int], object_scale: tuple[float, float],
                             distractor_rate: float, split_fractions: dict[str, float], jpeg_quality: int,
                             seed: int, family_weights: dict[str, float] | None = None) -> dict:
    """Write the dataset under ``out_root`` (see the module docstring) and return summary counts.

    The summary includes the two chance rates the evaluation compares against: how often a uniformly
    random pixel, and the image centre, fall inside the referred object's mask (per sentence).
    """
    out_root = Path(out_root)
    image_dir, data_dir = out_root / "images", out_root / dataset
    image_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = _split_assignment(num_images, split_fractions, seed)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    category_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, annotations, refs, scenes = [], [], [], []
    families = {"attribute": 0, "position": 0, "relation": 0}
    random_hits, centre_hits, retries = [], [], 0
    ann_id = ref_id = sent_id = 0
    for image_id in range(1, num_images + 1):
        rng = np.random.default_rng([seed, 2, image_id])
        scene, tries = _make_scene(rng, image_side, objects_per_image, object_scale, expressions_per_object,
                                   distractor_rate, family_weights)
        retries += tries
        pixels, rles = _paint(rng, scene)
        file_name = f"synth_{image_id:06d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=jpeg_quality, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width})
        scene_objects = []
        for obj, rle, exprs in zip(scene.objects, rles, scene.expressions, strict=True):
            ann_id += 1
            ref_id += 1
            polygon = object_polygon(obj)
            xs, ys = polygon[0::2], polygon[1::2]
            bbox = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
            area = float(mask_utils.area(rle))
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id[obj.shape],
                                "segmentation": [polygon], "bbox": bbox, "area": area, "iscrowd": 0})
            sentences = []
            for expr in exprs:
                sent_id += 1
                raw = _raw_variant(render_expression(expr, rng), rng)
                sent = clean_sentence(raw)
                sentences.append({"tokens": sent.split(), "raw": raw, "sent_id": sent_id, "sent": sent})
                families[expr.family] += 1
            refs.append({"sent_ids": [s["sent_id"] for s in sentences], "file_name":
                         f"synth_{image_id:06d}_{ann_id}.jpg", "ann_id": ann_id, "ref_id": ref_id,
                         "image_id": image_id, "split": splits[image_id - 1], "sentences": sentences,
                         "category_id": category_id[obj.shape]})
            mask = decode_rle(rle)
            random_hits += [area / (scene.height * scene.width)] * len(sentences)
            centre_hits += [bool(mask[scene.height // 2, scene.width // 2])] * len(sentences)
            scene_objects.append({"ann_id": ann_id, **asdict(obj)})
        scenes.append({"image_id": image_id, "objects": scene_objects})

    with (data_dir / f"refs({split_by}).p").open("wb") as fh:
        pickle.dump(refs, fh, protocol=4)
    instances = {"info": {"description": "synthetic shapes in REFER layout", "seed": seed},
                 "images": images, "annotations": annotations, "categories": categories}
    (data_dir / "instances.json").write_text(json.dumps(instances))
    (data_dir / "scenes.json").write_text(json.dumps({"images": scenes}))

    per_split = {name: {"images": 0, "refs": 0, "sentences": 0} for name in split_fractions}
    for ref in refs:
        per_split[ref["split"]]["refs"] += 1
        per_split[ref["split"]]["sentences"] += len(ref["sentences"])
    for split in splits:
        per_split[split]["images"] += 1
    n_sent = sent_id
    return {
        "images": num_images, "refs": ref_id, "sentences": n_sent, "per_split": per_split,
        "expression_families": families, "scene_retries": retries,
        "objects_per_image_mean": round(ref_id / num_images, 3),
        "sentences_per_ref_mean": round(n_sent / max(ref_id, 1), 3),
        "chance_random_point": round(float(np.mean(random_hits)), 4),
        "chance_centre_point": round(float(np.mean(centre_hits)), 4),
    }
