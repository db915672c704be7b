"""Hostile and careless input (issue 15): every problem stops `index` naming file, field and id, or is
skipped and counted; params that name splits are checked before training; pixels and masks share one
space whatever the EXIF orientation; no code runs from a data file.

Each test id names its case. Built on the REFER fixture (tests/refer_fixture.py), edited per case.
"""

from __future__ import annotations

import json
import os
import pickle
import runpy
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from refer_fixture import NON_ASCII_TEXT, py2_pickle, write_refer_fixture
from tiny_pipeline import write_params

from pipeline.data.images import decoded_size, read_image_rgb
from pipeline.data.index import build_index, decode_mask, write_index
from pipeline.data.refer import load_refer
from pipeline.data.splits import eval_splits_problem, require_eval_splits

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers
def _fixture(tmp_path: Path) -> Path:
    write_refer_fixture(tmp_path, with_bad_cases=False)
    return tmp_path


def _read(root: Path) -> tuple[list[dict], dict]:
    refs = pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())
    instances = json.loads((root / "refcoco" / "instances.json").read_text(encoding="utf-8"))
    return refs, instances


def _write(root: Path, refs: list[dict], instances: dict) -> None:
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances), encoding="utf-8")


def _by_id(items: list[dict], ident: int, key: str = "id") -> dict:
    return next(item for item in items if item[key] == ident)


def _index(root: Path) -> tuple[dict, dict]:
    refs, instances = load_refer(root, "refcoco", "unc")
    return build_index(refs, instances, root / "images", workers=1)


# --------------------------------------------------------------------------- structural faults: stop
def _duplicate_sent_id(refs, instances):
    _by_id(refs, 201, "ref_id")["sentences"][0]["sent_id"] = 1  # ref 101 already has sent_id 1


def _duplicate_ref_id(refs, instances):
    _by_id(refs, 201, "ref_id")["ref_id"] = 101


def _image_without_width(refs, instances):
    del _by_id(instances["images"], 3)["width"]


def _ref_image_id_three(refs, instances):
    _by_id(refs, 201, "ref_id")["image_id"] = "three"


def _image_entry_id_three(refs, instances):
    _by_id(instances["images"], 3)["id"] = "three"


def _duplicate_image_id(refs, instances):
    _by_id(instances["images"], 3)["id"] = 2


def _duplicate_annotation_id(refs, instances):
    _by_id(instances["annotations"], 21)["id"] = 11


def _file_name(name):
    def edit(refs, instances):
        _by_id(instances["images"], 2)["file_name"] = name
    return edit


STRUCTURAL = {
    # case id: (edit, file named, what the message must say)
    "duplicate_sent_id": (_duplicate_sent_id, "refs(unc).p", "sent_id 1 occurs twice"),
    "duplicate_ref_id": (_duplicate_ref_id, "refs(unc).p", "ref_id 101 occurs twice"),
    "image_entry_without_width": (_image_without_width, "instances.json", "image 3 lacks 'width'"),
    "ref_image_id_three": (_ref_image_id_three, "refs(unc).p", "ref 201 has image_id 'three'"),
    "image_entry_id_three": (_image_entry_id_three, "instances.json", "has id 'three'"),
    "duplicate_image_id": (_duplicate_image_id, "instances.json", "image id 2 occurs twice"),
    "duplicate_annotation_id": (_duplicate_annotation_id, "instances.json", "annotation id 11 occurs twice"),
    "file_name_dotdot_escapes_image_dir": (_file_name("../grey_2.jpg"), "instances.json", "'../grey_2.jpg'"),
    "file_name_nested_dotdot_escapes_image_dir": (_file_name("a/../../grey_2.jpg"), "instances.json",
                                                  "leaves the image folder"),
    "file_name_absolute_escapes_image_dir": (_file_name("/etc/passwd"), "instances.json", "'/etc/passwd'"),
    "file_name_windows_absolute_escapes_image_dir": (_file_name("C:\\x.jpg"), "instances.json",
                                                     "leaves the image folder"),
}


@pytest.mark.parametrize("case", list(STRUCTURAL))
def test_structural_fault_stops_index_naming_file_field_and_id(tmp_path, case):
    edit, file_name, message = STRUCTURAL[case]
    root = _fixture(tmp_path)
    refs, instances = _read(root)
    edit(refs, instances)
    _write(root, refs, instances)
    with pytest.raises(ValueError) as err:
        _index(root)
    assert file_name in str(err.value) and message in str(err.value), str(err.value)


