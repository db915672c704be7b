"""REFER reading, image decoding and the Parquet index, on a hand-made fixture with every bad case."""

from __future__ import annotations

import json
import pickle
import runpy
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import ImageFile
from refer_fixture import (
    EXPECTED,
    NON_ASCII_TEXT,
    RECT_POLYGON,
    TRIANGLE_POLYGON,
    polygon_area,
    write_refer_fixture,
)
from tiny_pipeline import write_params

from pipeline.data.images import UnreadableImageError, decoded_size, read_image_rgb
from pipeline.data.index import build_index, decode_mask, load_index, write_index
from pipeline.data.refer import load_refer
from pipeline.data.tables import SCHEMAS


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refer")
    write_refer_fixture(root)
    return root


@pytest.fixture(scope="module")
def built(fixture_root):
    refs, instances = load_refer(fixture_root, "refcoco", "unc")
    return build_index(refs, instances, fixture_root / "images", workers=2)


def test_counts_and_skip_report(built):
    tables, report = built
    assert report["kept"] == EXPECTED["kept"]
    assert report["per_split"] == EXPECTED["per_split"]
    assert report["skipped"] == EXPECTED["skipped"]
    assert report["skipped_images"] == {"image_outside_folder": 0, "image_missing_on_disk": 1,
                                        "image_unreadable": 1, "image_size_mismatch": 1}
    assert report["examples"]["image_unreadable"] == [501]
    assert report["examples"]["ref_without_sentences"] == [104]
    assert {name: t.num_rows for name, t in tables.items()} == {"images": 4, "refs": 5, "sentences": 6}
    assert tables["refs"].column("ref_id").to_pylist() == [101, 102, 201, 301, 401]
    assert tables["sentences"].column("sent_id").to_pylist() == [1, 3, 7, 8, 9, 10]
    for name, schema in SCHEMAS.items():
        assert tables[name].schema.equals(schema)


def test_image_sizes_are_those_of_the_decoded_image(built, fixture_root):
    images = built[0]["images"].to_pandas().set_index("image_id")
    for image_id, (width, height) in EXPECTED["sizes"].items():
        assert (images.loc[image_id, "width"], images.loc[image_id, "height"]) == (width, height)
        pixels = read_image_rgb(images.loc[image_id, "path"])
        assert pixels.shape == (height, width, 3) and pixels.dtype == np.uint8
    assert images.loc[4, "path"] == (fixture_root / "images" / "exif_4.jpg").as_posix()


def test_masks_decode_to_the_polygon_area(built):
    refs = built[0]["refs"].to_pandas().set_index("ref_id")
    assert EXPECTED["areas"][101] == polygon_area(RECT_POLYGON)
    assert EXPECTED["areas"][102] == polygon_area(TRIANGLE_POLYGON)
    for ref_id, area in EXPECTED["areas"].items():
        mask = decode_mask(refs.loc[ref_id])
        assert mask.dtype == bool and mask.sum() == refs.loc[ref_id, "area"]
        assert abs(mask.sum() - area) <= 0.01 * area
    rect = decode_mask(refs.loc[101])
    assert rect.shape == (48, 64) and rect[8:32, 8:40].all() and not rect[:, 41:].any()
    cmyk_rle = decode_mask(refs.loc[301])  # uncompressed RLE in instances.json (RefCLEF style)
    assert cmyk_rle.shape == (28, 36) and cmyk_rle[5:15, 10:26].all() and cmyk_rle.sum() == 160
    assert list(refs.loc[101, "bbox"]) == [8.0, 8.0, 32.0, 24.0]
    assert list(refs.loc[102, "bbox"]) == pytest.approx([44, 6, 18, 38], abs=1)  # no bbox given: from the RLE
    assert refs.loc[102, "category"] == "triangle"


def test_written_index_round_trips_non_ascii_text(built, tmp_path):
    tables, report = built
    write_index(tmp_path / "index", tables, report)
    index = load_index(tmp_path / "index")
    texts = dict(zip(index.sentences["sent_id"], index.sentences["text"], strict=True))
    assert texts[3] == NON_ASCII_TEXT
    assert texts[8] == "Raw Only Text"  # no 'sent' key: falls back to 'raw'
    raw = pq.read_table(tmp_path / "index" / "sentences.parquet").column("text").to_pylist()
    assert NON_ASCII_TEXT in raw
    assert index.report["skipped"]["empty_sentence"] == 3
    assert json.loads((tmp_path / "index" / "report.json").read_text(encoding="utf-8")) == index.report


def test_greyscale_cmyk_and_exif_images_read_as_stored_rgb(fixture_root):
    images = fixture_root / "images"
    grey = read_image_rgb(images / "grey_2.jpg")
    assert grey.shape == (30, 40, 3) and np.all(grey[..., 0] == grey[..., 2])
    assert abs(int(grey[15, 20, 0]) - 120) <= 2
    cmyk = read_image_rgb(images / "cmyk_3.jpg")
    assert cmyk.shape == (28, 36, 3)
    assert cmyk[14, 18, 0] > 200 and cmyk[14, 18, 1] < 60 and cmyk[14, 18, 2] < 60  # CMYK (0,255,255,0) = red
    stored = read_image_rgb(images / "exif_4.jpg")  # dataset images: as stored, the annotation space
    assert stored.shape == (40, 60, 3)
    assert stored[2:8, 2:8, 0].mean() > 180 and stored[2:8, 52:58, 0].mean() < 140
    assert decoded_size(images / "exif_4.jpg") == (60, 40)
    upright = read_image_rgb(images / "exif_4.jpg", exif_transpose=True)  # a user's photo in predict
    assert upright.shape == (60, 40, 3)
    # Orientation 6 turns the stored top-left marker into the displayed top-right corner.
    assert upright[2:8, 32:38, 0].mean() > 180 and upright[2:8, 2:8, 0].mean() < 140


