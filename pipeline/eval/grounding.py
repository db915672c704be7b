"""Which object a Step-1 map responds to (the object hit), and what kind of expression it was asked.

PointM only asks where the single peak of a map falls. On small objects a coarse map can cover the
right object and still peak just beside it, and a sharper map can peak inside the wrong object. PRMS
(Eq. 10), the CRF seeds and the random walk of the refinement act on what the map covers, so the
object hit tells more than PointM about the pseudo-masks a map will give. ``evaluate_step1`` reports it
per split (``object_hit``) and, on the embedded default, by expression kind (``object_hit_by_kind``).

It reads GT masks: evaluation only, no training step or setting choice calls it.

The kinds come from the synthetic generator's own parser (:func:`parse_expression`): an expression of
another language (RefCOCO's) has no kind, and parsing it raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from pipeline.data.index import decode_mask
from pipeline.data.synthetic.expressions import parse_expression
from pipeline.eval.scoring import response_to_prob
from pipeline.store import RecordStore

FAMILIES = ("attribute", "position", "relation")
ATTRIBUTES = ("size", "colour", "shape")


def expression_family(text: str) -> str:
    """``attribute``, ``position`` or ``relation`` of a generated expression (the generator's parser)."""
    meaning = parse_expression(text)
    return "relation" if meaning.relation else "position" if meaning.position else "attribute"


def expression_kind(text: str) -> str:
    """The family, with attribute expressions split by the attributes they name: ``attribute: shape``,
    ``attribute: size+colour+shape``, ... (position and relation as :func:`expression_family`).

    Why split them: a CLIP that reads colour and one that reads shape ground different attribute
    expressions, and the family's mean hides which one a model is."""
    family = expression_family(text)
    if family != "attribute":
        return family
    target = parse_expression(text).target
    return "attribute: " + "+".join(a for a in ATTRIBUTES if getattr(target, a) is not None)


def group_order(groups: Iterable[str]) -> list[str]:
    """Families in the order of ``FAMILIES``, each family's kinds sorted under it (a family name first)."""
    return sorted(set(groups), key=lambda g: (FAMILIES.index(g.split(":")[0]), g))


def split_responses(store: RecordStore, split: str) -> dict[int, np.ndarray]:
    """``sent_id`` -> raw stored Step-1 response of every expression of ``split``."""
    out: dict[int, np.ndarray] = {}
    for batch in store.iter_batches(split, 4096):
        for sent_id, response in zip(batch["sent_id"], batch["response"], strict=True):
            out[int(sent_id)] = np.asarray(response, dtype=np.float32)
    return out


def response_object_hits(responses: Mapping[int, np.ndarray], sentences: pd.DataFrame, refs: pd.DataFrame,
                         images: pd.DataFrame,
                         mask_of: Callable[[int], np.ndarray] | None = None) -> pd.DataFrame:
    """Per expression of ``sentences`` whose image has two or more referred objects: ``sent_id``,
    ``text``, ``hit``, ``point`` and ``objects`` (how many it chose among).

    ``hit``: the map, up-sampled and min-max normalised as evaluation does, has a strictly higher mean
    inside the target's GT mask than inside every other referred object's of the image (a tie is a
    miss: a constant map picks nothing). ``point``: its maximum lies in the target (PointM's test).

    ``responses`` maps ``sent_id`` to the stored raw map (expressions without one are left out);
    ``refs`` and ``images`` are the index tables; ``mask_of(ref_id)`` gives a GT mask when the caller
    has them decoded already (``GroundTruth.mask``), else they are decoded here.
    """
    split_refs = refs[refs["image_id"].isin(sentences["image_id"])]  # every object of those images
    if mask_of is None:
        decoded = {int(r["ref_id"]): decode_mask(r) for r in split_refs.to_dict("records")}
        mask_of = decoded.__getitem__
    refs_of = split_refs.groupby("image_id")["ref_id"].apply(lambda s: [int(r) for r in s]).to_dict()
    size = images.set_index("image_id")[["height", "width"]]
    records = []
    for row in sentences.itertuples(index=False):
        objects = refs_of.get(row.image_id, [])
        sent_id, target = int(row.sent_id), int(row.ref_id)
        if len(objects) < 2 or sent_id not in responses:
            continue
        h, w = size.loc[row.image_id]
        prob = response_to_prob(responses[sent_id], int(h), int(w))
        means = {r: float(prob[m].mean()) if (m := mask_of(r)).any() else -np.inf for r in objects}
        rival = max(v for r, v in means.items() if r != target)
        peak = np.unravel_index(int(np.argmax(prob)), prob.shape)
        records.append({"sent_id": sent_id, "text": row.text, "hit": bool(means[target] > rival),
                        "point": bool(mask_of(target)[peak]), "objects": len(objects)})
    if not records:
        raise ValueError("no expression whose image has two or more referred objects and a stored response")
    return pd.DataFrame.from_records(records)


def rates(hits: pd.DataFrame, column: str = "hit") -> dict:
    """``{"rate", "chance", "n"}`` of a hits table: the mean of ``column`` (booleans), the mean of
    ``1 / objects`` (a uniformly random choice among the image's referred objects) and the row count."""
    return {"rate": round(float(hits[column].mean()), 4),
            "chance": round(float((1.0 / hits["objects"]).mean()), 4), "n": len(hits)}


def rates_by_kind(hits: pd.DataFrame, column: str = "hit") -> dict[str, dict]:
    """:func:`rates` per family and per kind (:func:`expression_kind`) of ``hits["text"]``: the keys of
    ``object_hit_by_kind`` (``attribute``, ``attribute: colour``, ..., ``position``, ``relation``)."""
    kinds = hits["text"].map(expression_kind)
    families = kinds.str.split(":").str[0]
    groups = {**{f: hits[families == f] for f in set(families)},
              **{k: hits[kinds == k] for k in set(kinds) if k not in FAMILIES}}
    return {g: rates(groups[g], column) for g in group_order(groups)}


def object_hit_metrics(hits: pd.DataFrame, by_kind: bool) -> dict:
    """The object-hit keys of ``step1.json``: ``object_hit``, ``object_hit_chance`` and, with
    ``by_kind`` (expressions of the synthetic generator only), ``object_hit_by_kind``."""
    overall = rates(hits)
    out = {"object_hit": overall["rate"], "object_hit_chance": overall["chance"]}
    if by_kind:
        out["object_hit_by_kind"] = rates_by_kind(hits)
    return out
