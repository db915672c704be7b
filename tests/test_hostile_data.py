"""Hostile input, round two, at the ``index`` stage (issue 30, cases 2, 3, 4, 5, 9, 10 and 13): split
names that are not REFER's, symlinks out of the image folder, 32-bit images, a bbox that does not bound
its mask, pickles that cost gigabytes, sentences that stall the tokenizer, and values that used to end in
a raw traceback. Each test id names its case.

Built on the REFER fixture (tests/refer_fixture.py) and the helpers of tests/test_hostile_input.py. The
pickle bombs load in a child process under a memory limit, so a regression fails fast instead of
swapping the machine.
"""

from __future__ import annotations

import json
import os
import pickle
import runpy
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from refer_fixture import NON_ASCII_TEXT, RawPickle, py2_pickle
from test_hostile_input import _by_id, _fixture, _index, _read, _write
from tiny_pipeline import write_params

import pipeline.data.index as index_module
from pipeline.data.images import UnreadableImageError, read_image_rgb
from pipeline.data.index import (
    BBOX_MASK_TOLERANCE,
    KNOWN_SPLITS,
    MAX_SENTENCE_CHARS,
    SKIP_REASONS,
    build_index,
    split_names,
)
from pipeline.data.refer import MAX_NESTING_DEPTH, load_refer
from pipeline.data.splits import resolve_eval_splits
from pipeline.data.synthetic import generate_synthetic_refer

ROOT = Path(__file__).resolve().parents[1]


def _edited(tmp_path: Path, edit) -> Path:
    root = _fixture(tmp_path)
    refs, instances = _read(root)
    edit(refs, instances)
    _write(root, refs, instances)
    return root


def _kept_refs(tables) -> list[int]:
    return tables["refs"].column("ref_id").to_pylist()


# ------------------------------------------------------------------- case 2: split names not normalised
def test_split_name_not_normalised_is_skipped_and_counted(tmp_path):
    """``"Train "`` is not ``train``: skipped and counted, never a fifth split that ``auto`` evaluates."""
    root = _edited(tmp_path, lambda refs, inst: _by_id(refs, 101, "ref_id").update(split="Train "))
    tables, report = _index(root)
    assert 101 not in _kept_refs(tables) and report["skipped"]["split_unknown"] == 1
    example = report["examples"]["split_unknown"][0]
    assert example.startswith("101: split 'Train '") and "did you mean 'train'" in example
    assert set(report["per_split"]) <= set(KNOWN_SPLITS)
    available = split_names(index_module.Index(tables["images"].to_pandas(), tables["refs"].to_pandas(),
                                               tables["sentences"].to_pandas()))
    assert resolve_eval_splits("auto", available) == ["val", "testA", "testB"]


@pytest.mark.parametrize("split", ["VAL", "dev", "test_a", "train\n"])
def test_other_unknown_split_names_are_skipped_and_counted(tmp_path, split):
    root = _edited(tmp_path, lambda refs, inst: _by_id(refs, 201, "ref_id").update(split=split))
    tables, report = _index(root)
    assert 201 not in _kept_refs(tables) and report["skipped"]["split_unknown"] == 1
    assert repr(split) in report["examples"]["split_unknown"][0]


def test_every_released_split_name_is_known():
    assert set(KNOWN_SPLITS) == {"train", "val", "test", "testA", "testB", "testC"}
    assert "split_unknown" in SKIP_REASONS


# ------------------------------------------------------------- case 3: symlinks out of the image folder
@pytest.fixture
def opened(monkeypatch):
    """Every path the index decodes, resolved."""
    seen: list[Path] = []
    real = index_module.decoded_size

    def recording(path):
        seen.append(Path(path).resolve())
        return real(path)

    monkeypatch.setattr(index_module, "decoded_size", recording)
    return seen


def _assert_nothing_read_outside(opened: list[Path], image_dir: Path) -> None:
    folder = image_dir.resolve()
    assert opened and all(p.is_relative_to(folder) for p in opened), opened


def test_image_symlinked_out_of_the_folder_is_skipped_unread(tmp_path, opened):
    root = _fixture(tmp_path / "data")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(root / "images" / "grey_2.jpg", outside / "grey_2.jpg")
    (root / "images" / "grey_2.jpg").symlink_to(outside / "grey_2.jpg")
    tables, report = _index(root)
    assert 201 not in _kept_refs(tables) and report["skipped"]["image_outside_folder"] == 1
    assert report["skipped_images"]["image_outside_folder"] == 1
    assert "resolves to" in report["examples"]["image_outside_folder"][0]
    _assert_nothing_read_outside(opened, root / "images")