def test_truncated_image_raises_even_if_pil_was_told_to_tolerate_it(fixture_root, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = fixture_root / "images" / "trunc_5.jpg"
    with pytest.raises(UnreadableImageError, match="trunc_5.jpg"):
        read_image_rgb(path)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        read_image_rgb(fixture_root / "images" / "nope.jpg")


def test_missing_root_pickle_or_instances_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        load_refer(tmp_path / "no_such_root", "refcoco", "unc")
    write_refer_fixture(tmp_path, with_bad_cases=False)
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        load_refer(tmp_path, "refcoco", "umd")
    (tmp_path / "refcoco" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        load_refer(tmp_path, "refcoco", "unc")


@pytest.mark.parametrize("payload, problem", [
    ({"ref_id": 1}, "expected a list"),
    ([("not", "a", "dict")], "item 0 is a tuple"),
    ([{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "train"}], "sentences"),
    ([{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "train", "sentences": "text"}], "expected a list"),
])
def test_pickle_that_is_not_a_list_of_refs_is_rejected(tmp_path, payload, problem):
    write_refer_fixture(tmp_path, with_bad_cases=False)
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=problem) as err:
        load_refer(tmp_path, "refcoco", "unc")
    assert "refs(unc).p" in str(err.value)


def test_other_refer_layouts_load(tmp_path):
    for dataset, split_by in (("refcocog", "umd"), ("refcoco+", "unc"), ("refclef", "berkeley")):
        write_refer_fixture(tmp_path / dataset, dataset=dataset, split_by=split_by, with_bad_cases=False)
        refs, instances = load_refer(tmp_path / dataset, dataset, split_by)
        assert len(refs) == 7 and len(instances["images"]) == 4


def _py2_pickle(obj) -> bytes:
    """Protocol-0 pickle as Python 2 wrote it: every ``str`` is a byte string (here UTF-8 bytes)."""
    if isinstance(obj, int):
        return b"I%d\n" % obj
    if isinstance(obj, str):
        return b"S'" + b"".join(b"\\x%02x" % c for c in obj.encode("utf-8")) + b"'\n"
    if isinstance(obj, list):
        return b"(" + b"".join(_py2_pickle(x) for x in obj) + b"l"
    return b"(" + b"".join(_py2_pickle(k) + _py2_pickle(v) for k, v in obj.items()) + b"d"


def test_python2_pickle_with_utf8_bytes_is_decoded(tmp_path):
    write_refer_fixture(tmp_path, with_bad_cases=False)
    sentence = {"raw": NON_ASCII_TEXT, "sent": NON_ASCII_TEXT, "sent_id": 5, "tokens": ["x"]}
    ref = {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "train", "sentences": [sentence]}
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(_py2_pickle([ref]) + b".")
    refs, _ = load_refer(tmp_path, "refcoco", "unc")
    assert refs[0]["sentences"][0]["sent"] == NON_ASCII_TEXT and refs[0]["split"] == "train"


def test_missing_image_dir_is_an_error(fixture_root):
    refs, instances = load_refer(fixture_root, "refcoco", "unc")
    with pytest.raises(FileNotFoundError, match="not_there"):
        build_index(refs, instances, fixture_root / "not_there")


def test_crash_while_writing_leaves_no_partial_index(built, tmp_path, monkeypatch):
    tables, report = built
    real_write = pq.write_table
    calls = {"n": 0}

    def failing_write(table, where, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_index(tmp_path / "fresh", tables, report)
    assert not (tmp_path / "fresh").exists()

    monkeypatch.setattr(pq, "write_table", real_write)
    write_index(tmp_path / "kept", tables, report)
    before = {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()}
    calls["n"] = 0
    monkeypatch.setattr(pq, "write_table", failing_write)
    with pytest.raises(OSError):
        write_index(tmp_path / "kept", tables, {**report, "kept": {}})
    assert {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no temporary leftovers


def test_synthesize_and_index_stages_end_to_end(in_tmp_cwd, repo_root):
    write_params(in_tmp_cwd, {"synthesize": {"num_images": 8}, "base": {"seed": 4}})  # every key required
    runpy.run_path(str(repo_root / "stages" / "synthesize.py"))["main"]()
    runpy.run_path(str(repo_root / "stages" / "index.py"))["main"]()
    summary = json.loads(Path("artifacts/synthetic/summary.json").read_text())
    index = load_index("artifacts/index")
    assert len(index.images) == 8 and len(index.refs) == summary["refs"]
    assert len(index.sentences) == summary["sentences"]
    assert sum(index.report["skipped"].values()) == 0
    assert index.images["path"].iloc[0] == "artifacts/synthetic/images/synth_000001.jpg"
    row = index.refs.iloc[0]
    assert decode_mask(row).shape == (index.images["height"].iloc[0], index.images["width"].iloc[0])