def test_duplicate_sent_id_stops_the_index_stage_in_one_line(tmp_path, in_tmp_cwd, monkeypatch):
    """The stage itself exits with the message (no traceback), and writes no index."""
    root = _fixture(tmp_path / "data")
    refs, instances = _read(root)
    _duplicate_sent_id(refs, instances)
    _write(root, refs, instances)
    write_params(in_tmp_cwd, {"data": {"source": "refer", "refer": {
        "root": str(root), "dataset": "refcoco", "split_by": "unc", "image_dir": str(root / "images")}}})
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "stages" / "index.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert message.startswith("index: ") and "\n" not in message
    assert "refs(unc).p" in message and "sent_id 1" in message
    assert not (in_tmp_cwd / "artifacts" / "index").exists()


# ------------------------------------------------------------------------ code from a data file: refused
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_reduce_payload_is_refused_without_running(tmp_path):
    root = _fixture(tmp_path / "data")
    marker = tmp_path / "pwned"
    refs, _ = _read(root)
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Payload(marker), *refs], protocol=2))
    with pytest.raises(ValueError) as err:
        load_refer(root, "refcoco", "unc")
    assert not marker.exists()
    assert "refs(unc).p" in str(err.value) and "refused" in str(err.value) and "system" in str(err.value)


def test_python2_protocol2_refer_pickle_still_loads(tmp_path):
    root = _fixture(tmp_path)
    refs, _ = _read(root)
    _by_id(refs, 102, "ref_id")["sentences"][0]["raw"] = NON_ASCII_TEXT
    (root / "refcoco" / "refs(unc).p").write_bytes(b"\x80\x02" + py2_pickle(refs) + b".")
    loaded, _ = load_refer(root, "refcoco", "unc")
    assert loaded == refs
    assert _by_id(loaded, 102, "ref_id")["sentences"][0]["sent"] == NON_ASCII_TEXT


def test_python3_protocol2_pickle_with_bytes_and_sets_still_loads(tmp_path):
    """Python 3 pickles bytes (protocol <= 2) through ``_codecs.encode`` and sets through ``builtins.set``."""
    root = _fixture(tmp_path)
    refs, _ = _read(root)
    refs[0]["extra"] = {"raw": b"bytes", "tags": {1, 2}, "pair": (1.5, None, True)}
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    loaded, _ = load_refer(root, "refcoco", "unc")
    assert loaded == refs


# --------------------------------------------------------------- one object's bad ground truth: skipped
def _ann(instances, ann_id):
    return _by_id(instances["annotations"], ann_id)


SKIPPED = {
    # case id: (edit, skip reason, ref skipped)
    "annotation_from_another_image": (lambda refs, inst: _ann(inst, 11).update(image_id=2),
                                      "annotation_from_other_image", 101),
    "bbox_outside_image": (lambda refs, inst: _ann(inst, 11).update(bbox=[60, 40, 32, 24]),
                           "bbox_invalid", 101),
    "bbox_zero_size": (lambda refs, inst: _ann(inst, 11).update(bbox=[8, 8, 0, 24]), "bbox_invalid", 101),
    "zero_area_polygon": (lambda refs, inst: _ann(inst, 12).update(segmentation=[[10, 10, 20, 20, 30, 30]]),
                          "segmentation_empty", 102),
    "off_image_polygon": (lambda refs, inst: _ann(inst, 12).update(
        segmentation=[[100, 100, 120, 100, 120, 130]]),
                          "segmentation_outside_image", 102),
    "partly_off_image_polygon": (lambda refs, inst: _ann(inst, 12).update(
        segmentation=[[50, 10, 90, 10, 90, 30, 50, 30]]), "segmentation_outside_image", 102),
    "split_none": (lambda refs, inst: _by_id(refs, 201, "ref_id").update(split=None), "split_missing", 201),
    "invalid_rle_counts_string": (lambda refs, inst: _ann(inst, 31).update(
        segmentation={"size": [28, 36], "counts": "garbage!!"}), "segmentation_invalid", 301),
    "invalid_rle_counts_list": (lambda refs, inst: _ann(inst, 31).update(
        segmentation={"size": [28, 36], "counts": [5, 3, 2000]}), "segmentation_invalid", 301),
}