def test_symlinked_directory_to_etc_is_not_read(tmp_path, opened):
    """``sub -> /etc`` with ``file_name: sub/passwd`` used to open /etc/passwd."""
    if not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd here")
    root = _fixture(tmp_path)
    (root / "images" / "sub").symlink_to("/etc")
    refs, instances = _read(root)
    _by_id(instances["images"], 2)["file_name"] = "sub/passwd"
    _write(root, refs, instances)
    tables, report = _index(root)
    assert 201 not in _kept_refs(tables) and report["skipped"]["image_outside_folder"] == 1
    assert "/etc/passwd" in report["examples"]["image_outside_folder"][0]
    _assert_nothing_read_outside(opened, root / "images")


def test_symlinked_directory_out_of_the_folder_is_skipped(tmp_path, opened):
    """A real image behind the directory link: before, it was indexed as if it were in the folder."""
    root = _fixture(tmp_path / "data")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(root / "images" / "grey_2.jpg", outside / "grey_2.jpg")
    (root / "images" / "sub").symlink_to(outside)
    refs, instances = _read(root)
    _by_id(instances["images"], 2)["file_name"] = "sub/grey_2.jpg"
    _write(root, refs, instances)
    tables, report = _index(root)
    assert 201 not in _kept_refs(tables) and report["skipped"]["image_outside_folder"] == 1
    _assert_nothing_read_outside(opened, root / "images")


def test_symlinks_that_stay_inside_the_folder_are_kept(tmp_path):
    """A link to a sibling, and an image folder that is itself a link (the usual COCO set-up), are fine."""
    root = _fixture(tmp_path / "data")
    (root / "images" / "alias_2.jpg").symlink_to("grey_2.jpg")
    refs, instances = _read(root)
    _by_id(instances["images"], 2)["file_name"] = "alias_2.jpg"
    _write(root, refs, instances)
    (tmp_path / "linked").symlink_to(root / "images")
    refs, instances = load_refer(root, "refcoco", "unc")
    tables, report = build_index(refs, instances, tmp_path / "linked", workers=1)
    assert tables["refs"].num_rows == 5 and report["skipped"]["image_outside_folder"] == 0
    paths = tables["images"].column("path").to_pylist()
    assert (tmp_path / "linked" / "alias_2.jpg").as_posix() in paths  # the path as configured


# ---------------------------------------------------------------------- case 4: 32-bit TIFFs decode right
def _tiff(path: Path, values: np.ndarray, mode: str) -> Path:
    image = Image.fromarray(values)  # int32 -> mode I, float32 -> mode F
    assert image.mode == mode
    image.save(path, format="TIFF")
    return path


GRADIENT = np.tile(np.arange(64, dtype=np.float64), (8, 1))  # one row: 0 .. 63


@pytest.mark.parametrize("mode, values", [
    ("I", (GRADIENT * 33_000_000).astype(np.int32)),        # 0 .. 2.08e9
    ("I", (GRADIENT * 1_000_000 - 2**30).astype(np.int32)),  # negative to positive
    ("F", (GRADIENT * 17.5).astype(np.float32)),             # 0 .. 1102.5, past the 0..1 convention
    ("F", (GRADIENT * -0.5).astype(np.float32)),             # all negative
], ids=["int32_tiff_large_values", "int32_tiff_signed", "float32_tiff_past_one", "float32_tiff_negative"])
def test_32_bit_tiff_decodes_over_its_actual_range_not_white(tmp_path, mode, values):
    path = _tiff(tmp_path / "deep.tif", values, mode)
    with Image.open(path) as image:
        assert image.mode == mode
    grey = read_image_rgb(path)[..., 0]
    assert grey.shape == (8, 64) and (read_image_rgb(path)[..., 0] == read_image_rgb(path)[..., 2]).all()
    row = grey[0].astype(int)
    expected = np.rint((values[0] - values.min()) * 255.0 / (values.max() - values.min()))
    assert np.abs(row - expected).max() <= 1
    assert row.min() == 0 and row.max() == 255 and (np.diff(row) * np.sign(np.diff(values[0]))).min() >= 0


