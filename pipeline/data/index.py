"""The Parquet index: one flat, typed view of a REFER dataset that every later stage reads.

Building it is where bad data is caught, once, instead of crashing a training epoch or an evaluation
hours later. Structural faults (non-integer or duplicate ids, image entries without a size or with a
``file_name`` outside the image folder, a refs pickle that names code) stop
:func:`pipeline.data.refer.load_refer` with the file, field and id named. Faults in one object's
ground truth are skipped and counted by reason in ``report.json``: refs whose image is unknown, missing
on disk, outside the image folder once symlinks are resolved, unreadable or of a different size than
``instances.json`` says; whose annotation is missing or belongs to another image; whose ``split`` is not
a name, or not one of REFER's split names (:data:`KNOWN_SPLITS`, exactly: ``"Train "`` is not
``train``); whose bbox is not inside the image or does not bound the mask; whose mask is invalid (RLE
counts that do not decode), empty (a zero-area polygon) or outside the image; and empty sentences or
sentences longer than :data:`MAX_SENTENCE_CHARS`.

Rules and why:

- ``split_unknown``: ``data.eval_splits: auto`` evaluates every non-train split the index has, so a
  stray name (``"Train "``, ``"VAL"``) would become an extra evaluated split and take its refs out of
  training. Such refs are skipped, not renamed: a guess at what was meant could put test refs into
  training. The example names the split, the known ones and the near miss (``did you mean 'train'``).
- ``image_outside_folder``: ``image_dir / file_name`` is resolved (symlinks followed, in the file's
  directories too) and must lie inside the resolved image folder, or the image is never opened. An image
  folder that is itself a symlink is fine; images that are symlinks into a cache elsewhere (a DVC or
  git-annex symlink cache) are skipped: copy or hard-link them.
- ``bbox_not_bounding_mask``: PointIt and Acc_box score against the annotation's bbox (the ``bbox``
  column), the mask metrics against the mask; a ref whose bbox does not hold its mask cannot be right in
  both, so it is skipped. The mask's tight box (pixel edges) must lie within the bbox grown by
  :data:`BBOX_MASK_TOLERANCE` pixels on each side (rasterising a polygon reaches at most 0.5 px past its
  vertices). A bbox larger than the mask is kept: COCO's boxes may be looser than the mask.
- ``sentence_too_long``: the CLIP tokenizer is quadratic in word length (one 50,000-letter word takes
  17 s, one 1,000-letter word 0.15 s), so a sentence over :data:`MAX_SENTENCE_CHARS` characters is
  skipped; no REFER sentence comes near it (they stay under about 300).

Pixels and masks share one space: the image as stored, without EXIF orientation (the COCO/REFER
convention; see :mod:`pipeline.data.images`). An EXIF-rotated image whose ``instances.json`` size is
the upright one is therefore a size mismatch, never a silently misaligned mask. Tables (fixed schemas
in :mod:`pipeline.data.tables`):

- ``images.parquet``: image_id int64, file_name string, path string, width int32, height int32
- ``refs.parquet``: ref_id int64, ann_id int64, image_id int64, split string, category_id int32,
  category string, bbox list<float64> (xywh), mask_counts string (compressed COCO RLE),
  mask_height int32, mask_width int32, area float64
- ``sentences.parquet``: sent_id int64, ref_id int64, image_id int64, split string, text string

``report.json`` counts kept images / refs / sentences per split and skipped items by reason. Units:
``empty_sentence`` and ``sentence_too_long`` count sentences, every other reason counts refs;
``skipped_images`` counts distinct images per image reason. ``examples`` lists up to five ref ids (with
the problem) per reason.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from pipeline.atomic import atomic_dir
from pipeline.data.images import UnreadableImageError, decoded_size
from pipeline.data.rle import decode_rle
from pipeline.data.tables import SCHEMAS, table_from_rows

SKIP_REASONS = (
    "image_missing_from_instances",
    "annotation_missing",
    "annotation_from_other_image",
    "split_missing",
    "split_unknown",
    "image_outside_folder",
    "image_missing_on_disk",
    "image_unreadable",
    "image_size_mismatch",
    "bbox_invalid",
    "bbox_not_bounding_mask",
    "segmentation_invalid",
    "segmentation_empty",
    "segmentation_outside_image",
    "empty_sentence",
    "sentence_too_long",
    "ref_without_sentences",
)
IMAGE_REASONS = ("image_outside_folder", "image_missing_on_disk", "image_unreadable", "image_size_mismatch")
# The split names of REFER's releases (RefCOCO/+ unc: train val testA testB; RefCOCOg umd: train val test,
# google: train val; RefCLEF unc adds testC, berkeley: train val test), in the order splits are listed.
KNOWN_SPLITS = ("train", "val", "test", "testA", "testB", "testC")
_SPLIT_ORDER = {name: i for i, name in enumerate(KNOWN_SPLITS)}
_MAX_EXAMPLES = 5
# How far (pixels) a bbox or polygon vertex may reach past the image border: COCO coordinates are floats
# and annotation tools round, so a vertex at x = width + 0.5 is a border pixel, not an error.
BORDER_TOLERANCE = 1.0
# How far (pixels) the mask's tight box may reach past the bbox on each side (rasterising reaches 0.5).
BBOX_MASK_TOLERANCE = 2.0
# The longest sentence kept, in characters (bounds the tokenizer's time; REFER's stay under ~300).
MAX_SENTENCE_CHARS = 1000


class GroundTruthError(ValueError):
    """One ref's ground truth cannot be right; ``reason`` is its skip reason in the report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Index:
    """The three tables as DataFrames plus the build report (what :func:`load_index` returns)."""

    images: pd.DataFrame
    refs: pd.DataFrame
    sentences: pd.DataFrame
    report: dict = field(default_factory=dict)


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """One compressed COCO RLE from polygons, uncompressed RLE (RefCLEF) or compressed RLE."""
    if isinstance(segmentation, list):
        polygons = [list(map(float, p)) for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        for polygon in polygons:
            if not _inside(polygon[0::2], width) or not _inside(polygon[1::2], height):
                raise GroundTruthError("segmentation_outside_image",
                                       f"polygon vertex outside the {width}x{height} image")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(s) for s in segmentation["size"]] != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} != image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        return {"size": [height, width], "counts": counts}
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


