"""From dumped Step-1 responses to Step-2 pseudo-masks (the ``make_pseudo_masks`` work, Sec. 3.4).

1. PRMS (Eq. 10) picks, per train object, one of its expressions' response maps.
2. The chosen map, up-sampled to the working resolution and min-max normalised, is refined
   (``irn``: CRF-confident seeds -> a learned inter-pixel affinity -> random walk; ``crf``; ``none``).
3. The refined map is thresholded into a binary pseudo-mask.

Everything runs at the working resolution ``S x S`` (the image stretched like the model input, which is
also Step-2's input), so the cost per object does not depend on the original image size.

Under torchrun each rank handles the objects of its own store shards (PRMS, CRF seeds, random walk);
the affinity network is trained once, by rank 0, on the globally sampled objects' confident labels
gathered from every rank, and broadcast. Every random draw is made over the global object list, so the
result does not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.data.samples import ImageBank
from pipeline.distributed import SINGLE_PROCESS, DistContext
from pipeline.maps import minmax_normalize, upsample
from pipeline.models.clip_backbone import FrozenClip, encode_texts
from pipeline.params import AffinityParams, PseudoMaskParams
from pipeline.progress import progress
from pipeline.pseudo.affinity import AffinityNet, train_affinity
from pipeline.pseudo.crf import confident_labels
from pipeline.pseudo.prms import PrmsItem, choose_without_prms, select_batch
from pipeline.pseudo.refine import refine_map, to_pseudo_mask
from pipeline.store import RecordStore


@dataclass
class Selection:
    """PRMS's choice for each referred object of the split."""

    objects: pd.DataFrame  # ref_id, image_id, height, width, sent_id_selected, num_expressions, changed
    fg_maps: dict[int, np.ndarray]  # ref_id -> selected map at S x S in [0, 1]
    first_maps: dict[int, np.ndarray]  # ref_id -> first expression's map (the PRMS-off choice)


def load_split_responses(store: RecordStore, split: str) -> dict[int, np.ndarray]:
    """sent_id -> raw response, read shard by shard."""
    out: dict[int, np.ndarray] = {}
    for batch in store.iter_batches(split, 4096):
        for sid, resp in zip(batch["sent_id"], batch["response"], strict=True):
            out[int(sid)] = np.asarray(resp, dtype=np.float32)
    return out


def _working_map(response: np.ndarray, size: int) -> np.ndarray:
    return minmax_normalize(upsample(torch.from_numpy(response)[None], (size, size))[0]).numpy()


def select_responses(sentences: pd.DataFrame, responses: dict[int, np.ndarray], bank: ImageBank,
                     frozen: FrozenClip | None, *, use_prms: bool, off_choice: str, max_tokens: int,
                     calibration_size: int, device: torch.device, seed: int,
                     batch_size: int = 128) -> Selection:
    """Eq. 10 for every object of ``sentences`` (or the PRMS-off choice when ``use_prms`` is false)."""
    groups = [(int(ref), g.sort_values("sent_id")) for ref, g in sentences.groupby("ref_id", sort=True)]
    if use_prms:
        text_emb = encode_texts(frozen, sentences["text"].tolist(), max_tokens, device).cpu()
        row_of = {int(s): i for i, s in enumerate(sentences["sent_id"])}
        items = (PrmsItem(bank.get(int(g["image_id"].iloc[0])).float().div(255),
                          torch.from_numpy(np.stack([responses[int(s)] for s in g["sent_id"]])),
                          text_emb[[row_of[int(s)] for s in g["sent_id"]]]) for _, g in groups)
        encode = lambda x: frozen.encode_image(x.to(device)).cpu()  # noqa: E731
        picks = [i for i, _ in select_batch(items, encode, calibration_size, batch_size)]
    else:
        # one generator per object: the choice does not depend on which objects a rank holds
        picks = [choose_without_prms(len(g), off_choice, np.random.default_rng([seed, ref]))
                 for ref, g in groups]
    records, fg_maps, first_maps = [], {}, {}
    for (ref, g), pick in zip(groups, picks, strict=True):
        sids = g["sent_id"].to_numpy()
        fg_maps[ref] = _working_map(responses[int(sids[pick])], bank.size)
        first_maps[ref] = _working_map(responses[int(sids[0])], bank.size)
        row = g.iloc[0]
        records.append({"ref_id": ref, "image_id": int(row["image_id"]), "height": int(row["height"]),
                        "width": int(row["width"]), "sent_id_selected": int(sids[pick]),
                        "num_expressions": len(sids), "changed": bool(pick != 0)})
    columns = ["ref_id", "image_id", "height", "width", "sent_id_selected", "num_expressions", "changed"]
    return Selection(pd.DataFrame.from_records(records, columns=columns), fg_maps, first_maps)


def _confident_task(args: tuple) -> np.ndarray:
    image, fg_map, conf_fg, conf_bg, crf = args
    return confident_labels(image, fg_map, conf_fg, conf_bg, crf)


def confident_seed_labels(images: Iterable[np.ndarray], fg_maps: Iterable[np.ndarray],
                          params: PseudoMaskParams) -> list[np.ndarray]:
    """IRN's CRF-cleaned confident fg / bg / ignore labels for every object (``params.conf_fg`` /
    ``conf_bg`` / ``crf``), in ``params.workers`` CPU processes."""
    tasks = [(im, fg, params.conf_fg, params.conf_bg, params.crf)
             for im, fg in zip(images, fg_maps, strict=True)]
    if params.workers <= 1:
        return [_confident_task(t) for t in progress(tasks, desc="crf")]
    with ProcessPoolExecutor(max_workers=params.workers) as pool:
        return list(progress(pool.map(_confident_task, tasks, chunksize=16), total=len(tasks), desc="crf"))