def test_float_tiff_in_unit_range_keeps_its_levels(tmp_path):
    values = np.full((8, 8), 0.25, np.float32)
    values[0, 0], values[0, 1] = 0.0, 1.0
    grey = read_image_rgb(_tiff(tmp_path / "unit.tif", values, "F"))[..., 0]
    assert grey[0, 0] == 0 and grey[0, 1] == 255 and grey[4, 4] == 64


def test_int32_tiff_with_16_bit_values_is_stretched_not_read_as_16_bit(tmp_path):
    """A TIFF declaring 32 bits per sample has no 16-bit range: values 0..1000 become 0..255."""
    values = (GRADIENT * 1000 / 63).astype(np.int32)
    grey = read_image_rgb(_tiff(tmp_path / "small.tif", values, "I"))[..., 0]
    assert grey[0, 0] == 0 and grey[0, -1] == 255


def test_16_bit_images_keep_the_16_bit_scale(tmp_path):
    values = np.array([[0, 32768, 65535, 1000]], np.uint16)
    for fmt in ("PNG", "TIFF"):
        path = tmp_path / f"sixteen.{fmt.lower()}"
        Image.fromarray(values).save(path, format=fmt)
        assert read_image_rgb(path)[0, :, 0].tolist() == [0, 127, 255, 3]


def test_float_tiff_with_nan_is_unreadable_and_counted(tmp_path):
    values = np.zeros((30, 40), np.float32)
    values[3, 3] = np.nan
    path = tmp_path / "nan.tif"
    _tiff(path, values, "F")
    with pytest.raises(UnreadableImageError, match="NaN"):
        read_image_rgb(path)
    root = _fixture(tmp_path / "data")
    shutil.copy(path, root / "images" / "nan_2.tif")
    refs, instances = _read(root)
    _by_id(instances["images"], 2)["file_name"] = "nan_2.tif"
    _write(root, refs, instances)
    tables, report = _index(root)
    assert 201 not in _kept_refs(tables) and report["skipped"]["image_unreadable"] == 1


def test_32_bit_tiff_image_is_indexed_at_its_size(tmp_path):
    root = _fixture(tmp_path)
    _tiff(root / "images" / "deep_2.tif", (np.arange(30 * 40).reshape(30, 40) * 10**6).astype(np.int32), "I")
    refs, instances = _read(root)
    _by_id(instances["images"], 2)["file_name"] = "deep_2.tif"
    _write(root, refs, instances)
    tables, report = _index(root)
    assert 201 in _kept_refs(tables)
    grey = read_image_rgb(root / "images" / "deep_2.tif")
    assert grey.shape == (30, 40, 3) and grey.min() == 0 and grey.max() == 255


# ------------------------------------------------------------ case 5: a bbox that does not bound the mask
def _bbox(ann_id: int, bbox):
    return lambda refs, inst: _by_id(inst["annotations"], ann_id).update(bbox=bbox)


def test_bbox_not_bounding_the_mask_is_skipped_and_counted(tmp_path):
    """Ann 11's mask is the rectangle [8, 8, 32, 24]; ``[0, 0, 5, 5]`` is inside the image but not on it."""
    tables, report = _index(_edited(tmp_path, _bbox(11, [0, 0, 5, 5])))
    assert 101 not in _kept_refs(tables) and len(_kept_refs(tables)) == 4
    assert report["skipped"]["bbox_not_bounding_mask"] == 1
    example = report["examples"]["bbox_not_bounding_mask"][0]
    assert example.startswith("101: bbox [0.0, 0.0, 5.0, 5.0]") and "[8.0, 8.0, 32.0, 24.0]" in example


@pytest.mark.parametrize("bbox, kept", [
    ([8, 8, 32, 24], True),                              # exact
    ([9, 9, 30, 22], True),                              # 1 px short on every side: within the tolerance
    ([8 + BBOX_MASK_TOLERANCE, 8, 32 - BBOX_MASK_TOLERANCE, 24], True),   # at the tolerance
    ([8 + BBOX_MASK_TOLERANCE + 0.5, 8, 30, 24], False),  # past it on the left
    ([8, 8, 32, 24 - BBOX_MASK_TOLERANCE - 0.5], False),  # past it at the bottom
    ([0, 0, 64, 48], True),                              # looser than the mask: COCO boxes may be
], ids=["exact", "one_px_short", "at_tolerance", "past_tolerance_left", "past_tolerance_bottom", "loose"])
def test_bbox_mask_tolerance(tmp_path, bbox, kept):
    tables, report = _index(_edited(tmp_path, _bbox(11, bbox)))
    assert (101 in _kept_refs(tables)) is kept
    assert report["skipped"]["bbox_not_bounding_mask"] == (0 if kept else 1)