def _inside(values: list[float], extent: int) -> bool:
    """Whether all coordinates are finite and within ``[0, extent]`` give or take the border tolerance."""
    return all(math.isfinite(v) and -BORDER_TOLERANCE <= v <= extent + BORDER_TOLERANCE for v in values)


def check_bbox(bbox: Any, height: int, width: int) -> list[float]:
    """``bbox`` as four floats, or :class:`GroundTruthError` if it is not a non-empty box inside the image.

    Why: the box metrics (Acc_box) and PointIt compare against it; a box off the image scores every
    prediction wrong without any error.
    """
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError, OverflowError) as err:
        raise GroundTruthError("bbox_invalid", f"bbox {_short(bbox)} is not four numbers") from err
    if not (w > 0 and h > 0 and _inside([x, x + w], width) and _inside([y, y + h], height)):
        raise GroundTruthError("bbox_invalid", f"bbox {_short(bbox)} is not a non-empty box inside the "
                                               f"{width}x{height} image")
    return [x, y, w, h]


def check_bbox_bounds_mask(bbox: list[float], rle: dict) -> None:
    """:class:`GroundTruthError` unless the mask's tight box lies within ``bbox`` grown by
    :data:`BBOX_MASK_TOLERANCE` on each side (the box metrics score against ``bbox``, the mask metrics
    against the mask: they must describe one object)."""
    mx, my, mw, mh = (float(v) for v in mask_utils.toBbox(rle))
    x, y, w, h = bbox
    t = BBOX_MASK_TOLERANCE
    if mx < x - t or my < y - t or mx + mw > x + w + t or my + mh > y + h + t:
        raise GroundTruthError("bbox_not_bounding_mask",
                               f"bbox {[round(v, 2) for v in bbox]} does not bound the mask, whose box is "
                               f"{[round(v, 2) for v in (mx, my, mw, mh)]} (tolerance {t:g} px)")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile value can be long)."""
    text = repr(value) if not isinstance(value, list | tuple) or len(value) <= 16 else \
        f"{type(value).__name__} of {len(value)} items"
    return text if len(text) <= limit else text[:limit] + "..."


def decode_mask(row: Mapping[str, Any]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of one ``refs`` row (a pandas Series or a dict)."""
    return decode_rle({"size": [int(row["mask_height"]), int(row["mask_width"])],
                       "counts": str(row["mask_counts"]).encode("ascii")})


