"""From dumped Step-1 responses to Step-2 pseudo-masks (the ``make_pseudo_masks`` work, Sec. 3.4).

1. PRMS (Eq. 10) picks, per train object, one of its expressions' response maps.
2. The chosen map, up-sampled to the working resolution and min-max normalised, is refined
   (``irn``: CRF-confident seeds -> a learned inter-pixel affinity -> random walk; ``crf``; ``none``).
3. The refined map is thresholded into a binary pseudo-mask.

Everything runs at the working resolution ``S x S`` (the image stretched like the model input, which is
also Step-2's input), so the cost per object does not depend on the original image size.

The stage streams (RefCOCO has 42,404 train objects; holding their maps took ~20 GiB): PRMS keeps only
each object's choice (:func:`select_objects`); the affinity net learns from the CRF labels of at most
``affinity.max_samples`` objects (:func:`train_shared_affinity`); then :func:`iter_pseudo_mask_shards`
rebuilds each object's map from its tiny response when its store shard is due, refines and thresholds
it, and lets it go once the shard is written. Per-image work (CRF seeds, random walk, threshold) runs
in ``pseudo_masks.workers`` processes of one torch thread each, so the stage uses every
core without torchrun (and without ``base.nproc``, a param of the training stages). The boundary map
of each image is computed in the main process, whose thread count the convolutions' rounding depends
on, so the masks are the same for any number of workers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.data.samples import ImageBank
from pipeline.maps import minmax_normalize, upsample
from pipeline.memory import release_free_memory
from pipeline.models.clip_backbone import FrozenClip, encode_texts
from pipeline.params import PseudoMaskParams
from pipeline.progress import progress
from pipeline.pseudo.affinity import AffinityNet, predict_boundary, train_affinity
from pipeline.pseudo.crf import confident_labels
from pipeline.pseudo.prms import PrmsItem, choose_without_prms, iter_select
from pipeline.pseudo.refine import refine_map, to_pseudo_mask
from pipeline.store import RecordStore

OBJECT_COLUMNS = ["ref_id", "image_id", "height", "width", "sent_id_selected", "num_expressions", "changed"]
TEXT_BATCH = 512  # encode_texts' batch: sentences are embedded in these same batches, lazily


@dataclass
class Selection:
    """PRMS's choice for each referred object of the split (or of one shard)."""

    objects: pd.DataFrame  # ref_id, image_id, height, width, sent_id_selected, num_expressions, changed
    fg_maps: dict[int, np.ndarray]  # ref_id -> selected map at S x S in [0, 1]
    first_maps: dict[int, np.ndarray]  # ref_id -> first expression's map (the PRMS-off choice)


class ResponseTable(Mapping):
    """sent_id -> raw response (float32), stored as one compact array: a few hundred bytes a sentence
    (RefCOCO's 120,624 train sentences: 24 MB), not a dict of arrays."""

    def __init__(self, sent_ids: np.ndarray, maps: np.ndarray) -> None:
        self._row = {int(s): i for i, s in enumerate(sent_ids)}
        self._maps = maps

    def __getitem__(self, sent_id: int) -> np.ndarray:
        return np.asarray(self._maps[self._row[int(sent_id)]], dtype=np.float32)

    def __iter__(self) -> Iterator[int]:
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)


def load_split_responses(store: RecordStore, split: str) -> ResponseTable:
    """sent_id -> raw response, read shard by shard. Kept as float16 when that is exact (the store's
    own dtype), so reading a map back gives the same float32 values as the store."""
    ids, parts = [], []
    for batch in store.iter_batches(split, 4096):
        maps = np.asarray(batch["response"], dtype=np.float32)
        half = maps.astype(np.float16)
        parts.append(half if np.array_equal(half.astype(np.float32), maps) else maps)
        ids.append(np.asarray(batch["sent_id"]))
    if not parts:
        return ResponseTable(np.empty(0, dtype=np.int64), np.empty((0, 1, 1), dtype=np.float32))
    dtype = np.float16 if all(p.dtype == np.float16 for p in parts) else np.float32
    return ResponseTable(np.concatenate(ids), np.concatenate([p.astype(dtype) for p in parts]))


def _working_map(response: np.ndarray, size: int) -> np.ndarray:
    return minmax_normalize(upsample(torch.from_numpy(response)[None], (size, size))[0]).numpy()