def test_synthetic_data_skips_nothing_new(tmp_path):
    """The default's generator: every bbox bounds its mask, every sentence is short, every split known."""
    generate_synthetic_refer(tmp_path, dataset="synthetic", split_by="unc", num_images=24,
                             objects_per_image=(3, 5), image_side=(176, 240), expressions_per_object=(1, 3),
                             object_scale=(0.22, 0.40), distractor_rate=0.5,
                             split_fractions={"train": 0.7, "val": 0.1, "testA": 0.1, "testB": 0.1},
                             jpeg_quality=92, seed=0)
    refs, instances = load_refer(tmp_path, "synthetic", "unc")
    tables, report = build_index(refs, instances, tmp_path / "images", workers=2)
    assert sum(report["skipped"].values()) == 0 and tables["refs"].num_rows == len(refs)


# ----------------------------------------------------------------------------- case 9: pickle bombs
def _shared_lists(levels: int) -> RawPickle:
    """``L0 = ['é']`` (a py2 UTF-8 byte string), ``L[i] = [L[i-1], L[i-1]]``: 9 bytes a level, 2**levels
    leaves once expanded."""
    ops = b"]U\x02\xc3\xa9aq\x00"
    for i in range(1, levels + 1):
        ops += b"0(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i])
    return RawPickle(ops)


def _deep_list(depth: int) -> RawPickle:
    return RawPickle(b"]" * depth + b"a" * (depth - 1))


def _refs_with_extra(root: Path, extra: RawPickle) -> Path:
    """The fixture's refs as a Python-2 pickle (non-ASCII text, so the latin-1 repair runs) with
    ``extra`` as a key of ref 101."""
    refs, _ = _read(root)
    _by_id(refs, 102, "ref_id")["sentences"][0]["raw"] = NON_ASCII_TEXT
    _by_id(refs, 101, "ref_id")["extra"] = extra
    path = root / "refcoco" / "refs(unc).p"
    path.write_bytes(b"\x80\x02" + py2_pickle(refs) + b".")
    return path


_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from pipeline.data.refer import load_refer
    start = time.perf_counter()
    try:
        refs, _ = load_refer(sys.argv[1], "refcoco", "unc")
    except ValueError as err:
        print(json.dumps({"error": str(err), "seconds": time.perf_counter() - start}))
        sys.exit(3)
    extra = next(r for r in refs if r["ref_id"] == 101).get("extra")
    shared = isinstance(extra, list) and len(extra) == 2 and extra[0] is extra[1]
    leaf = extra
    while isinstance(leaf, list) and leaf and isinstance(leaf[0], list):
        leaf = leaf[0]
    text = next(r for r in refs if r["ref_id"] == 102)["sentences"][0]["raw"]
    print(json.dumps({"seconds": time.perf_counter() - start, "shared": shared, "leaf": leaf,
                      "text": text}))
