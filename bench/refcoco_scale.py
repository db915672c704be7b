"""RefCOCO-scale costs, measured on this machine and projected to the real datasets.

A REFER-layout set with RefCOCO (unc)'s counts (19,994 images, 50,000 refs, 142,210 sentences, split as
the release: train 16,994 / 42,404 / 120,624, val 1,500 / 3,811 / 10,834, testA 750 / 1,975 / 5,657,
testB 750 / 1,810 / 5,095) is written in the real file layout: 640x480 JPEGs of flat-coloured polygons,
COCO polygon annotations, 2-8 word sentences. On it this script measures

- ``index``: wall time and peak memory (``build_index`` + ``write_index`` in a child process, as the
  stage runs them: every JPEG decoded once, every polygon rasterised once);
- ``responses.zarr`` (10x10 float16 maps, RN50 at 320 px) and ``pseudo_masks.zarr`` (``pseudo_masks.size``
  squared) bytes for every sentence / train object, written by the stores' own writer;
- per-object cost of make_pseudo_masks' pieces at COCO's 640x480: decoding + stretching the image,
  PRMS (Eq. 10) with the authors' frozen ViT-B/32 at 224 px (random weights: the cost is the same),
  IRN refinement (CRF-confident seeds + boundary + random walk + threshold) at the working size
  ``pseudo_masks.size`` (what the stage does) and, for comparison, at the full 640x480;
- how that per-object work scales from 1 to 2 processes: refinement workers (``pseudo_masks.workers``:
  each process refines its own share of the images, CRF seeds to threshold, as the stage's workers do;
  the slower worker's own time against one process's) and, for comparison, the CRF alone in a pool
  (wall time, images pickled to the workers), each process with one torch thread;
- decoding + stretching one image to Step-1/2's 320 px input, which is what a training epoch pays for
  each image past :class:`~pipeline.data.samples.ImageBank`'s 2 GB cache (6,510 of RefCOCO's 16,994
  train images at 320 px): :func:`uncached_epoch_cost`.

It then prints a **projection** (not a measurement) of make_pseudo_masks' wall time on the train splits
of RefCOCO, RefCOCO+ and RefCOCOg on N cores: the per-object costs above divided by N times the measured
2-process efficiency, plus the affinity training, which one process does alone. The whole stage's peak
memory and time at two sizes are measured by :mod:`bench.pseudo_masks_memory`.

    python -m bench.refcoco_scale                 # full size (~10 min on 2 cores, ~2 GB of JPEGs in /tmp)
    python -m bench.refcoco_scale --scale 0.01    # a 1 % set: the same code path in seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from bench.common import ROOT, best_of, directory_bytes
from pipeline.data.samples import stretch_resize
from pipeline.params import PseudoMaskParams, load_params

# (images, refs, sentences) per split of RefCOCO unc, as released.
REFCOCO_UNC = {"train": (16_994, 42_404, 120_624), "val": (1_500, 3_811, 10_834),
               "testA": (750, 1_975, 5_657), "testB": (750, 1_810, 5_095)}
# Train splits that make_pseudo_masks processes: (images, objects, sentences) of each release.
TRAIN_SPLITS = {"RefCOCO (unc)": (16_994, 42_404, 120_624), "RefCOCO+ (unc)": (16_992, 42_278, 120_191),
                "RefCOCOg (umd)": (21_899, 42_226, 80_512)}
COCO_SIZE = (480, 640)  # height, width
RESPONSE_MAP = 10  # RN50 at 320 px, stride 32
PROJECTED_CORES = (2, 16, 64)
WORDS = ("man woman person left right front back red blue white black shirt table chair car dog cat "
         "guy girl kid bottom top middle far near small big tall short green yellow sitting standing "
         "holding second first closest behind next to the in on with of").split()


def split_counts(scale: float) -> dict[str, tuple[int, int, int]]:
    """RefCOCO's per-split counts times ``scale`` (at least one image, ref and sentence per split)."""
    out = {}
    for split, (images, refs, sentences) in REFCOCO_UNC.items():
        n_img = max(1, round(images * scale))
        n_ref = max(n_img, round(refs * scale))
        out[split] = (n_img, n_ref, max(n_ref, round(sentences * scale)))
    return out