class _TextEmbeddings:
    """Frozen-CLIP embeddings of ``texts`` computed on demand in the fixed batches of
    :func:`encode_texts` (batch ``k`` = texts ``k*512 ... k*512+511``, so every value equals the all-at-once
    call), keeping the last ``keep`` batches: memory does not grow with the split."""

    def __init__(self, frozen: FrozenClip, texts: list[str], max_tokens: int, device: torch.device,
                 keep: int = 4) -> None:
        self.frozen, self.texts, self.max_tokens, self.device = frozen, texts, max_tokens, device
        self.keep = keep
        self._batches: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _batch(self, k: int) -> torch.Tensor:
        if k in self._batches:
            self._batches.move_to_end(k)
            return self._batches[k]
        chunk = self.texts[k * TEXT_BATCH:(k + 1) * TEXT_BATCH]
        emb = encode_texts(self.frozen, chunk, self.max_tokens, self.device, batch_size=TEXT_BATCH).cpu()
        self._batches[k] = emb
        while len(self._batches) > self.keep:
            self._batches.popitem(last=False)
        return emb

    def rows(self, rows: Iterable[int]) -> torch.Tensor:
        return torch.stack([self._batch(r // TEXT_BATCH)[r % TEXT_BATCH] for r in rows])



class ObjectGroups:
    """The sentences of each referred object, as row numbers into ``sentences`` (objects in ``ref_id``
    order, an object's sentences in ``sent_id`` order): a few integer arrays for the whole split, where
    a ``groupby`` list held one small DataFrame an object (about 55 KB each: the stage's only memory
    that grew with the split). Iterating gives each object's rows."""

    def __init__(self, sentences: pd.DataFrame) -> None:
        self._sentences = sentences
        self.sent_ids = sentences["sent_id"].to_numpy(np.int64)
        refs = sentences["ref_id"].to_numpy(np.int64)
        self.order = np.lexsort((self.sent_ids, refs))  # by ref_id, then sent_id
        sorted_refs = refs[self.order]
        self.starts = np.flatnonzero(np.r_[True, sorted_refs[1:] != sorted_refs[:-1]]) if len(refs) else \
            np.empty(0, dtype=np.int64)
        self.counts = np.diff(np.r_[self.starts, len(refs)])
        self.ref_ids = sorted_refs[self.starts]

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[np.ndarray]:
        for start, count in zip(self.starts.tolist(), self.counts.tolist(), strict=True):
            yield self.order[start:start + count]

    def first_rows(self) -> np.ndarray:
        """Each object's row with the smallest ``sent_id``."""
        return self.order[self.starts]

    def column(self, name: str) -> np.ndarray:
        return self._sentences[name].to_numpy()


class RecentImages:
    """The last ``capacity`` images of a bank, decoded once each: the stage reads images in object order,
    where an image's objects sit together, so this is nearly a full cache at a fixed size (unlike
    :class:`ImageBank`'s own cache, which fills up to 2 GB and keeps the split's first images)."""

    def __init__(self, bank: ImageBank, capacity: int = 64) -> None:
        self.bank, self.capacity, self.size = bank, capacity, bank.size
        self._recent: OrderedDict[int, torch.Tensor] = OrderedDict()

    def get(self, image_id: int) -> torch.Tensor:
        """``(3, size, size)`` uint8 tensor of one image."""
        image_id = int(image_id)
        if image_id in self._recent:
            self._recent.move_to_end(image_id)
            return self._recent[image_id]
        image = self.bank.get(image_id)
        self._recent[image_id] = image
        while len(self._recent) > self.capacity:
            self._recent.popitem(last=False)
        return image

    def hwc(self, image_id: int) -> np.ndarray:
        """``(size, size, 3)`` uint8 array of one image (a view, as the CRF and the walk take it)."""
        return self.get(image_id).permute(1, 2, 0).numpy()


def select_objects(sentences: pd.DataFrame, responses: Mapping[int, np.ndarray],
                   bank: ImageBank | RecentImages, frozen: FrozenClip | None, *, use_prms: bool,
                   off_choice: str, max_tokens: int, calibration_size: int, device: torch.device, seed: int,
                   batch_size: int = 128, space: str = "unit", align_corners: bool = False) -> pd.DataFrame:
    """Eq. 10 for every object of ``sentences`` (or the PRMS-off choice when ``use_prms`` is false): one
    row per object in ``ref_id`` order with :data:`OBJECT_COLUMNS` and ``sent_id_first``. No map is kept:
    each object's maps are rebuilt from its responses when needed (:func:`object_maps`).

    PRMS masks the images of ``bank`` (its side is the stage's ``pseudo_masks.prms_image`` choice) as
    calibration does: ``space`` is ``step1.calibration_mask_space``, ``align_corners``
    ``model.align_corners`` (:func:`pipeline.pseudo.prms.iter_select`)."""
    groups = ObjectGroups(sentences)
    if use_prms:
        texts = _TextEmbeddings(frozen, sentences["text"].tolist(), max_tokens, device)
        image_ids = groups.column("image_id")
        items = (PrmsItem(bank.get(int(image_ids[rows[0]])).float().div(255),
                          torch.from_numpy(np.stack([responses[int(s)] for s in groups.sent_ids[rows]])),
                          texts.rows(rows.tolist())) for rows in groups)
        encode = lambda x: frozen.encode_image(x.to(device)).cpu()  # noqa: E731
        picks = (i for i, _ in iter_select(items, encode, calibration_size, batch_size, space=space,
                                           align_corners=align_corners))
    else:
        # one generator per object: the choice does not depend on which objects are processed together
        picks = (choose_without_prms(len(rows), off_choice, np.random.default_rng([seed, int(ref)]))
                 for ref, rows in zip(groups.ref_ids, groups, strict=True))
    picks = _releasing(picks, every=1024)  # PRMS makes many short-lived arrays an object
    chosen = np.fromiter(progress(picks, total=len(groups), desc="prms"), dtype=np.int64, count=len(groups))
    first = groups.first_rows()
    sent_ids = groups.sent_ids
    columns = {"ref_id": groups.ref_ids, "image_id": groups.column("image_id")[first],
               "height": groups.column("height")[first], "width": groups.column("width")[first],
               "sent_id_selected": sent_ids[groups.order[groups.starts + chosen]],
               "num_expressions": groups.counts, "changed": chosen != 0, "sent_id_first": sent_ids[first]}
    return pd.DataFrame({name: np.asarray(values, dtype=bool if name == "changed" else np.int64)
                         for name, values in columns.items()})


def _releasing(items: Iterable[int], every: int) -> Iterator[int]:
    """``items``, handing the heap's free pages back to the OS after every ``every`` of them
    (:func:`pipeline.memory.release_free_memory`), so that the heap does not grow with the split."""
    for k, item in enumerate(items, 1):
        yield item
        if k % every == 0:
            release_free_memory()


def object_maps(objects: pd.DataFrame, responses: Mapping[int, np.ndarray], size: int) -> Selection:
    """The :class:`Selection` of ``objects`` (rows of :func:`select_objects`): selected and first maps at
    ``size`` squared, rebuilt from the responses (an up-sampling of a 6x6 or 10x10 map: cheap)."""
    fg = {int(r): _working_map(responses[int(s)], size)
          for r, s in zip(objects["ref_id"], objects["sent_id_selected"], strict=True)}
    first = {int(r): _working_map(responses[int(s)], size)
             for r, s in zip(objects["ref_id"], objects["sent_id_first"], strict=True)}
    return Selection(objects[OBJECT_COLUMNS].reset_index(drop=True), fg, first)


def select_responses(sentences: pd.DataFrame, responses: Mapping[int, np.ndarray], bank: ImageBank,
                     frozen: FrozenClip | None, *, use_prms: bool, off_choice: str, max_tokens: int,
                     calibration_size: int, device: torch.device, seed: int,
                     batch_size: int = 128, space: str = "unit", align_corners: bool = False) -> Selection:
    """Eq. 10 for every object of ``sentences``, with every object's maps in memory (for the study
    scripts on val; the stage streams with :func:`select_objects` and :func:`object_maps` instead)."""
    objects = select_objects(sentences, responses, bank, frozen, use_prms=use_prms, off_choice=off_choice,
                             max_tokens=max_tokens, calibration_size=calibration_size, device=device,
                             seed=seed, batch_size=batch_size, space=space, align_corners=align_corners)
    return object_maps(objects, responses, bank.size)


def _confident_task(args: tuple) -> np.ndarray:
    image, fg_map, conf_fg, conf_bg, crf = args
    return confident_labels(image, fg_map, conf_fg, conf_bg, crf)


def confident_seed_labels(images: Iterable[np.ndarray], fg_maps: Iterable[np.ndarray],
                          params: PseudoMaskParams, pool: Executor | None = None, *,
                          total: int | None = None, chunk: int = 256) -> list[np.ndarray]:
    """IRN's CRF-cleaned confident fg / bg / ignore labels for every object (``params.conf_fg`` /
    ``conf_bg`` / ``crf``), in ``pool`` (the stage's :func:`refine_pool`) or else in ``params.workers``
    fresh CPU processes. ``images`` and ``fg_maps`` are read ``chunk`` at a time, so only that many of
    them are alive at once (``total``: their number, for the progress bar)."""
    tasks = ((im, fg, params.conf_fg, params.conf_bg, params.crf)
             for im, fg in zip(images, fg_maps, strict=True))
    if pool is None and params.workers <= 1:
        return [_confident_task(t) for t in progress(tasks, total=total, desc="crf")]
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=params.workers))
        return list(progress(_chunked_map(pool, _confident_task, tasks, chunk), total=total, desc="crf"))


def _chunked_map(pool: Executor, fn: Callable, items: Iterable, chunk: int) -> Iterator:
    """``pool.map(fn, items)`` in order, submitting ``chunk`` items at a time (``Executor.map`` takes
    the whole iterable at once, and would hold every item until the end)."""
    items = iter(items)
    while part := list(itertools.islice(items, chunk)):
        yield from pool.map(fn, part, chunksize=16)


class _ImagesOnDemand(Sequence):
    """The ``(size, size, 3)`` images of ``image_ids``, read when indexed: the affinity net copies each
    one into its own input array, so no image of the sample outlives that copy."""

    def __init__(self, images: RecentImages, image_ids: np.ndarray) -> None:
        self.images, self.image_ids = images, image_ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self.image_ids):
            raise IndexError(k)
        return self.images.hwc(int(self.image_ids[k]))