@dataclass(frozen=True)
class _Probe:
    """What probing one image found: a skip reason (or None), its decoded (width, height) (or None), and
    for ``image_outside_folder`` where the path really leads."""

    reason: str | None
    size: tuple[int, int] | None = None
    detail: str = ""


def _probe_image(folder: Path, file_name: str, expected: tuple[int, int]) -> _Probe:
    """Probe ``folder / file_name`` (``folder`` already resolved): inside the folder once resolved, then
    decoded fully. Only the resolved path is opened, so a symlink out of the folder is never read."""
    try:
        real = (folder / file_name).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an embedded NUL
        return _Probe("image_missing_on_disk")
    if not real.is_relative_to(folder):
        return _Probe("image_outside_folder", detail=f"{file_name!r} resolves to {real}, outside {folder}")
    try:
        size = decoded_size(real)
    except FileNotFoundError:
        return _Probe("image_missing_on_disk")
    except UnreadableImageError:
        return _Probe("image_unreadable")
    return _Probe("image_size_mismatch" if size != expected else None, size)


def _sentence_text(sent: Any) -> Any:
    """The text stored for one REFER sentence: its cleaned ``sent``, else ``raw`` (the rule
    :func:`pipeline.data.refer.sentence_text` checks; not imported, so that the stages reading the index
    do not depend on the REFER reader)."""
    if not isinstance(sent, dict):
        return None
    text = sent.get("sent")
    return sent.get("raw") if text is None else text


def _sentence_rows(ref: dict) -> tuple[list[dict], int, list[str]]:
    """Sentence rows of one ref, how many sentences were empty, and one line per sentence longer than
    :data:`MAX_SENTENCE_CHARS` (all skipped)."""
    rows, empty, too_long = [], 0, []
    sent_ids = ref.get("sent_ids") or []
    for k, sent in enumerate(ref["sentences"]):
        text = _sentence_text(sent)
        if not isinstance(text, str) or not text.strip():
            empty += 1
            continue
        sent_id = sent.get("sent_id", sent_ids[k] if k < len(sent_ids) else None)
        if sent_id is None:
            raise ValueError(f"ref {ref['ref_id']}: sentence {k} has no sent_id")
        if len(text) > MAX_SENTENCE_CHARS:
            too_long.append(f"{ref['ref_id']}: sentence {sent_id} has {len(text)} characters "
                            f"(limit {MAX_SENTENCE_CHARS})")
            continue
        rows.append({"sent_id": int(sent_id), "ref_id": int(ref["ref_id"]), "image_id": int(ref["image_id"]),
                     "split": str(ref["split"]), "text": text})
    return rows, empty, too_long


def _ref_row(ref: dict, ann: dict, image: dict, categories: dict[int, str]) -> dict:
    """The refs-table row of one ref; :class:`GroundTruthError` (or ValueError) if its ground truth is bad.

    The mask is decoded once here so that RLE counts which do not add up to the image fail now (as
    ``segmentation_invalid``) rather than in evaluation.
    """
    height, width = int(image["height"]), int(image["width"])
    rle = segmentation_to_rle(ann["segmentation"], height, width)
    area = int(decode_rle(rle).sum())  # raises ValueError on counts that are not a valid RLE of this size
    if area == 0:
        raise GroundTruthError("segmentation_empty", "the mask has zero area")
    bbox = ann.get("bbox")
    if bbox is not None and not (isinstance(bbox, list | tuple) and len(bbox) == 4):
        bbox = None  # malformed rather than wrong: fall back to the mask's box, as before
    if bbox is None:
        bbox = mask_utils.toBbox(rle).tolist()
    else:
        bbox = check_bbox(bbox, height, width)
        check_bbox_bounds_mask(bbox, rle)
    category_id = int(ann.get("category_id", ref.get("category_id", 0)))  # the annotation is authoritative
    return {"ref_id": int(ref["ref_id"]), "ann_id": int(ref["ann_id"]), "image_id": int(ref["image_id"]),
            "split": str(ref["split"]), "category_id": category_id,
            "category": categories.get(category_id, str(category_id)),
            "bbox": [float(v) for v in bbox], "mask_counts": rle["counts"].decode("ascii"),
            "mask_height": int(rle["size"][0]), "mask_width": int(rle["size"][1]),
            "area": float(area)}


