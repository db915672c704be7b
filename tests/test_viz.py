"""Drawing helpers, the HTML gallery, and the ``python -m pipeline.eval.inspect`` command on a tiny index."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.index import write_index
from pipeline.data.tables import table_from_rows
from pipeline.eval import inspect as inspect_cli
from pipeline.eval.viz import (
    caption,
    draw_contour,
    draw_point,
    hstack,
    jet,
    overlay,
    render_case,
    select_sections,
    write_gallery,
)
from pipeline.store import RESPONSE_SCHEMA, RecordWriter


def _image(h=20, w=30, value=100):
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_jet_endpoints():
    np.testing.assert_array_equal(
        jet(np.array([0.0, 0.5, 1.0, 2.0])), [[0, 0, 128], [128, 255, 128], [128, 0, 0], [128, 0, 0]]
    )


def test_overlay_blends_and_checks_shape():
    img = _image()
    m = np.zeros((20, 30))
    m[:, 15:] = 1.0
    assert np.array_equal(overlay(img, m, alpha=0.0), img)
    full = overlay(img, m, alpha=1.0)
    assert tuple(full[0, 0]) == (0, 0, 128) and tuple(full[0, 29]) == (128, 0, 0)
    half = overlay(img, m, alpha=0.5)
    assert half.dtype == np.uint8 and tuple(half[0, 0]) == (50, 50, 114)
    with pytest.raises(ValueError, match="map shape"):
        overlay(img, m.T)


def test_draw_contour_paints_only_the_boundary():
    img = _image(10, 12)
    mask = np.zeros((10, 12), bool)
    mask[2:7, 3:9] = True
    out = draw_contour(img, mask, (0, 255, 0))
    green = np.all(out == (0, 255, 0), axis=-1)
    ring = mask.copy()
    ring[3:6, 4:8] = False  # inner boundary of a rectangle = its outer ring of pixels
    assert np.array_equal(green, ring)
    assert np.array_equal(img, _image(10, 12))  # input untouched


def test_draw_point_at_y_x_on_non_square_image():
    out = draw_point(_image(9, 21), (2, 17), (255, 0, 255), radius=1)
    assert tuple(out[2, 17]) == (255, 0, 255)
    assert tuple(out[2, 16]) == (255, 0, 255) and tuple(out[1, 17]) == (255, 0, 255)
    assert tuple(out[17 % 9, 2]) == (100, 100, 100)  # nothing drawn at the swapped position
    corner = draw_point(_image(9, 21), (0, 0), radius=2)  # clipped at the border, no error
    assert tuple(corner[0, 0]) != (100, 100, 100)


def test_caption_adds_a_text_band_above():
    img = _image(20, 200, value=7)
    out = caption(img, "a red car on the left")
    assert out.shape[1] == 200 and out.shape[0] > 20
    band = out[: out.shape[0] - 20]
    assert (band < 128).any() and (band == 255).any()  # dark text on white
    assert np.array_equal(out[-20:], img)
    longer = caption(img, "a very long referring expression " * 6)
    assert longer.shape[0] > out.shape[0]  # wrapped onto more lines


def test_hstack_pads_and_top_aligns():
    out = hstack([_image(10, 5, 1), _image(6, 7, 2)], pad=3)
    assert out.shape == (10, 15, 3)
    assert (out[:, 5:8] == 255).all()  # padding
    assert (out[:6, 8:] == 2).all() and (out[6:, 8:] == 255).all()


def test_render_case_layout_and_extra_panels():
    img = _image(16, 24)
    m = np.linspace(0, 1, 16 * 24).reshape(16, 24)
    gt = np.zeros((16, 24), bool)
    gt[4:10, 5:15] = True
    small_map = np.ones((4, 6))  # resized to the image
    out = render_case(img, m, gt, "the cat", (15, 23), extra_panels=[("pseudo", gt), ("small", small_map)])
    assert out.dtype == np.uint8 and out.shape[1] == 4 * 24 + 3 * 4
    assert out.shape[0] > 16


def test_select_sections():
    scores = [0.1, 0.9, 0.5, 0.3, 0.7]
    assert select_sections(scores, 2) == {"best": [1, 4], "median": [2, 3], "worst": [0, 3]}
    assert select_sections([0.2], 3) == {"best": [0], "median": [0], "worst": [0]}


def test_write_gallery(tmp_path):
    cases = [
        {"title": f"case <{i}>", "image": _image(8, 8, value=i * 20), "score": s, "point_m": s > 0.5}
        for i, s in enumerate([0.1, 0.95, 0.5, 0.3, 0.8, 0.6, 0.2])
    ]
    buf = Image.fromarray(_image(5, 5))
    png = io.BytesIO()
    buf.save(png, format="PNG")
    cases.append({"title": "png bytes", "image": png.getvalue(), "score": 0.0})
    out = tmp_path / "gallery"
    (out).mkdir()
    (out / "stale.png").write_bytes(b"x")
    index = write_gallery(out, cases, "Step-1 <val>", per_section=2)
    assert index == out / "index.html"
    text = index.read_text()
    assert "Step-1 &lt;val&gt;" in text and "case &lt;1&gt;" in text
    assert text.index('id="best"') < text.index('id="median"') < text.index('id="worst"')
    best = text[text.index('id="best"') : text.index('id="median"')]
    assert re.findall(r"case_(\d+)\.png", best) == ["001", "004"]
    worst = text[text.index('id="worst"') :]
    assert re.findall(r"case_(\d+)\.png", worst) == ["007", "000"]
    assert "IoU 0.950 · PointM hit" in text
    assert not (out / "stale.png").exists()
    for name in set(re.findall(r"case_\d+\.png", text)):
        assert (out / name).exists()
    assert np.asarray(Image.open(out / "case_007.png")).shape == (5, 5, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["gallery"]


# ------------------------------------------------------------------------------------------------
# pipeline.eval.inspect on a tiny index + store
# ------------------------------------------------------------------------------------------------


def _rle(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


@pytest.fixture
def tiny_dataset(tmp_path):
    """Two images (non-square), three sentences; sentence 11's response peaks inside its object."""
    sizes = {1: (30, 40), 2: (24, 18)}  # image_id: (H, W)
    images = []
    for image_id, (h, w) in sizes.items():
        path = tmp_path / "images" / f"{image_id}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(_image(h, w, value=60 * image_id)).save(path)
        images.append(
            {
                "image_id": image_id,
                "file_name": path.name,
                "path": f"images/{path.name}",
                "width": w,
                "height": h,
            }
        )
    m1 = np.zeros((30, 40), bool)
    m1[0:15, 20:40] = True  # top-right quarter
    m2 = np.zeros((24, 18), bool)
    m2[12:, :9] = True
    refs = [
        {
            "ref_id": 5,
            "ann_id": 50,
            "image_id": 1,
            "split": "val",
            "category_id": 1,
            "category": "cat",
            "bbox": [20.0, 0.0, 20.0, 15.0],
            "mask_counts": _rle(m1),
            "mask_height": 30,
            "mask_width": 40,
            "area": 300.0,
        },
        {
            "ref_id": 6,
            "ann_id": 60,
            "image_id": 2,
            "split": "val",
            "category_id": 2,
            "category": "dog",
            "bbox": [0.0, 12.0, 9.0, 12.0],
            "mask_counts": _rle(m2),
            "mask_height": 24,
            "mask_width": 18,
            "area": 108.0,
        },
    ]
    sentences = [
        {"sent_id": 11, "ref_id": 5, "image_id": 1, "split": "val", "text": "cat top right"},
        {"sent_id": 12, "ref_id": 5, "image_id": 1, "split": "val", "text": "the cat"},
        {"sent_id": 13, "ref_id": 6, "image_id": 2, "split": "val", "text": "dog bottom left"},
    ]
    index = tmp_path / "index"
    tables = {"images": images, "refs": refs, "sentences": sentences}
    write_index(index, {name: table_from_rows(name, rows) for name, rows in tables.items()}, {})
    responses = np.zeros((3, 4, 4), np.float32)
    responses[0, 0, 3] = 5.0  # top-right cell -> inside m1
    responses[1, 3, 0] = 5.0  # bottom-left cell -> outside m1
    responses[2, 3, 0] = 5.0  # bottom-left cell -> inside m2
    store = tmp_path / "responses.zarr"
    with RecordWriter(store, RESPONSE_SCHEMA, (4, 4), shard_size=8, attrs={"input_size": [64, 64]}) as w:
        w.add_split("val", 3)
        w.write("val", 0, responses, sent_id=[11, 12, 13], ref_id=[5, 5, 6], image_id=[1, 1, 2],
                height=[30, 30, 24], width=[40, 40, 18])
    return tmp_path, store, index


