"""Which object a Step-1 map responds to: the object hit, a diagnostic beside PointM.

PointM only asks where the single peak of a map falls. On small objects a coarse map can cover the
right object and still peak just beside it, and a sharper map can peak inside the wrong object. PRMS,
the CRF seeds and the random walk of the refinement act on what the map covers, so the object hit
tells more than PointM about the pseudo-masks a map will give. It reads GT masks; no training step or
setting choice calls it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.data.index import decode_mask
from pipeline.eval.scoring import response_to_prob


def response_object_hits(responses: dict[int, np.ndarray], sentences: pd.DataFrame, refs: pd.DataFrame,
                         images: pd.DataFrame) -> pd.DataFrame:
    """Per expression of ``sentences`` whose image has two or more referred objects: ``sent_id``,
    ``text``, ``hit`` (the map, up-sampled and min-max normalised as evaluation does, has a higher mean
    inside the target's GT mask than inside any other referred object's of the image), ``point`` (its
    maximum lies in the target: PointM's test) and ``objects`` (how many it chose among).

    ``responses`` maps ``sent_id`` to the stored raw map; ``refs`` and ``images`` are the index tables.
    """
    split_refs = refs[refs["image_id"].isin(sentences["image_id"])]  # every object of those images
    masks = {int(r["ref_id"]): decode_mask(r) for r in split_refs.to_dict("records")}
    refs_of = split_refs.groupby("image_id")["ref_id"].apply(lambda s: [int(r) for r in s]).to_dict()
    size = images.set_index("image_id")[["height", "width"]]
    records = []
    for row in sentences.itertuples(index=False):
        others = refs_of.get(row.image_id, [])
        if len(others) < 2 or int(row.sent_id) not in responses:
            continue
        h, w = size.loc[row.image_id]
        prob = response_to_prob(responses[int(row.sent_id)], int(h), int(w))
        means = {r: float(prob[masks[r]].mean()) if masks[r].any() else -np.inf for r in others}
        peak = np.unravel_index(int(np.argmax(prob)), prob.shape)
        records.append({"sent_id": int(row.sent_id), "text": row.text,
                        "hit": max(means, key=means.get) == int(row.ref_id),
                        "point": bool(masks[int(row.ref_id)][peak]), "objects": len(others)})
    if not records:
        raise ValueError("no expression whose image has two or more referred objects and a stored response")
    return pd.DataFrame.from_records(records)