@pytest.mark.parametrize("case", list(SKIPPED))
def test_bad_ground_truth_is_skipped_and_counted(tmp_path, case):
    edit, reason, ref_id = SKIPPED[case]
    root = _fixture(tmp_path)
    refs, instances = _read(root)
    edit(refs, instances)
    _write(root, refs, instances)
    tables, report = _index(root)
    kept = tables["refs"].column("ref_id").to_pylist()
    assert ref_id not in kept and len(kept) == 4
    assert report["skipped"][reason] == 1
    assert str(report["examples"][reason][0]).startswith(str(ref_id))
    assert ref_id not in tables["sentences"].column("ref_id").to_pylist()


def test_bbox_and_polygon_on_the_border_are_kept(tmp_path):
    """COCO coordinates are floats: a box or vertex at the very edge (or half a pixel past it) is fine."""
    root = _fixture(tmp_path)
    before = _index(root)[1]["skipped"]
    refs, instances = _read(root)
    _ann(instances, 11).update(bbox=[0, 0, 64, 48])
    _ann(instances, 12).update(segmentation=[[44.0, 0.0, 64.5, 48.4, 44.0, 48.0]])
    _write(root, refs, instances)
    tables, report = _index(root)
    assert report["skipped"] == before and tables["refs"].num_rows == 5


# ----------------------------------------------------------------------------- EXIF: one pixel space
STORED_W, STORED_H = 48, 32
BOX = (4, 6, 20, 16)  # x0, y0, x1, y1 of the red object, in stored pixels


