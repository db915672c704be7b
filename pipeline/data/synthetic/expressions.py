"""The expression language of the synthetic dataset: meanings (:class:`Desc`, :class:`Expr`), the
predicate that decides which object an expression refers to (:func:`resolve`), rendering to text and
parsing back, and the choice of expressions for an object.

Every expression is checked against *all* objects of its image with the same predicate a reader would
apply, so an expression is kept only if it singles out exactly its own object.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from pipeline.data.synthetic.scene import COLOURS, SceneObject

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


def anchor_desc(k: int, objs: list[SceneObject], rng: np.random.Generator) -> Desc | None:
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