""")
CHILD_MEMORY = 1 << 30  # address space of the child: far below what any bomb here asks for


def _load_in_child(root: Path, timeout: float = 60) -> tuple[int, dict, str]:
    """``load_refer`` in a child limited to :data:`CHILD_MEMORY` of address space: (rc, summary, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(CHILD_MEMORY)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    return result.returncode, (json.loads(lines[-1]) if lines else {}), result.stderr[-2000:]


def _bytearray_bomb(size: int) -> bytes:
    """``bytearray(size)`` through the admitted global: the 38-byte pickle of the issue."""
    return b"\x80\x02c__builtin__\nbytearray\n\x8a" + bytes([9]) + size.to_bytes(9, "little") + b"\x85R."


@pytest.mark.parametrize("size", [2**31, 2**40], ids=["bytearray_2_31", "bytearray_2_40"])
def test_pickle_bytearray_bomb_is_refused_before_allocating(tmp_path, size):
    root = _fixture(tmp_path)
    data = _bytearray_bomb(size)
    assert len(data) <= 40
    (root / "refcoco" / "refs(unc).p").write_bytes(data)
    rc, out, err = _load_in_child(root)
    assert rc == 3, err
    assert "refs(unc).p" in out["error"] and "refused" in out["error"] and "bytearray" in out["error"]
    assert str(size) in out["error"] and out["seconds"] < 5


def test_pickle_bytearray_bomb_inside_a_ref_is_refused(tmp_path):
    root = _fixture(tmp_path)
    _refs_with_extra(root, RawPickle(_bytearray_bomb(2**31)[2:-1]))
    rc, out, err = _load_in_child(root)
    assert rc == 3 and "bytearray" in out["error"], err


def test_pickle_shared_reference_bomb_loads_fast_and_stays_shared(tmp_path):
    """24 levels of ``[L, L]`` (224 bytes of opcodes; 2**24 leaves and 2 GB once expanded) under the
    latin-1 repair path: read in well under a second, shared lists still shared, text still repaired."""
    root = _fixture(tmp_path)
    _refs_with_extra(root, _shared_lists(24))  # within the depth limit, past the child's memory expanded
    rc, out, err = _load_in_child(root)
    assert rc == 0, err or out
    assert out["shared"] and out["leaf"] == ["é"] and out["text"] == NON_ASCII_TEXT
    assert out["seconds"] < 5


def test_pickle_deeper_than_the_limit_is_refused(tmp_path):
    """50 levels of shared lists (458 bytes of opcodes, like the issue's 466-byte pickle): refused by
    depth, before any repair."""
    root = _fixture(tmp_path)
    _refs_with_extra(root, _shared_lists(50))
    rc, out, err = _load_in_child(root)
    assert rc == 3, err
    assert "refs(unc).p" in out["error"] and f"more than {MAX_NESTING_DEPTH} levels" in out["error"]


def test_pickle_nested_200k_deep_is_refused_not_a_recursion_error(tmp_path):
    root = _fixture(tmp_path)
    _refs_with_extra(root, _deep_list(200_000))
    rc, out, err = _load_in_child(root)
    assert rc == 3, err
    assert "refs(unc).p" in out["error"] and "levels deep" in out["error"]


def test_pickle_list_inside_itself_is_refused(tmp_path):
    root = _fixture(tmp_path)
    _refs_with_extra(root, RawPickle(b"]q\x00h\x00a"))  # L = []; L.append(L)
    rc, out, err = _load_in_child(root)
    assert rc == 3, err
    assert "contains itself" in out["error"]


def test_pickle_codecs_encode_chain_is_refused(tmp_path):
    """``_codecs.encode(x, 'hex')`` doubles ``x`` per call: 40 calls would be a terabyte."""
    root = _fixture(tmp_path)
    ops = b"c_codecs\nencode\nq\x000" + b"h\x00" * 41 + b"X\x02\x00\x00\x00abX\x06\x00\x00\x00latin1\x86R"
    ops += b"X\x03\x00\x00\x00hex\x86R" * 40
    _refs_with_extra(root, RawPickle(ops))
    rc, out, err = _load_in_child(root)
    assert rc == 3, err
    assert "_codecs.encode" in out["error"] and "'hex'" in out["error"]


def test_pickle_set_of_one_shared_list_many_times_is_refused(tmp_path):
    """``set(L)`` 2000 times on one 2000-item list: 4 million elements from 22 kB. The admitted builtins
    may build no more than the file's size plus 1 MiB."""
    root = _fixture(tmp_path)
    items = b"".join(b"M" + struct.pack("<H", i) for i in range(2000))
    ops = b"c__builtin__\nset\nq\x000](" + items + b"eq\x010](" + b"h\x00h\x01\x85R" * 2000 + b"e"
    _refs_with_extra(root, RawPickle(ops))
    rc, out, err = _load_in_child(root)
    assert rc == 3, err
    assert "set" in out["error"] and "more than a refs file of its size" in out["error"]


def test_real_python3_pickles_with_bytes_bytearrays_and_sets_still_load(tmp_path):
    root = _fixture(tmp_path)
    refs, _ = _read(root)
    refs[0]["extra"] = {"raw": b"bytes\xff", "buf": bytearray(b"\x00\x01"), "tags": {1, 2},
                        "frozen": frozenset({"a"}), "pair": (1.5, None, True)}
    for protocol in (2, 3, 4, 5):
        (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=protocol))
        loaded, _ = load_refer(root, "refcoco", "unc")
        assert loaded == refs, protocol