def make_pseudo_masks(selection: Selection, bank: ImageBank, params: PseudoMaskParams, *, seed: int,
                      device: torch.device, global_rows: np.ndarray | None = None,
                      total_objects: int | None = None, dist: DistContext = SINGLE_PROCESS
                      ) -> tuple[dict[int, np.ndarray], AffinityNet | None]:
    """ref_id -> bool pseudo-mask at S x S, and the trained affinity net (``irn`` only).

    Every setting comes from the one ``pseudo_masks`` section ``params`` (``refine``, ``walk_seed``,
    ``conf_fg`` / ``conf_bg``, ``crf``, ``affinity``, ``random_walk``, ``threshold``, ``keep``,
    ``workers``), so a stage cannot pass half of it or a value from elsewhere; ``seed`` is ``base.seed``.

    The affinity net learns from the confident labels of at most ``params.affinity.max_samples`` objects
    (a random subset: boundaries look alike everywhere, and this bounds the CPU time on large sets);
    refinement then runs image by image, all objects of an image sharing one boundary map.
    ``walk_seed="confident"`` starts the random walk from the map restricted to its CRF-confident
    foreground instead of the whole map (IRN walks from CAMs, which are peaky; Step-1's stride-32 maps are
    spread out, and walking them keeps their spill into the background); ``"map"`` is IRN's choice.

    ``selection`` may hold a rank's share of the objects: ``global_rows`` are their positions in the
    full object list of ``total_objects`` (default: all of them, in order).
    """
    objects = selection.objects
    total = len(objects) if total_objects is None else total_objects
    rows_here = np.arange(len(objects)) if global_rows is None else np.asarray(global_rows)
    net = None
    seeds = {int(r): selection.fg_maps[int(r)] for r in objects["ref_id"]}
    if params.refine == "irn":
        rng = np.random.default_rng(seed)
        max_samples = params.affinity.max_samples
        if params.walk_seed == "confident":  # CRF labels for every object; the net learns from a sample
            labelled = np.arange(total)
            sample = np.sort(rng.permutation(total)[:max_samples])
        else:  # IRN: CRF labels only for the sampled objects
            labelled = np.sort(rng.permutation(total)[:max_samples])
            sample = labelled[np.sort(rng.permutation(len(labelled))[:max_samples])]
        mine = np.flatnonzero(np.isin(rows_here, labelled))  # local positions this rank labels
        rows = objects.iloc[mine]
        images = [bank.get(int(i)).permute(1, 2, 0).numpy() for i in rows["image_id"]]
        labels = confident_seed_labels(images, [seeds[int(r)] for r in rows["ref_id"]], params)
        net = _train_shared_affinity(rows, labels, rows_here[mine], sample, bank, params.affinity, seed,
                                     device, dist)
        if params.walk_seed == "confident":  # walk from the CRF-confident foreground, not the whole map
            for ref, lab in zip(rows["ref_id"], labels, strict=True):
                seeds[int(ref)] = seeds[int(ref)] * (lab == 1)
    refined = refined_maps(objects, seeds, bank, params, net)
    return {ref: to_pseudo_mask(soft, params.threshold, params.keep) for ref, soft in refined.items()}, net


def refined_maps(objects: pd.DataFrame, seeds: dict[int, np.ndarray], bank: ImageBank,
                 params: PseudoMaskParams, net: AffinityNet | None) -> dict[int, np.ndarray]:
    """ref_id -> refined soft map at S x S (``params.refine``), image by image: all objects of an image
    share one boundary map and one batched random walk. Thresholding is left to the caller."""
    out: dict[int, np.ndarray] = {}
    for image_id, group in progress(list(objects.groupby("image_id", sort=True)), desc="refine"):
        image = bank.get(int(image_id)).permute(1, 2, 0).numpy()
        refs = group["ref_id"].astype(int).tolist()
        refined = refine_map(image, np.stack([seeds[r] for r in refs]), params, affinity_net=net)
        out.update(zip(refs, refined, strict=True))
    return out


def _train_shared_affinity(rows: pd.DataFrame, labels: list[np.ndarray], global_rows: np.ndarray,
                           sample: np.ndarray, bank: ImageBank, affinity: AffinityParams, seed: int,
                           device: torch.device, dist: DistContext) -> AffinityNet:
    """Train the affinity net on the confident labels of the globally ``sample``-d objects, in global
    order: rank 0 gathers them from every rank, trains, and broadcasts the weights."""
    wanted = set(sample.tolist())
    picked = {int(g): (int(i), lab) for g, i, lab in zip(global_rows, rows["image_id"], labels, strict=True)
              if int(g) in wanted}
    if dist.enabled:
        gathered: list[dict] = [{} for _ in range(dist.world_size)]
        torch.distributed.all_gather_object(gathered, picked)
        picked = {k: v for part in gathered for k, v in part.items()}
    state = None
    if dist.is_main:
        ordered = [picked[int(g)] for g in sample]
        net = train_affinity([bank.get(i).permute(1, 2, 0).numpy() for i, _ in ordered],
                             [lab for _, lab in ordered], affinity, seed=seed, device=device)
        if not dist.enabled:
            return net
        state = {k: v.cpu() for k, v in net.state_dict().items()}
    state = dist.broadcast_object(state)
    net = net if dist.is_main else AffinityNet()
    net.load_state_dict(state)
    return net.to(device).eval()