def _polygon(rng: np.random.Generator, height: int, width: int) -> list[float]:
    """A COCO polygon (flat x, y list) of a blob whose area is 1-40 % of the image, like referred objects."""
    area = height * width * float(np.exp(rng.uniform(np.log(0.01), np.log(0.4))))
    radius = math.sqrt(area / math.pi)
    cy, cx = rng.uniform(radius * 0.5, height - radius * 0.5), rng.uniform(radius * 0.5, width - radius * 0.5)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 16))
    radii = radius * rng.uniform(0.7, 1.3, 16)
    xs = np.clip(cx + radii * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, height - 1)
    return [round(float(v), 2) for pair in zip(xs, ys, strict=True) for v in pair]


def _render(task: tuple[Path, list[list[float]], int]) -> None:
    """Paint one 640x480 JPEG: a flat background with every object's polygon in its own colour."""
    path, polygons, seed = task
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", COCO_SIZE[::-1], tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for flat in polygons:
        draw.polygon(flat, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image.save(path, quality=90)


def write_refcoco_sized(root: Path, scale: float = 1.0, seed: int = 0, workers: int = 0) -> dict:
    """Write ``root/refcoco/refs(unc).p``, ``root/refcoco/instances.json`` and ``root/images/*.jpg`` with
    RefCOCO's counts times ``scale``; return the counts and the polygons (image_id -> list)."""
    rng = np.random.default_rng(seed)
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    height, width = COCO_SIZE
    images, annotations, refs, polygons = [], [], [], {}
    image_id = ref_id = sent_id = 0
    for split, (n_img, n_ref, n_sent) in split_counts(scale).items():
        refs_per_image = np.bincount(np.arange(n_ref) % n_img, minlength=n_img)  # as even as possible
        sents_per_ref = 1 + np.bincount(rng.integers(0, n_ref, n_sent - n_ref), minlength=n_ref)
        k = 0
        for count in refs_per_image:
            image_id += 1
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            polygons[image_id] = []
            for _ in range(int(count)):
                ref_id += 1
                flat = _polygon(rng, height, width)
                polygons[image_id].append(flat)
                xs, ys = flat[0::2], flat[1::2]
                annotations.append({"id": ref_id, "image_id": image_id, "category_id": 1,
                                    "segmentation": [flat], "iscrowd": 0,
                                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
                sentences = []
                for _ in range(int(sents_per_ref[k])):
                    sent_id += 1
                    text = " ".join(rng.choice(WORDS, int(rng.integers(2, 9))))
                    sentences.append({"tokens": text.split(), "raw": text, "sent": text, "sent_id": sent_id})
                refs.append({"ref_id": ref_id, "ann_id": ref_id, "image_id": image_id, "split": split,
                             "category_id": 1, "file_name": file_name, "sentences": sentences,
                             "sent_ids": [s["sent_id"] for s in sentences]})
                k += 1
    with (root / "refcoco" / "refs(unc).p").open("wb") as fh:
        pickle.dump(refs, fh, protocol=4)
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    tasks = [(root / "images" / im["file_name"], polygons[im["id"]], seed + im["id"]) for im in images]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        list(pool.map(_render, tasks, chunksize=64))
    return {"images": len(images), "refs": len(refs), "sentences": sent_id, "polygons": polygons,
            "image_bytes": directory_bytes(root / "images")}


def _index_child(root: str, out: str) -> None:
    """Body of the child process that indexes ``root`` as the ``index`` stage does, then reports itself."""
    from pipeline.data.index import build_index, write_index
    from pipeline.data.refer import load_refer

    t0 = time.perf_counter()
    refs, instances = load_refer(Path(root), "refcoco", "unc")
    tables, report = build_index(refs, instances, Path(root) / "images")
    write_index(Path(out), tables, report)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_bytes": peak_kib * 1024,
                      "kept_refs": report["kept"]["refs"]}))


def measure_index(root: Path, out: Path) -> dict:
    """Index ``root`` in a fresh interpreter: its own wall time and peak resident memory."""
    code = f"from bench.refcoco_scale import _index_child; _index_child({str(root)!r}, {str(out)!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _response_maps(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` response-like 10x10 maps: one smooth bump plus noise, values of a temperature-scaled cosine."""
    grid = np.arange(RESPONSE_MAP, dtype=np.float32)
    cy, cx = rng.uniform(0, RESPONSE_MAP, (2, n, 1, 1)).astype(np.float32)
    sigma = rng.uniform(1.0, 3.0, (n, 1, 1)).astype(np.float32)
    bump = np.exp(-((grid[:, None] - cy) ** 2 + (grid[None, :] - cx) ** 2) / (2 * sigma**2))
    return (8 * bump + rng.normal(0, 0.5, (n, RESPONSE_MAP, RESPONSE_MAP))).astype(np.float32)