def _split_key(split: str) -> tuple[int, str]:
    return _SPLIT_ORDER.get(split, len(_SPLIT_ORDER)), split


def split_names(index: Index) -> list[str]:
    """The splits that have at least one kept ref, in the usual order (train, val, test, testA, ...)."""
    return sorted({str(s) for s in index.refs["split"]}, key=_split_key)


def _split_problem(split: Any) -> tuple[str, str] | None:
    """``(skip reason, what is wrong)`` for a ref's ``split`` that is not one of :data:`KNOWN_SPLITS`."""
    if not isinstance(split, str) or not split.strip():
        return "split_missing", f"split {_short(split)}"
    if split in _SPLIT_ORDER:
        return None
    near = next((k for k in KNOWN_SPLITS if k.lower() == split.strip().lower()), None)
    hint = f" (did you mean {near!r}?)" if near else ""
    return "split_unknown", f"split {_short(split)} is not one of {', '.join(KNOWN_SPLITS)}{hint}"


def _printable(example: Any) -> Any:
    """An example as report.json can hold it: ints as they are, text with lone surrogates escaped."""
    if isinstance(example, int):
        return example
    return str(example).encode("utf-8", "backslashreplace").decode("utf-8")


def build_index(refs: list[dict], instances: dict, image_dir: str | Path,
                workers: int = 8) -> tuple[dict[str, pa.Table], dict]:
    """Join refs, annotations and decoded image sizes into the three tables plus a skip report.

    Each image is decoded once (in a thread pool: PIL releases the GIL while decoding), so a truncated
    file or an ``instances.json`` size that disagrees with the pixels is caught here.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory not found")
    folder = image_dir.resolve()
    images = {int(im["id"]): im for im in instances["images"]}
    anns = {int(a["id"]): a for a in instances["annotations"]}
    categories = {int(c["id"]): str(c["name"]) for c in instances.get("categories", [])}
    skipped: Counter = Counter({reason: 0 for reason in SKIP_REASONS})
    examples: dict[str, list] = defaultdict(list)

    def skip(reason: str, ident: Any, n: int = 1) -> None:
        skipped[reason] += n
        if len(examples[reason]) < _MAX_EXAMPLES:
            examples[reason].append(_printable(ident))

    candidates = []
    for ref in refs:
        image_id, ann_id = int(ref["image_id"]), int(ref["ann_id"])
        if image_id not in images:
            skip("image_missing_from_instances", ref["ref_id"])
        elif ann_id not in anns:
            skip("annotation_missing", ref["ref_id"])
        elif int(anns[ann_id].get("image_id", image_id)) != image_id:
            skip("annotation_from_other_image", f"{ref['ref_id']}: annotation {ann_id} is on image "
                                                f"{anns[ann_id]['image_id']}, not {image_id}")
        elif (problem := _split_problem(ref["split"])) is not None:
            skip(problem[0], f"{ref['ref_id']}: {problem[1]}")
        else:
            candidates.append(ref)

    image_ids = sorted({int(r["image_id"]) for r in candidates})

    def probe(image_id: int) -> _Probe:
        im = images[image_id]
        return _probe_image(folder, im["file_name"], (int(im["width"]), int(im["height"])))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        probed = dict(zip(image_ids, pool.map(probe, image_ids), strict=True))
    skipped_images = Counter({r: 0 for r in IMAGE_REASONS})
    for found in probed.values():
        if found.reason is not None:
            skipped_images[found.reason] += 1

    ref_rows, sent_rows = [], []
    for ref in candidates:
        image_id = int(ref["image_id"])
        found = probed[image_id]
        if found.reason is not None:
            skip(found.reason, f"{ref['ref_id']}: {found.detail}" if found.detail else ref["ref_id"])
            continue
        sentences, empty, too_long = _sentence_rows(ref)
        if empty:
            skip("empty_sentence", ref["ref_id"], empty)
        for line in too_long:
            skip("sentence_too_long", line)
        if not sentences:
            skip("ref_without_sentences", ref["ref_id"])
            continue
        try:
            row = _ref_row(ref, anns[int(ref["ann_id"])], images[image_id], categories)
        except GroundTruthError as err:
            skip(err.reason, f"{ref['ref_id']}: {err}")
            continue
        except (ValueError, TypeError, KeyError, OverflowError) as err:
            skip("segmentation_invalid", f"{ref['ref_id']}: {str(err)[:200]}")
            continue
        ref_rows.append(row)
        sent_rows.extend(sentences)

    _require_unique_rows(ref_rows, "ref_id")  # load_refer already refuses these; build_index may be
    _require_unique_rows(sent_rows, "sent_id")  # called on refs from elsewhere
    kept_image_ids = sorted({r["image_id"] for r in ref_rows})
    image_rows = [{"image_id": i, "file_name": str(images[i]["file_name"]),
                   "path": (image_dir / images[i]["file_name"]).as_posix(),
                   "width": probed[i].size[0], "height": probed[i].size[1]} for i in kept_image_ids]
    ref_rows.sort(key=lambda r: r["ref_id"])
    sent_rows.sort(key=lambda r: r["sent_id"])
    tables = {"images": table_from_rows("images", image_rows), "refs": table_from_rows("refs", ref_rows),
              "sentences": table_from_rows("sentences", sent_rows)}
    report = _report(ref_rows, sent_rows, skipped, skipped_images, examples)
    return tables, report


def _require_unique_rows(rows: list[dict], key: str) -> None:
    """Raise naming the first duplicated ``key``: every later stage looks rows up by it."""
    counts = Counter(r[key] for r in rows)
    dup = next((k for k, n in counts.items() if n > 1), None)
    if dup is not None:
        raise ValueError(f"refs: {key} {dup} occurs {counts[dup]} times; {key} must be unique")


def _report(ref_rows: list[dict], sent_rows: list[dict], skipped: Counter, skipped_images: Counter,
            examples: dict[str, list]) -> dict:
    per_split: dict[str, dict[str, int]] = {}
    for split in sorted({r["split"] for r in ref_rows}, key=_split_key):
        refs = [r for r in ref_rows if r["split"] == split]
        per_split[split] = {"images": len({r["image_id"] for r in refs}), "refs": len(refs),
                            "sentences": sum(1 for s in sent_rows if s["split"] == split)}
    return {
        "kept": {"images": len({r["image_id"] for r in ref_rows}), "refs": len(ref_rows),
                 "sentences": len(sent_rows)},
        "per_split": per_split,
        "skipped": dict(skipped),
        "skipped_images": dict(skipped_images),
        "examples": {k: v for k, v in examples.items() if v},
    }


def format_report(report: dict) -> str:
    """A few human-readable lines summarising ``report`` (printed by the index stage)."""
    kept = report["kept"]
    lines = [f"index: kept {kept['images']} images, {kept['refs']} refs, {kept['sentences']} sentences"]
    for split, c in report["per_split"].items():
        lines.append(f"  {split:>6}: {c['images']} images, {c['refs']} refs, {c['sentences']} sentences")
    bad = {k: v for k, v in report["skipped"].items() if v}
    lines.append("  skipped: " + (", ".join(f"{k}={v}" for k, v in bad.items()) if bad else "nothing"))
    for reason, ids in report.get("examples", {}).items():
        lines.append(f"    e.g. {reason}: {ids}")
    return "\n".join(lines)


def write_index(out_dir: str | Path, tables: dict[str, pa.Table], report: dict) -> None:
    """Write the three tables and ``report.json`` into ``out_dir`` atomically (all or nothing)."""
    for name, schema in SCHEMAS.items():
        if not tables[name].schema.equals(schema):
            raise ValueError(f"table {name!r} has schema {tables[name].schema}, expected {schema}")
    with atomic_dir(out_dir) as tmp:
        for name in SCHEMAS:
            pq.write_table(tables[name], tmp / f"{name}.parquet")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")


def load_index(index_dir: str | Path) -> Index:
    """Read an index written by :func:`write_index` (raises naming the folder if it is missing)."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"{index_dir}: index folder not found (run the index stage first)")
    frames = {}
    for name, schema in SCHEMAS.items():
        path = index_dir / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: index table not found")
        frames[name] = pq.read_table(path, schema=schema).to_pandas()
    report_path = index_dir / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    return Index(images=frames["images"], refs=frames["refs"], sentences=frames["sentences"], report=report)