# ------------------------------------------------------------ case 10: a sentence that stalls the tokenizer
def test_sentence_of_50000_letters_is_skipped_and_counted_fast(tmp_path):
    root = _edited(tmp_path, lambda refs, inst: _by_id(refs, 201, "ref_id")["sentences"][0].update(
        sent="a" * 50_000))
    start = time.perf_counter()
    tables, report = _index(root)
    assert time.perf_counter() - start < 10
    assert report["skipped"]["sentence_too_long"] == 1
    assert report["examples"]["sentence_too_long"] == [f"201: sentence 7 has 50000 characters "
                                                       f"(limit {MAX_SENTENCE_CHARS})"]
    sent_ids = tables["sentences"].column("sent_id").to_pylist()
    assert 7 not in sent_ids and 8 in sent_ids and 201 in _kept_refs(tables)  # its other sentence stays


def test_sentence_at_the_limit_is_kept_and_a_ref_with_only_long_ones_is_skipped(tmp_path):
    def edit(refs, inst):
        _by_id(refs, 201, "ref_id")["sentences"][0]["sent"] = "b" * MAX_SENTENCE_CHARS
        _by_id(refs, 301, "ref_id")["sentences"][0]["sent"] = "word " * MAX_SENTENCE_CHARS
    tables, report = _index(_edited(tmp_path, edit))
    assert 7 in tables["sentences"].column("sent_id").to_pylist()
    assert 301 not in _kept_refs(tables)
    assert report["skipped"]["sentence_too_long"] == 1
    assert report["skipped"]["ref_without_sentences"] == 2  # the fixture's ref 104 and now ref 301


def test_sentence_cap_is_generous():
    """REFER sentences stay under about 300 characters; the cap leaves them all alone."""
    assert MAX_SENTENCE_CHARS >= 3 * 300


# ------------------------------------------------------ case 13: one line naming file, field and id
def _sentence_text(text):
    return lambda refs, inst: _by_id(refs, 201, "ref_id")["sentences"][0].update(sent=text)


ONE_LINE = {
    # case id: (edit, file named, what the message must say)
    "lone_surrogate_in_sentence": (_sentence_text("the \ud800 box"), "refs(unc).p",
                                   "ref 201: sentence 7 has 'sent'"),
    "ref_id_2_64": (lambda refs, inst: _by_id(refs, 201, "ref_id").update(ref_id=2**64), "refs(unc).p",
                    "has ref_id 18446744073709551616, which does not fit"),
    "sent_id_2_63": (lambda refs, inst: _by_id(refs, 201, "ref_id")["sentences"][0].update(sent_id=2**63),
                     "refs(unc).p", "ref 201: sentence 0 has sent_id 9223372036854775808, which"),
    "ann_id_huge": (lambda refs, inst: _by_id(refs, 201, "ref_id").update(ann_id=2**70000), "refs(unc).p",
                    "ref 201 has ann_id an integer of 70001 bits"),
    "image_entry_id_2_64": (lambda refs, inst: _by_id(inst["images"], 2).update(id=2**64), "instances.json",
                            "images[1] has id 18446744073709551616, which does not fit"),
    "category_id_circle": (lambda refs, inst: _by_id(inst["annotations"], 11).update(category_id="circle"),
                           "instances.json", "annotation 11 has category_id 'circle', expected an integer"),
    "category_id_past_int32": (lambda refs, inst: _by_id(inst["annotations"], 11).update(category_id=2**31),
                               "instances.json", "annotation 11 has category_id 2147483648, which does not"),
    "ref_category_id_circle": (lambda refs, inst: _by_id(refs, 101, "ref_id").update(category_id="circle"),
                               "refs(unc).p", "ref 101 has category_id 'circle'"),
    "category_entry_id_circle": (lambda refs, inst: inst["categories"][0].update(id="circle"),
                                 "instances.json", "categories[0] has id 'circle'"),
    "category_name_lone_surrogate": (lambda refs, inst: inst["categories"][0].update(name="b\ud800x"),
                                     "instances.json", "category 1 has name"),
    "file_name_lone_surrogate": (lambda refs, inst: _by_id(inst["images"], 2).update(file_name="\ud800.jpg"),
                                 "instances.json", "image 2 has file_name"),
    "sent_ids_not_a_list": (lambda refs, inst: _by_id(refs, 201, "ref_id").update(sent_ids=5), "refs(unc).p",
                            "ref 201 has 'sent_ids' of type int"),
}