def measure_stores(index_dir: Path, polygons: dict[int, list[list[float]]], out: Path, mask_size: int,
                   shard_sizes: tuple[int, int]) -> dict:
    """Write both stores for the indexed set with the stores' writer; bytes per record and in total."""
    from pipeline.data.index import load_index
    from pipeline.store import PSEUDO_MASK_SCHEMA, RESPONSE_SCHEMA, RecordWriter

    index = load_index(index_dir)
    sentences = index.sentences.merge(index.images[["image_id", "height", "width"]], on="image_id")
    rng = np.random.default_rng(0)
    responses = out / "responses.zarr"
    with RecordWriter(responses, RESPONSE_SCHEMA, (RESPONSE_MAP, RESPONSE_MAP), shard_sizes[0],
                      {"input_size": [320, 320]}) as writer:
        for split, rows in sentences.groupby("split", sort=True):
            writer.add_split(str(split), len(rows))
            for start in range(0, len(rows), shard_sizes[0]):
                part = rows.iloc[start:start + shard_sizes[0]]
                writer.write(str(split), start, _response_maps(rng, len(part)),
                             **{c: part[c].to_numpy() for c in ("sent_id", "ref_id", "image_id", "height",
                                                                 "width")})
    train = index.refs[index.refs["split"] == "train"].sort_values("ref_id").merge(
        index.images[["image_id", "height", "width"]], on="image_id")
    first_ref = {int(i): int(r) for i, r in train.groupby("image_id")["ref_id"].min().items()}
    masks_path = out / "pseudo_masks.zarr"
    scale = np.array([mask_size / COCO_SIZE[1], mask_size / COCO_SIZE[0]] * 16)
    with RecordWriter(masks_path, PSEUDO_MASK_SCHEMA, (mask_size, mask_size), shard_sizes[1],
                      {"input_size": [mask_size, mask_size]}) as writer:
        writer.add_split("train", len(train))
        for start in range(0, len(train), shard_sizes[1]):
            part = train.iloc[start:start + shard_sizes[1]]
            masks = []
            for ref, image in zip(part["ref_id"], part["image_id"], strict=True):
                flat = polygons[int(image)][int(ref) - first_ref[int(image)]]  # the object's own polygon
                rle = mask_utils.frPyObjects([list(np.asarray(flat) * scale)], mask_size, mask_size)
                masks.append(mask_utils.decode(rle)[..., 0])
            writer.write("train", start, np.stack(masks), ref_id=part["ref_id"].to_numpy(),
                         image_id=part["image_id"].to_numpy(), height=part["height"].to_numpy(),
                         width=part["width"].to_numpy(), sent_id_selected=part["ref_id"].to_numpy())
    r_bytes, m_bytes = directory_bytes(responses), directory_bytes(masks_path)
    return {"sentences": len(sentences), "objects": len(train), "responses_bytes": r_bytes,
            "pseudo_masks_bytes": m_bytes, "responses_per_sentence": r_bytes / len(sentences),
            "pseudo_masks_per_object": m_bytes / len(train)}


