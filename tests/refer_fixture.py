"""A tiny hand-made dataset in REFER's layout, with one case of every problem the index must survive.

Images (under ``root/images``):
  1 rgb_1.jpg    64x48 RGB, three annotations (a 32x24 rectangle, a triangle, a small box)
  2 grey_2.jpg   40x30 greyscale (mode L)
  3 cmyk_3.jpg   36x28 CMYK, annotation given as uncompressed RLE (RefCLEF style)
  4 exif_4.jpg   stored 60x40 with EXIF orientation 6 (upright 40x60); annotated as stored, like COCO
  5 trunc_5.jpg  a truncated JPEG                         -> image_unreadable
  6 (absent)     listed in instances.json, not on disk     -> image_missing_on_disk
  7 (absent)     referenced by a ref, not in instances     -> image_missing_from_instances
  8 size_8.jpg   32x32 on disk, instances.json says 30x30  -> image_size_mismatch
Refs: 101 / 102 / 104 on image 1 (101 has one whitespace sentence; 104 has only empty ones), 103 points
at a missing annotation, 201 has a sentence with only ``raw``, 102's text is non-ASCII.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

NON_ASCII_TEXT = "the café’s 猫 on the left"
RECT_POLYGON = [8.0, 8.0, 40.0, 8.0, 40.0, 32.0, 8.0, 32.0]  # 32 x 24 = 768 px
TRIANGLE_POLYGON = [44.0, 6.0, 62.0, 44.0, 44.0, 44.0]  # 0.5 * 18 * 38 = 342 px
GREY_POLYGON = [4.0, 4.0, 30.0, 4.0, 17.0, 24.0]  # 0.5 * 26 * 20 = 260 px
EXIF_POLYGON = [10.0, 6.0, 50.0, 6.0, 50.0, 34.0, 10.0, 34.0]  # 40 x 28 = 1120 px, stored space
RLE_BOX = (slice(5, 15), slice(10, 26))  # rows, cols of image 3's mask: 10 x 16 = 160 px

EXPECTED = {
    "kept": {"images": 4, "refs": 5, "sentences": 6},
    "per_split": {"train": {"images": 1, "refs": 2, "sentences": 2},
                  "val": {"images": 1, "refs": 1, "sentences": 2},
                  "testA": {"images": 1, "refs": 1, "sentences": 1},
                  "testB": {"images": 1, "refs": 1, "sentences": 1}},
    "skipped": {"image_missing_from_instances": 1, "annotation_missing": 1, "annotation_from_other_image": 0,
                "split_missing": 0, "split_unknown": 0, "image_outside_folder": 0, "image_missing_on_disk": 1,
                "image_unreadable": 1, "image_size_mismatch": 1, "bbox_invalid": 0,
                "bbox_not_bounding_mask": 0, "segmentation_invalid": 0, "segmentation_empty": 0,
                "segmentation_outside_image": 0, "empty_sentence": 3, "sentence_too_long": 0,
                "ref_without_sentences": 1},
    "sizes": {1: (64, 48), 2: (40, 30), 3: (36, 28), 4: (60, 40)},  # (width, height) as stored
    "areas": {101: 768.0, 102: 342.0, 201: 260.0, 301: 160.0, 401: 1120.0},
}


def polygon_area(flat: list[float]) -> float:
    """Shoelace area of a flat ``[x1, y1, x2, y2, ...]`` polygon."""
    xs, ys = np.asarray(flat[0::2]), np.asarray(flat[1::2])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.astype(np.uint8).ravel(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _sentence(sent_id: int, text: str, raw_only: bool = False) -> dict:
    if raw_only:
        return {"tokens": text.lower().split(), "raw": text, "sent_id": sent_id}
    return {"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text}


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sentences: list[dict],
         category_id: int = 1) -> dict:
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
            "category_id": category_id, "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
            "file_name": f"img_{image_id}_{ann_id}.jpg"}


def _write_images(image_dir: Path, with_bad_cases: bool) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    rgb = Image.new("RGB", (64, 48), (90, 90, 90))
    corners = list(zip(RECT_POLYGON[0::2], RECT_POLYGON[1::2], strict=True))
    ImageDraw.Draw(rgb).polygon(corners, fill=(200, 30, 30))
    rgb.save(image_dir / "rgb_1.jpg", quality=95)
    Image.new("L", (40, 30), 120).save(image_dir / "grey_2.jpg", quality=95)
    Image.new("CMYK", (36, 28), (0, 255, 255, 0)).save(image_dir / "cmyk_3.jpg", quality=95)
    stored = np.full((40, 60, 3), 100, np.uint8)  # H=40, W=60 as stored
    stored[:10, :10] = (220, 20, 20)  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(image_dir / "exif_4.jpg", quality=95, exif=exif.tobytes())
    if with_bad_cases:
        noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
        (image_dir / "trunc_5.jpg").write_bytes(data[: int(len(data) * 0.6)])
        Image.fromarray(noise).save(image_dir / "size_8.jpg", quality=95)


# The released REFER layouts: (dataset folder, split_by of refs(<split_by>).p) -> the splits of its refs,
# train first. The fixture's three evaluation images (2, 3, 4) take the other splits in turn.
RELEASES = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("refclef", "unc"): ("train", "val", "testA", "testB", "testC"),
    ("refclef", "berkeley"): ("train", "val", "test"),
}


def release_splits(dataset: str, split_by: str) -> tuple[str, str, str]:
    """Splits of the fixture's images 2, 3, 4 under a released layout (val first, as every release has)."""
    evaluation = RELEASES.get((dataset, split_by), ("train", "val", "testA", "testB"))[1:]
    return tuple(evaluation[min(i, len(evaluation) - 1)] for i in range(3))