def _write_hostile(root: Path, refs, instances) -> None:
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    text = json.dumps(instances)  # lone surrogates go out as \\ud800 escapes, as a hostile file has them
    (root / "refcoco" / "instances.json").write_text(text, encoding="utf-8")


@pytest.mark.parametrize("case", list(ONE_LINE))
def test_bad_value_stops_index_in_one_line_naming_file_field_and_id(tmp_path, case):
    edit, file_name, message = ONE_LINE[case]
    root = _fixture(tmp_path)
    refs, instances = _read(root)
    edit(refs, instances)
    _write_hostile(root, refs, instances)
    with pytest.raises(ValueError) as err:
        _index(root)
    text = str(err.value)
    assert file_name in text and message in text and "\n" not in text, text
    assert len(text) < 600


def _nest_instances(root: Path, depth: int) -> None:
    path = root / "refcoco" / "instances.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text[:-1] + ', "info": ' + "[" * depth + "]" * depth + "}", encoding="utf-8")


@pytest.mark.parametrize("depth", [200_000, MAX_NESTING_DEPTH + 5], ids=["nested_200k", "nested_past_limit"])
def test_instances_nested_deep_is_one_line_not_a_recursion_error(tmp_path, depth):
    root = _fixture(tmp_path)
    _nest_instances(root, depth)
    with pytest.raises(ValueError) as err:
        _index(root)
    text = str(err.value)
    assert "instances.json" in text and "nest" in text and "\n" not in text, text


def test_instances_integer_past_the_digit_limit_names_the_file(tmp_path):
    root = _fixture(tmp_path)
    path = root / "refcoco" / "instances.json"
    path.write_text(path.read_text(encoding="utf-8")[:-1] + ', "info": ' + "9" * 5000 + "}", encoding="utf-8")
    with pytest.raises(ValueError, match="instances.json: not valid JSON"):
        _index(root)


@pytest.mark.parametrize("case", ["lone_surrogate_in_sentence", "ref_id_2_64", "sent_id_2_63",
                                  "category_id_circle", "nested_200k"])
def test_index_stage_exits_in_one_line(tmp_path, in_tmp_cwd, case):
    """The stage itself: ``index: <file>: ...`` on one line, no traceback, no index written."""
    root = _fixture(tmp_path / "data")
    if case == "nested_200k":
        _nest_instances(root, 200_000)
        file_name = "instances.json"
    else:
        edit, file_name, _ = ONE_LINE[case]
        refs, instances = _read(root)
        edit(refs, instances)
        _write_hostile(root, refs, instances)
    write_params(in_tmp_cwd, {"data": {"source": "refer", "refer": {
        "root": str(root), "dataset": "refcoco", "split_by": "unc", "image_dir": str(root / "images")}}})
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "stages" / "index.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert message.startswith("index: ") and "\n" not in message and file_name in message, message
    assert not (in_tmp_cwd / "artifacts" / "index").exists()


def test_overflowing_coordinates_are_counted_not_a_crash(tmp_path):
    """A bbox or polygon number too large for a float is that ref's bad ground truth."""
    def edit(refs, inst):
        _by_id(inst["annotations"], 11)["bbox"] = [10**400, 0, 5, 5]
        _by_id(inst["annotations"], 12)["segmentation"] = [[10**400, 0, 5, 5, 9, 9]]
    root = _fixture(tmp_path)
    refs, instances = _read(root)
    edit(refs, instances)
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    tables, report = _index(root)
    assert report["skipped"]["bbox_invalid"] == 1 and report["skipped"]["segmentation_invalid"] == 1
    assert _kept_refs(tables) == [201, 301, 401]


@pytest.mark.parametrize("sent", [{"sent": "a", "raw": "b"}, {"raw": "b"}, {"sent": None, "raw": "b"},
                                  {"sent": "", "raw": "b"}, {}, "text", None])
def test_the_checked_text_is_the_indexed_text(sent):
    """refer.py checks the text index.py stores: one rule, written twice (index.py must not import the
    REFER reader, or every stage reading the index would depend on it)."""
    from pipeline.data.refer import sentence_text

    assert sentence_text(sent) == index_module._sentence_text(sent)