def affinity_sample(total: int, params: PseudoMaskParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (in the object list) that get CRF labels before the affinity net trains, and the rows it
    trains on, in training order: a random subset of at most ``params.affinity.max_samples`` objects
    (boundaries look alike everywhere, and this bounds the CPU time and the memory on large sets)."""
    rng = np.random.default_rng(seed)
    max_samples = params.affinity.max_samples
    if params.walk_seed == "confident":  # every object gets CRF labels later; the net learns from a sample
        sample = np.sort(rng.permutation(total)[:max_samples])
        return sample, sample
    labelled = np.sort(rng.permutation(total)[:max_samples])  # IRN: CRF labels only for the sampled objects
    return labelled, labelled[np.sort(rng.permutation(len(labelled))[:max_samples])]


def train_shared_affinity(objects: pd.DataFrame, responses: Mapping[int, np.ndarray], images: RecentImages,
                          params: PseudoMaskParams, *, seed: int, device: torch.device,
                          pool: Executor | None = None) -> tuple[AffinityNet | None, dict[int, np.ndarray]]:
    """The affinity net (``refine: irn``; else None) and the CRF labels computed for it (row -> labels,
    at most ``affinity.max_samples``; reused for those objects' walks, so no CRF runs twice). The CRFs
    run in ``pool`` when given (:func:`confident_seed_labels`).

    Only the sampled objects' maps and labels are built here: the memory is bounded by ``max_samples``,
    not by the split."""
    if params.refine != "irn":
        return None, {}
    labelled, sample = affinity_sample(len(objects), params, seed)
    rows = objects.iloc[labelled]
    size = images.size
    labels = confident_seed_labels(
        (images.hwc(i) for i in rows["image_id"]),
        (_working_map(responses[int(s)], size) for s in rows["sent_id_selected"]), params, pool,
        total=len(rows))
    cache = dict(zip(labelled.tolist(), labels, strict=True))
    sample_images = _ImagesOnDemand(images, objects["image_id"].to_numpy()[sample])
    net = train_affinity(sample_images, [cache[int(g)] for g in sample], params.affinity, seed=seed,
                         device=device)
    return net, cache


# ---- per-image refinement, in worker processes ----------------------------------------------------

_WORKER: dict = {}


def _init_worker(params: PseudoMaskParams, threads: int) -> None:
    """Each worker holds the section and runs ``threads`` torch threads (0: leave as is)."""
    if threads:
        torch.set_num_threads(threads)
    _WORKER.update(params=params)


def _refine_image(task: tuple[np.ndarray, np.ndarray, list[np.ndarray | None], torch.Tensor | None]
                  ) -> list[np.ndarray]:
    """Pseudo-masks of all objects of one image: CRF-confident seeds (``walk_seed: confident``; labels
    given for the objects that already have them), one batched walk in the given boundary map, threshold.
    The walk, the CRF and the threshold give the same bits on any number of threads."""
    image, fg_maps, labels, boundary = task
    params: PseudoMaskParams = _WORKER["params"]
    seeds = fg_maps
    if params.refine == "irn" and params.walk_seed == "confident":
        labels = [lab if lab is not None else
                  confident_labels(image, fg, params.conf_fg, params.conf_bg, params.crf)
                  for fg, lab in zip(fg_maps, labels, strict=True)]
        seeds = np.stack([fg * (lab == 1) for fg, lab in zip(fg_maps, labels, strict=True)])
    refined = refine_map(image, seeds, params, boundary=boundary)
    return [to_pseudo_mask(soft, params.threshold, params.keep) for soft in refined]


class _InProcess(Executor):
    """``workers: 1``: the same per-image function in this process, with one torch thread as well."""

    def map(self, fn, *iterables, timeout=None, chunksize=1):  # noqa: ANN001, ANN201
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [fn(*args) for args in zip(*iterables, strict=True)]
        finally:
            torch.set_num_threads(threads)


def refine_pool(params: PseudoMaskParams) -> Executor:
    """``params.workers`` processes (one torch thread each) ready for :func:`_refine_image` and
    :func:`confident_seed_labels`; a plain in-process executor for one worker. The result does not
    depend on the number of workers.

    The workers are forked here, at once: a forked worker keeps its own copy of every page the main
    process writes after the fork, so forking before the main process reads the split keeps the
    workers' share of memory (PSS) from growing with it."""
    if params.workers <= 1:
        _init_worker(params, 0)
        return _InProcess()
    pool = ProcessPoolExecutor(max_workers=params.workers, initializer=_init_worker, initargs=(params, 1))
    pool.submit(os.getpid).result()  # under fork, the first task starts every worker
    return pool


def iter_pseudo_mask_shards(objects: pd.DataFrame, responses: Mapping[int, np.ndarray], images: RecentImages,
                            params: PseudoMaskParams, net: AffinityNet | None, labels: dict[int, np.ndarray],
                            ranges: Iterable[tuple[int, int]], pool: Executor
                            ) -> Iterator[tuple[int, int, Selection, dict[int, np.ndarray]]]:
    """For each row range ``[a, b)`` of ``objects`` (a store shard), in order: the shard's
    :class:`Selection` and its bool pseudo-masks at S x S (ref_id -> mask).

    Refinement runs image by image: all objects of an image share one boundary map (computed here, on
    this process's torch threads) and one batched walk (in ``pool``), even when they fall in different
    shards (then the other shard's masks wait in a small carry-over).
    ``labels`` (row -> CRF labels, from :func:`train_shared_affinity`) are used up as their rows pass.
    Only one shard's maps are alive at a time: memory is bounded by ``shard_size``, not by the split.
    """
    size = images.size
    rows_of_image = {int(k): v for k, v in objects.groupby("image_id", sort=True).indices.items()}
    image_ids = objects["image_id"].to_numpy()
    ref_ids = objects["ref_id"].to_numpy()
    selected = objects["sent_id_selected"].to_numpy()
    carry: dict[int, np.ndarray] = {}  # row -> mask, computed with an image of an earlier shard
    for a, b in ranges:
        todo = sorted({int(image_ids[r]) for r in range(a, b) if r not in carry})
        tasks = []
        for image_id in todo:
            rows = rows_of_image[image_id]
            fg = np.stack([_working_map(responses[int(selected[r])], size) for r in rows])
            image = images.hwc(image_id)
            # the boundary here, on this process's threads (the net's convolutions round by thread count)
            boundary = (None if net is None else
                        predict_boundary(net, image, params.affinity.input_size).cpu())
            tasks.append((image, fg, [labels.pop(int(r), None) for r in rows], boundary))
        for image_id, masks in zip(todo, pool.map(_refine_image, tasks, chunksize=4), strict=True):
            carry.update(zip(rows_of_image[image_id].tolist(), masks, strict=True))
        shard = object_maps(objects.iloc[a:b], responses, size)
        yield a, b, shard, {int(ref_ids[r]): carry.pop(r) for r in range(a, b)}


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