def write_refer_fixture(root: Path, dataset: str = "refcoco", split_by: str = "unc",
                        with_bad_cases: bool = True) -> Path:
    """Write the fixture under ``root`` (REFER layout: ``<dataset>/refs(<split_by>).p`` and
    ``<dataset>/instances.json``) and return the image folder. The evaluation refs carry the split names
    of that release (:data:`RELEASES`); ``refcoco`` / ``unc`` gives val, testA, testB."""
    split2, split3, split4 = release_splits(dataset, split_by)
    root = Path(root)
    image_dir = root / "images"
    _write_images(image_dir, with_bad_cases)
    rle_mask = np.zeros((28, 36), bool)
    rle_mask[RLE_BOX] = True
    images = [{"id": 1, "file_name": "rgb_1.jpg", "width": 64, "height": 48},
              {"id": 2, "file_name": "grey_2.jpg", "width": 40, "height": 30},
              {"id": 3, "file_name": "cmyk_3.jpg", "width": 36, "height": 28},
              {"id": 4, "file_name": "exif_4.jpg", "width": 60, "height": 40}]
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "segmentation": [RECT_POLYGON],
             "bbox": [8, 8, 32, 24]},
            {"id": 12, "image_id": 1, "category_id": 2, "segmentation": [TRIANGLE_POLYGON]},
            {"id": 13, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
            {"id": 21, "image_id": 2, "category_id": 2, "segmentation": [GREY_POLYGON]},
            {"id": 31, "image_id": 3, "category_id": 1, "segmentation": uncompressed_rle(rle_mask),
             "bbox": [10, 5, 16, 10]},
            {"id": 41, "image_id": 4, "category_id": 1, "segmentation": [EXIF_POLYGON]}]
    refs = [_ref(101, 11, 1, "train", [_sentence(1, "the left box"), _sentence(2, "   ")]),
            _ref(102, 12, 1, "train", [_sentence(3, NON_ASCII_TEXT)], category_id=2),
            _ref(103, 99, 1, "train", [_sentence(4, "annotation is gone")]),
            _ref(104, 13, 1, "train", [_sentence(5, ""), _sentence(6, " \t ")]),
            _ref(201, 21, 2, split2, [_sentence(7, "grey triangle"), _sentence(8, "Raw Only Text", True)],
                 category_id=2),
            _ref(301, 31, 3, split3, [_sentence(9, "cmyk square")]),
            _ref(401, 41, 4, split4, [_sentence(10, "rotated box")])]
    if with_bad_cases:
        for image_id, name, side in ((5, "trunc_5.jpg", 32), (6, "missing_6.jpg", 32), (8, "size_8.jpg", 30)):
            images.append({"id": image_id, "file_name": name, "width": side, "height": side})
        for image_id in (5, 6, 7, 8):
            anns.append({"id": image_id * 10 + 1, "image_id": image_id, "category_id": 1,
                         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})
            refs.append(_ref(image_id * 100 + 1, image_id * 10 + 1, image_id, "train",
                             [_sentence(image_id * 10, f"bad case {image_id}")]))
    instances = {"images": images, "annotations": anns,
                 "categories": [{"id": 1, "name": "box", "supercategory": "shape"},
                                {"id": 2, "name": "triangle", "supercategory": "shape"}]}
    data_dir = root / dataset
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / f"refs({split_by}).p").open("wb") as fh:
        pickle.dump(refs, fh)
    (data_dir / "instances.json").write_text(json.dumps(instances, ensure_ascii=False), encoding="utf-8")
    return image_dir


class RawPickle(bytes):
    """Pickle opcodes spliced verbatim into :func:`py2_pickle`'s output (to build hostile pickles)."""


def py2_pickle(obj) -> bytes:
    """Protocol-2 opcodes as Python 2's cPickle wrote REFER's refs (``str`` values as UTF-8 byte strings),
    with :class:`RawPickle` pieces spliced in. Wrap in ``b"\\x80\\x02" + ... + b"."`` for a whole file."""
    if isinstance(obj, RawPickle):
        return bytes(obj)
    if isinstance(obj, bool) or obj is None:
        raise TypeError(obj)
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, float):
        return b"G" + struct.pack(">d", obj)
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))) + data
    if isinstance(obj, list):
        return b"](" + b"".join(py2_pickle(x) for x in obj) + b"e"
    return b"}(" + b"".join(py2_pickle(k) + py2_pickle(v) for k, v in obj.items()) + b"u"