def _exif_dataset(root: Path, orientation: int, size: tuple[int, int], instances_size=None) -> Path:
    """One image stored at ``size`` with a red box and EXIF ``orientation``, annotated as stored (COCO)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    image = Image.new("RGB", size, (90, 90, 90))
    ImageDraw.Draw(image).rectangle([BOX[0], BOX[1], BOX[2] - 1, BOX[3] - 1], fill=(220, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(image_dir / "photo.jpg", quality=95, exif=exif)
    width, height = instances_size or size
    x0, y0, x1, y1 = BOX
    instances = {"images": [{"id": 1, "file_name": "photo.jpg", "width": width, "height": height}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                  "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                                  "bbox": [x0, y0, x1 - x0, y1 - y0]}],
                 "categories": [{"id": 1, "name": "box"}]}
    refs = [{"ref_id": 1, "ann_id": 1, "image_id": 1, "split": "val", "category_id": 1,
             "sentences": [{"sent_id": 1, "sent": "the red box", "raw": "the red box"}], "sent_ids": [1]}]
    (root / "refcoco").mkdir()
    _write(root, refs, instances)
    return image_dir / "photo.jpg"


def _aligned_iou(path: Path, tables) -> float:
    """IoU of the indexed mask with the red pixels, both as the pipeline reads them."""
    row = tables["refs"].to_pylist()[0]
    mask = decode_mask(row)
    pixels = read_image_rgb(path)
    assert pixels.shape[:2] == mask.shape
    red = (pixels[..., 0] > 160) & (pixels[..., 1] < 100)
    return float((mask & red).sum() / (mask | red).sum())


@pytest.mark.parametrize("orientation", range(1, 9), ids=[f"exif_orientation_{k}" for k in range(1, 9)])
def test_exif_orientation_pixels_and_masks_share_one_space(tmp_path, orientation):
    path = _exif_dataset(tmp_path, orientation, (STORED_W, STORED_H))
    tables, report = _index(tmp_path)
    assert report["kept"]["refs"] == 1, report["skipped"]
    image = tables["images"].to_pylist()[0]
    assert (image["width"], image["height"]) == (STORED_W, STORED_H) == decoded_size(path)
    assert _aligned_iou(path, tables) > 0.9


@pytest.mark.parametrize("orientation", [3, 6, 8],
                         ids=[f"square_image_exif_orientation_{k}" for k in (3, 6, 8)])
def test_square_exif_image_pixels_and_masks_share_one_space(tmp_path, orientation):
    path = _exif_dataset(tmp_path, orientation, (40, 40))
    tables, report = _index(tmp_path)
    assert report["kept"]["refs"] == 1
    assert _aligned_iou(path, tables) > 0.9


def test_exif_rotated_image_annotated_upright_is_a_counted_size_mismatch(tmp_path):
    """instances.json giving the upright size of a 90-degree image is not the stored space: skipped."""
    _exif_dataset(tmp_path, 6, (STORED_W, STORED_H), instances_size=(STORED_H, STORED_W))
    tables, report = _index(tmp_path)
    assert report["kept"]["refs"] == 0 and report["skipped"]["image_size_mismatch"] == 1


def test_upright_reading_is_explicit_and_only_on_request(tmp_path):
    path = _exif_dataset(tmp_path, 6, (STORED_W, STORED_H))
    assert read_image_rgb(path).shape == (STORED_H, STORED_W, 3)
    assert read_image_rgb(path, exif_transpose=True).shape == (STORED_W, STORED_H, 3)


def test_every_image_reader_goes_through_read_image_rgb():
    """One reader decides the pixel space: no other module opens images itself."""
    offenders = [str(p.relative_to(ROOT)) for d in ("pipeline", "stages") for p in (ROOT / d).rglob("*.py")
                 if "Image.open(" in p.read_text(encoding="utf-8") and p.name != "images.py"]
    assert offenders == []


# ------------------------------------------------------------------- params that name splits: checked
SPLITS = ["train", "val", "test"]  # RefCOCOg's


@pytest.mark.parametrize("eval_splits, named", [
    (["val", "testA", "testB"], "'testA'"),   # eval split the data lacks (RefCOCOg with the default)
    (["vall"], "'vall'"),                      # typo
    ([], "empty"),                             # nothing to evaluate
    (["val", "val"], "'val' twice"),
], ids=["eval_split_the_data_lacks", "eval_splits_typo", "eval_splits_empty", "eval_splits_duplicate"])
def test_eval_splits_problem_names_the_key_the_value_and_the_splits(eval_splits, named):
    problem = eval_splits_problem(eval_splits, SPLITS)
    assert problem is not None and problem.startswith("data.eval_splits") and named in problem
    assert "\n" not in problem
    if named != "'val' twice":
        assert "train, val, test" in problem


def test_eval_splits_that_exist_pass():
    assert eval_splits_problem(["val", "test"], SPLITS) is None


@pytest.fixture
def fixture_index(tmp_path, in_tmp_cwd):
    """A REFER-fixture index at artifacts/index of the working directory (splits train/val/testA/testB)."""
    root = _fixture(tmp_path / "data")
    write_index(in_tmp_cwd / "artifacts" / "index", *_index(root))
    return in_tmp_cwd


@pytest.mark.parametrize("eval_splits", [["vall"], [], ["val", "test"]],
                         ids=["eval_splits_typo", "eval_splits_empty", "eval_split_the_data_lacks"])
def test_pretrain_clip_stops_before_training_on_bad_eval_splits(fixture_index, monkeypatch, eval_splits):
    import pipeline.train.clip_pretrain as clip_pretrain

    def no_training(*args, **kwargs):
        raise AssertionError("pretrain_clip started training with bad data.eval_splits")

    monkeypatch.setattr(clip_pretrain, "pretrain_clip", no_training)
    write_params(fixture_index, {"data": {"eval_splits": eval_splits}})
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "stages" / "pretrain_clip.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert message.startswith("pretrain_clip: data.eval_splits") and "\n" not in message
    assert not (fixture_index / "artifacts" / "clip").exists()


def test_require_eval_splits_exits_in_one_line(fixture_index):
    from pipeline.data.index import load_index

    index = load_index("artifacts/index")
    assert require_eval_splits("x", index, ["val", "testA"]) == ["val", "testA"]
    expected = r"^dump_responses: data.eval_splits names 'test', .*\(it has: train, val, testA, testB\)$"
    with pytest.raises(SystemExit, match=expected):
        require_eval_splits("dump_responses", index, ["test"])


def test_every_stage_reading_eval_splits_checks_them_first():
    for script in sorted((ROOT / "stages").glob("*.py")):
        reads = [line for line in script.read_text(encoding="utf-8").splitlines()
                 if "params.data.eval_splits" in line]
        if reads:
            assert "require_eval_splits(" in reads[0], f"{script.name} uses data.eval_splits unchecked"