def _objects_of(root: Path, polygons: dict[int, list[list[float]]], n: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``n`` objects as (640x480 image, 640x480 soft map): a blurred copy of the object's mask
    spilling into the background, as a stride-32 response up-sampled to the image does."""
    from scipy import ndimage

    out = []
    for image_id in sorted(polygons):
        image = np.asarray(Image.open(root / "images" / f"COCO_train2014_{image_id:012d}.jpg").convert("RGB"))
        for flat in polygons[image_id]:
            rle = mask_utils.frPyObjects([flat], *COCO_SIZE)
            mask = mask_utils.decode(rle)[..., 0].astype(np.float32)
            soft = ndimage.gaussian_filter(mask, 24)
            out.append((image, soft / max(float(soft.max()), 1e-6)))
            if len(out) == n:
                return out
    return out


def _stretch(array: np.ndarray, size: int) -> np.ndarray:
    """An RGB image as ImageBank stretches it, or a float map resized the same way."""
    if array.ndim == 3:
        return stretch_resize(array, size)
    return np.asarray(Image.fromarray(array.astype(np.float32)).resize((size, size), Image.BILINEAR))


def refine_objects(task: tuple[list[tuple[np.ndarray, np.ndarray]], dict, int | None]) -> float:
    """The stage's per-object refinement (``walk_seed: confident``): CRF-confident seeds, boundary,
    random walk from the confident foreground, threshold + component, at ``size`` squared (None: as
    given). One torch thread; returns the seconds it took."""
    from pipeline.pseudo.affinity import AffinityNet
    from pipeline.pseudo.crf import confident_labels
    from pipeline.pseudo.refine import refine_map, to_pseudo_mask

    objects, section, size = task
    torch.set_num_threads(1)
    p = PseudoMaskParams.model_validate(section)
    torch.manual_seed(0)
    net = AffinityNet().eval()
    t0 = time.perf_counter()
    for image, soft in objects:
        if size is not None:
            image, soft = _stretch(image, size), np.clip(_stretch(soft, size), 0, 1)
        labels = confident_labels(image, soft, p.conf_fg, p.conf_bg, p.crf)
        seed = soft * (labels == 1)
        to_pseudo_mask(refine_map(image, seed, p, affinity_net=net), p.threshold, p.keep)
    return time.perf_counter() - t0


def measure_refinement(objects: list, p: PseudoMaskParams) -> dict:
    """Per-object refinement seconds at the working size and at 640x480, and the 1 -> 2 process speedups
    (ranks: contiguous halves; workers: the stage's CRF pool)."""
    from pipeline.pseudo.labels import confident_seed_labels

    section = p.model_dump()
    with ProcessPoolExecutor(max_workers=1) as pool:  # one process, one thread: the unit of work
        working = pool.submit(refine_objects, (objects, section, p.size)).result() / len(objects)
        full = pool.submit(refine_objects, (objects[: max(2, len(objects) // 4)], section, None)).result()
        full /= max(2, len(objects) // 4)
        half = len(objects) // 2
        halves = [(objects[:half], section, p.size), (objects[half:], section, p.size)]
        one = min(sum(pool.map(refine_objects, halves)) for _ in range(2))  # the same two tasks in turn
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(refine_objects, [(objects[:2], section, p.size)] * 2))  # start both workers first
        # each rank's own time, as a rank reads its own images (the bench ships them to the workers,
        # which the stage does not: that copy is left out of both sides)
        two = min(max(pool.map(refine_objects, halves)) for _ in range(2))
    small = [(_stretch(im, p.size), np.clip(_stretch(m, p.size), 0, 1)) for im, m in objects]
    small = small * -(-512 // len(small))  # a pool start-up amortised as over a split's thousands
    crf = {}
    for workers in (1, 2):
        q = p.model_copy(update={"workers": workers})
        crf[workers] = best_of(2, lambda q=q: confident_seed_labels([a for a, _ in small],
                                                                     [b for _, b in small], q))
    return {"per_object_working_s": working, "per_object_full_s": full, "ranks_speedup": one / two,
            "workers_speedup": crf[1] / crf[2], "objects": len(objects)}


def measure_prms(objects: list, size: int, max_tokens: int) -> dict:
    """Seconds per masked image (ViT-B/32 at 224 px, the authors' frozen CLIP) and per sentence encoded,
    on this machine's CPU, and per image decoded + stretched at 640x480."""
    import open_clip

    from pipeline.maps import mask_images
    from pipeline.models.clip_backbone import FrozenClip, encode_texts

    torch.manual_seed(0)
    frozen = FrozenClip(open_clip.create_model("ViT-B-32"))
    images = torch.stack([torch.tensor(_stretch(im, size)).permute(2, 0, 1) for im, _ in objects[:32]])
    maps = torch.from_numpy(np.stack([_stretch(m, RESPONSE_MAP) for _, m in objects[:32]]))
    with torch.no_grad():
        masked = mask_images(images.float() / 255, maps, frozen.image_size)
        per_image = best_of(2, lambda: frozen.encode_image(masked)) / len(masked)
        texts = [" ".join(WORDS[i % len(WORDS)] for i in range(k, k + 5)) for k in range(64)]
        cpu = torch.device("cpu")
        per_text = best_of(2, lambda: encode_texts(frozen, texts, max_tokens, cpu)) / len(texts)
    return {"per_masked_image_s": per_image, "per_sentence_text_s": per_text}


def measure_decode(root: Path, size: int, n: int = 64) -> float:
    """Seconds to decode one 640x480 JPEG and stretch it to ``size`` (ImageBank.get), single thread."""
    from pipeline.data.samples import ImageBank

    files = sorted((root / "images").glob("*.jpg"))[:n]
    bank = ImageBank(dict(enumerate(files)), size, max_bytes=0)
    return best_of(2, lambda: [bank.get(i) for i in range(len(files))]) / len(files)


def measure_affinity(p: PseudoMaskParams, objects: list, steps: int = 6) -> float:
    """Seconds of the whole affinity training (``epochs`` x ``max_samples / batch_size`` steps), from
    ``steps`` timed steps on this machine's CPU."""
    from pipeline.pseudo.affinity import train_affinity
    from pipeline.pseudo.crf import confident_labels

    small = [(_stretch(im, p.size), np.clip(_stretch(m, p.size), 0, 1)) for im, m in objects]
    labels = [confident_labels(im, m, p.conf_fg, p.conf_bg, p.crf) for im, m in small]
    n = min(len(small), steps * p.affinity.batch_size)
    timed = p.affinity.model_copy(update={"epochs": 1})
    seconds = best_of(1, lambda: train_affinity([a for a, _ in small[:n]], labels[:n], timed, seed=0))
    total_steps = p.affinity.epochs * math.ceil(p.affinity.max_samples / p.affinity.batch_size)
    return seconds / math.ceil(n / p.affinity.batch_size) * total_steps


IMAGE_CACHE_BYTES = 2e9  # ImageBank's default max_bytes


def uncached_epoch_cost(decode_s: float, size: int = 320, split: tuple[int, int, int] = TRAIN_SPLITS[
        "RefCOCO (unc)"], threads: int = 8) -> dict:
    """What one training epoch (one sentence per object) pays to decode the train images that do not fit
    ImageBank's cache at ``size`` px: images past the cache, the object visits that land on them (objects
    spread evenly over images), and the seconds of decoding on one thread and on ImageBank's ``threads``
    decoding threads (its default on a machine with 8 cores or more; the batch is prefetched one step
    ahead, so this is hidden whenever a training step takes longer)."""
    images, objects, _ = split
    cached = min(images, int(IMAGE_CACHE_BYTES // (3 * size * size)))
    uncached = images - cached
    visits = objects * uncached / images
    return {"cached": cached, "uncached": uncached, "decodes_per_epoch": visits,
            "one_thread_s": visits * decode_s, "pool_s": visits * decode_s / threads,
            "cache_bytes_all": images * 3 * size * size}


def project(costs: dict, cores: int, per_object_s: float, with_prms: bool) -> float:
    """Projected seconds of make_pseudo_masks on a train split: parallel per-object work over ``cores``
    at the measured 2-process efficiency, plus the affinity training on one rank."""
    efficiency = min(1.0, costs["ranks_speedup"] / 2)
    images, objects, sentences = costs["split"]
    work = images * costs["decode_s"] + objects * per_object_s
    if with_prms:  # an upper bound: every sentence's masked image (objects with M = 1 skip the encoder)
        work += sentences * (costs["per_masked_image_s"] + costs["per_sentence_text_s"])
    return work / (cores * efficiency) + costs["affinity_s"]


def run(scale: float = 1.0, objects: int = 48, keep: Path | None = None) -> dict:
    """Every measurement above on a set of RefCOCO's size times ``scale``; returns the figures."""
    params = load_params(ROOT / "params.yaml")
    p = params.pseudo_masks
    work = Path(tempfile.mkdtemp(prefix="refcoco_scale_")) if keep is None else keep
    try:
        t0 = time.perf_counter()
        data = write_refcoco_sized(work / "refer", scale)
        generate_s = time.perf_counter() - t0
        index = measure_index(work / "refer", work / "index")
        stores = measure_stores(work / "index", data["polygons"], work, p.size,
                                (params.dump.shard_size, p.shard_size))
        sample = _objects_of(work / "refer", data["polygons"], objects)
        refine = measure_refinement(sample, p)
        prms = measure_prms(sample, p.size, params.model.max_tokens)
        costs = {**refine, **prms, "decode_s": measure_decode(work / "refer", p.size),
                 "decode_320_s": measure_decode(work / "refer", 320),
                 "affinity_s": measure_affinity(p, sample)}
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    projections = {}
    for name, split in TRAIN_SPLITS.items():
        c = {**costs, "split": split}
        projections[name] = {n: {"working": project(c, n, costs["per_object_working_s"], False),
                                 "full": project(c, n, costs["per_object_full_s"], False),
                                 "working_cpu_prms": project(c, n, costs["per_object_working_s"], True)}
                             for n in PROJECTED_CORES}
    return {"scale": scale, "generate_s": generate_s, "images": data["images"], "refs": data["refs"],
            "sentences": data["sentences"], "image_bytes": data["image_bytes"], "index": index,
            "stores": stores, "costs": costs, "working_size": p.size, "projections": projections}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def report(r: dict) -> str:
    """The printed table (markdown), every figure labelled measured or projected."""
    c, s, ix = r["costs"], r["stores"], r["index"]
    e = uncached_epoch_cost(c["decode_320_s"])
    gib, mib = 2**30, 2**20
    lines = [
        f"RefCOCO-sized REFER set x{r['scale']:g}: {r['images']:,} images (640x480 JPEG, "
        f"{r['image_bytes'] / gib:.2f} GiB), {r['refs']:,} refs, {r['sentences']:,} sentences "
        f"(written in {r['generate_s']:.0f} s)", "",
        "| measured on this machine | figure |", "|---|---|",
        f"| index: wall time / peak memory | {ix['seconds']:.0f} s / {ix['peak_bytes'] / gib:.2f} GiB "
        f"({ix['kept_refs']:,} refs kept) |",
        f"| responses.zarr, {s['sentences']:,} sentences of 10x10 float16 | "
        f"{s['responses_bytes'] / mib:.1f} MiB "
        f"({s['responses_per_sentence']:.0f} B/sentence) |",
        f"| pseudo_masks.zarr, {s['objects']:,} train objects at {r['working_size']}x{r['working_size']} | "
        f"{s['pseudo_masks_bytes'] / mib:.1f} MiB ({s['pseudo_masks_per_object']:.0f} B/object) |",
        f"| decode + stretch one 640x480 JPEG | {1000 * c['decode_s']:.1f} ms |",
        f"| PRMS, frozen ViT-B/32 (CPU): per masked image / per sentence encoded | "
        f"{1000 * c['per_masked_image_s']:.1f} ms / {1000 * c['per_sentence_text_s']:.1f} ms |",
        f"| refinement per object at {r['working_size']}x{r['working_size']} (the stage) / at 640x480 | "
        f"{1000 * c['per_object_working_s']:.0f} ms / {1000 * c['per_object_full_s']:.0f} ms |",
        f"| affinity training (one rank) | {c['affinity_s']:.0f} s |",
        f"| 1 -> 2 processes: refinement workers / the CRF alone in a pool | **x{c['ranks_speedup']:.2f}** / "
        f"**x{c['workers_speedup']:.2f}** (goal >= 1.7) |",
        f"| decode + stretch one 640x480 JPEG to 320 px (a training image past the cache) | "
        f"{1000 * c['decode_320_s']:.1f} ms |",
        f"| train images past ImageBank's 2 GB cache at 320 px, per RefCOCO epoch | {e['uncached']:,} of "
        f"{e['uncached'] + e['cached']:,} images, {e['decodes_per_epoch']:,.0f} decodes: "
        f"{e['one_thread_s']:.0f} s on one thread, {e['pool_s']:.0f} s on 8 |", "",
        "PROJECTED make_pseudo_masks wall time on the train split (per-object costs above / (N x "
        f"{min(1.0, c['ranks_speedup'] / 2):.2f} measured efficiency) + affinity training; PRMS on a GPU "
        "is left out, on CPU it is an upper bound):", "",
        "| dataset | N cores | refine at working size | refine at 640x480 | working size + PRMS on CPU |",
        "|---|---|---|---|---|",
    ]
    for name, per_n in r["projections"].items():
        for n, t in per_n.items():
            lines.append(f"| {name} | {n} | {_hours(t['working'])} | {_hours(t['full'])} | "
                         f"{_hours(t['working_cpu_prms'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of RefCOCO's counts")
    parser.add_argument("--objects", type=int, default=48, help="objects timed per measurement")
    parser.add_argument("--keep", type=Path, help="write the set here and keep it (default: a temp dir)")
    args = parser.parse_args()
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    print(report(run(args.scale, args.objects, args.keep)))


if __name__ == "__main__":
    main()
