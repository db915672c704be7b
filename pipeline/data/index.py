"""The Parquet index: one flat, typed view of a REFER dataset that every later stage reads.

Building it is where bad data is caught, once, instead of crashing a training epoch or an evaluation
hours later. Structural faults (non-integer or duplicate ids, image entries without a size or with a
``file_name`` outside the image folder, a refs pickle that names code) stop
:func:`pipeline.data.refer.load_refer` with the file, field and id named. Faults in one object's
ground truth are skipped and counted by reason in ``report.json``: refs whose image is unknown, missing
on disk, unreadable or of a different size than ``instances.json`` says; whose annotation is missing or
belongs to another image; whose ``split`` is not a name; whose bbox is not inside the image; whose mask
is invalid (RLE counts that do not decode), empty (a zero-area polygon) or outside the image; and empty
sentences.

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
``empty_sentence`` counts sentences, every other reason counts refs; ``skipped_images`` counts distinct
images per image reason. ``examples`` lists up to five ref ids (with the problem) per reason.
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
    "image_missing_on_disk",
    "image_unreadable",
    "image_size_mismatch",
    "bbox_invalid",
    "segmentation_invalid",
    "segmentation_empty",
    "segmentation_outside_image",
    "empty_sentence",
    "ref_without_sentences",
)
IMAGE_REASONS = ("image_missing_on_disk", "image_unreadable", "image_size_mismatch")
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2, "testA": 3, "testB": 4, "testC": 5}
_MAX_EXAMPLES = 5
# How far (pixels) a bbox or polygon vertex may reach past the image border: COCO coordinates are floats
# and annotation tools round, so a vertex at x = width + 0.5 is a border pixel, not an error.
BORDER_TOLERANCE = 1.0


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
    except (TypeError, ValueError) as err:
        raise GroundTruthError("bbox_invalid", f"bbox {bbox!r} is not four numbers") from err
    if not (w > 0 and h > 0 and _inside([x, x + w], width) and _inside([y, y + h], height)):
        raise GroundTruthError("bbox_invalid", f"bbox {bbox!r} is not a non-empty box inside the "
                                               f"{width}x{height} image")
    return [x, y, w, h]


def decode_mask(row: Mapping[str, Any]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of one ``refs`` row (a pandas Series or a dict)."""
    return decode_rle({"size": [int(row["mask_height"]), int(row["mask_width"])],
                       "counts": str(row["mask_counts"]).encode("ascii")})


def _probe_image(path: Path, expected: tuple[int, int]) -> tuple[str | None, tuple[int, int] | None]:
    """``(skip_reason or None, decoded (width, height) or None)`` for one image file."""
    try:
        size = decoded_size(path)
    except FileNotFoundError:
        return "image_missing_on_disk", None
    except UnreadableImageError:
        return "image_unreadable", None
    return ("image_size_mismatch" if size != expected else None), size


def _sentence_rows(ref: dict) -> tuple[list[dict], int]:
    """Sentence rows of one ref and how many sentences were empty (skipped)."""
    rows, empty = [], 0
    sent_ids = ref.get("sent_ids") or []
    for k, sent in enumerate(ref["sentences"]):
        text = sent.get("sent") if isinstance(sent, dict) else None
        if text is None and isinstance(sent, dict):
            text = sent.get("raw")
        if not isinstance(text, str) or not text.strip():
            empty += 1
            continue
        sent_id = sent.get("sent_id", sent_ids[k] if k < len(sent_ids) else None)
        if sent_id is None:
            raise ValueError(f"ref {ref['ref_id']}: sentence {k} has no sent_id")
        rows.append({"sent_id": int(sent_id), "ref_id": int(ref["ref_id"]), "image_id": int(ref["image_id"]),
                     "split": str(ref["split"]), "text": text})
    return rows, empty


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
    bbox = mask_utils.toBbox(rle).tolist() if bbox is None else check_bbox(bbox, height, width)
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


def build_index(refs: list[dict], instances: dict, image_dir: str | Path,
                workers: int = 8) -> tuple[dict[str, pa.Table], dict]:
    """Join refs, annotations and decoded image sizes into the three tables plus a skip report.

    Each image is decoded once (in a thread pool: PIL releases the GIL while decoding), so a truncated
    file or an ``instances.json`` size that disagrees with the pixels is caught here.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory not found")
    images = {int(im["id"]): im for im in instances["images"]}
    anns = {int(a["id"]): a for a in instances["annotations"]}
    categories = {int(c["id"]): str(c["name"]) for c in instances.get("categories", [])}
    skipped: Counter = Counter({reason: 0 for reason in SKIP_REASONS})
    examples: dict[str, list] = defaultdict(list)

    def skip(reason: str, ident: Any, n: int = 1) -> None:
        skipped[reason] += n
        if len(examples[reason]) < _MAX_EXAMPLES:
            examples[reason].append(ident)

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
        elif not isinstance(ref["split"], str) or not ref["split"].strip():
            skip("split_missing", f"{ref['ref_id']}: split {ref['split']!r}")
        else:
            candidates.append(ref)

    image_ids = sorted({int(r["image_id"]) for r in candidates})

    def probe(image_id: int) -> tuple[str | None, tuple[int, int] | None]:
        im = images[image_id]
        return _probe_image(image_dir / im["file_name"], (int(im["width"]), int(im["height"])))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        probed = dict(zip(image_ids, pool.map(probe, image_ids), strict=True))
    skipped_images = Counter({r: 0 for r in IMAGE_REASONS})
    for reason, _ in probed.values():
        if reason is not None:
            skipped_images[reason] += 1

    ref_rows, sent_rows = [], []
    for ref in candidates:
        image_id = int(ref["image_id"])
        reason, _ = probed[image_id]
        if reason is not None:
            skip(reason, ref["ref_id"])
            continue
        sentences, empty = _sentence_rows(ref)
        if empty:
            skip("empty_sentence", ref["ref_id"], empty)
        if not sentences:
            skip("ref_without_sentences", ref["ref_id"])
            continue
        try:
            row = _ref_row(ref, anns[int(ref["ann_id"])], images[image_id], categories)
        except GroundTruthError as err:
            skip(err.reason, f"{ref['ref_id']}: {err}")
            continue
        except (ValueError, TypeError, KeyError) as err:
            skip("segmentation_invalid", f"{ref['ref_id']}: {err}")
            continue
        ref_rows.append(row)
        sent_rows.extend(sentences)

    _require_unique_rows(ref_rows, "ref_id")  # load_refer already refuses these; build_index may be
    _require_unique_rows(sent_rows, "sent_id")  # called on refs from elsewhere
    kept_image_ids = sorted({r["image_id"] for r in ref_rows})
    image_rows = [{"image_id": i, "file_name": str(images[i]["file_name"]),
                   "path": (image_dir / images[i]["file_name"]).as_posix(),
                   "width": probed[i][1][0], "height": probed[i][1][1]} for i in kept_image_ids]
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