def test_render_sentence_scores(tiny_dataset, monkeypatch):
    root, store_path, index_path = tiny_dataset
    store, index = inspect_cli.open_responses(store_path), inspect_cli.load_index(index_path)
    _, hit = inspect_cli.render_sentence(store, index, "val", 11, image_root=root)
    _, miss = inspect_cli.render_sentence(store, index, "val", 12, image_root=root)
    _, dog = inspect_cli.render_sentence(store, index, "val", 13, image_root=root)
    assert hit.point_m and hit.point_it and not miss.point_m and dog.point_m
    map01 = inspect_cli.response_to_prob(store.get("val", 11), 30, 40)
    assert map01.shape == (30, 40) and map01.min() == 0.0 and map01.max() == pytest.approx(1.0, abs=1e-5)
    assert inspect_cli.point_from_map(map01)[0] < 15 and inspect_cli.point_from_map(map01)[1] >= 20


def test_inspect_main_writes_pngs(tiny_dataset, capsys):
    root, store_path, index_path = tiny_dataset
    out = root / "out"
    common = [
        "--responses",
        str(store_path),
        "--index",
        str(index_path),
        "--split",
        "val",
        "--image-root",
        str(root),
    ]
    assert inspect_cli.main([*common, "--sent-ids", "11", "13", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["val_11.png", "val_13.png"]
    panel = np.asarray(Image.open(out / "val_13.png"))
    assert panel.shape[1] == 2 * 18 + 4 and panel.shape[0] > 24
    assert "IoU" in capsys.readouterr().out
    out2 = root / "out2"
    assert inspect_cli.main([*common, "--sample", "2", "--seed", "1", "--out", str(out2)]) == 0
    assert len(list(out2.glob("val_*.png"))) == 2


def test_inspect_errors_name_the_culprit(tiny_dataset):
    root, store_path, index_path = tiny_dataset
    common = [
        "--index",
        str(index_path),
        "--split",
        "val",
        "--image-root",
        str(root),
        "--out",
        str(root / "o"),
    ]
    with pytest.raises(KeyError, match="sent_id 999"):
        inspect_cli.main(["--responses", str(store_path), "--sent-ids", "999", *common])
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        inspect_cli.main(["--responses", str(root / "missing.zarr"), *common])
    with pytest.raises(FileNotFoundError, match="sentences.parquet"):
        (index_path / "sentences.parquet").unlink()
        inspect_cli.main(["--responses", str(store_path), *common])
