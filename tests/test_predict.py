"""Step-2 checkpoint format, single-image inference and the ``tris-predict`` CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipeline import TINY_CLIP
from torch import nn

from pipeline.maps import clip_normalize
from pipeline.models.checkpoints import load_segmenter, save_segmenter
from pipeline.models.clip_backbone import ClipBackbone, build_clip, tokenize
from pipeline.models.segmenter import ReferringSegmenter
from pipeline.predict import main, overlay_mask, predict_mask

META = {
    "clip_name": "tiny-rn",
    "clip_tiny": TINY_CLIP,
    "max_tokens": 12,
    "input_size": 64,
    "fusion_dim": 16,
    "decoder_dim": 8,
    "context_length": 20,
}


def _model() -> ReferringSegmenter:
    torch.manual_seed(0)
    clip = build_clip(META["clip_name"], None, tiny=META["clip_tiny"], context_length=META["context_length"])
    return ReferringSegmenter(ClipBackbone(clip), META["fusion_dim"], META["decoder_dim"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, ReferringSegmenter]:
    model = _model()
    # Non-trivial BatchNorm statistics, so the round trip also checks buffers, not only parameters.
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 64, 64), tokenize(["a", "b"], META["max_tokens"]))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_segmenter(path, model, META)
    return path, model.eval()


def _write_jpeg(path: Path, height: int, width: int, orientation: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    exif = img.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(path, format="JPEG", exif=exif.tobytes())
    return path


def test_checkpoint_round_trip_restores_the_same_network(checkpoint):
    path, original = checkpoint
    loaded, meta = load_segmenter(path)
    assert meta == {**META, "quick_gelu": False}
    assert not loaded.training
    images, tokens = torch.randn(1, 3, 64, 64), tokenize(["the red cube"], META["max_tokens"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, tokens), original(images, tokens), rtol=0, atol=0)


def test_save_refuses_incomplete_meta(tmp_path):
    meta = {k: v for k, v in META.items() if k != "input_size"}
    with pytest.raises(ValueError, match="input_size"):
        save_segmenter(tmp_path / "m.pt", _model(), meta)
    assert not (tmp_path / "m.pt").exists()


class _LeftHalfModel(nn.Module):
    """Stub network: target = left half of its (square) input; records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images.clone())
        logits = torch.full_like(images[:, :1], -10.0)
        logits[..., : images.shape[-1] // 2] = 10.0
        return logits


def test_predict_mask_maps_back_to_the_original_size():
    stub = _LeftHalfModel().train()
    white = np.full((30, 100, 3), 255, dtype=np.uint8)
    prob, mask = predict_mask(white, "anything", stub, input_size=32, max_tokens=8)
    assert prob.shape == mask.shape == (30, 100) and prob.dtype == np.float32 and mask.dtype == bool
    # Stretch-resized to 32x32, target columns 0..15 map back to columns 0..49 of the 100-wide image.
    assert mask[:, :50].all() and not mask[:, 50:].any()
    assert prob[0, 0] == pytest.approx(1 / (1 + np.exp(-10.0)), rel=1e-5)
    assert stub.inputs[0].shape == (1, 3, 32, 32)
    torch.testing.assert_close(stub.inputs[0], clip_normalize(torch.ones(1, 3, 32, 32)))
    assert stub.training  # the caller's train/eval mode is restored


def test_predict_mask_accepts_a_path_and_applies_exif(tmp_path, checkpoint):
    _, model = checkpoint
    path = _write_jpeg(tmp_path / "rot.jpg", height=20, width=40, orientation=6)  # rotate 90: upright 40x20
    prob, mask = predict_mask(path, "the red cube", model, input_size=64, max_tokens=META["max_tokens"])
    assert prob.shape == (40, 20)
    assert ((prob >= 0) & (prob <= 1)).all()
    np.testing.assert_array_equal(mask, prob > 0.5)


def test_overlay_tints_the_mask_and_draws_its_outline():
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:8, 2:8] = True
    out = overlay_mask(rgb, mask)
    assert (out[~mask] == 0).all()  # outside untouched
    assert tuple(out[2, 2]) == (255, 230, 0)  # outline
    assert tuple(out[4, 4]) == (115, 18, 18)  # inside: 0.45 * (255, 40, 40)


def test_cli_writes_mask_and_overlay_at_original_size(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    image = _write_jpeg(tmp_path / "in.jpg", height=45, width=61)
    out, overlay = tmp_path / "out" / "mask.png", tmp_path / "overlay.png"
    rc = main(["--image", str(image), "--text", "the red cube on the left", "--checkpoint", str(ckpt),
               "--out", str(out), "--overlay", str(overlay), "--threshold", "0.5", "--device", "cpu"])
    assert rc == 0
    mask = Image.open(out)
    assert mask.size == (61, 45) and mask.mode == "L"
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    over = Image.open(overlay)
    assert over.size == (61, 45) and over.mode == "RGB"
    assert str(out) in capsys.readouterr().out


def test_cli_threshold_zero_marks_every_pixel(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    image = _write_jpeg(tmp_path / "in.jpg", height=21, width=17)
    out = tmp_path / "mask.png"
    assert main(["--image", str(image), "--text", "x", "--checkpoint", str(ckpt), "--out", str(out),
                 "--threshold", "0"]) == 0
    assert (np.asarray(Image.open(out)) == 255).all()  # a sigmoid is always above 0


def _bad_inputs(tmp_path: Path, ckpt: Path) -> dict[str, tuple[list[str], list[str]]]:
    good = _write_jpeg(tmp_path / "good.jpg", 24, 24)
    (tmp_path / "notimage.jpg").write_text("hello, I am text")
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    base = {"--image": str(good), "--text": "the cube", "--checkpoint": str(ckpt)}

    def argv(**over: str) -> list[str]:
        args = {**base, **{f"--{k}": v for k, v in over.items()}, "--out": str(tmp_path / "mask.png")}
        return [s for kv in args.items() for s in kv]

    return {
        "missing image": (argv(image=str(tmp_path / "nope.jpg")), ["--image", "nope.jpg", "not found"]),
        "not an image": (argv(image=str(tmp_path / "notimage.jpg")), ["--image", "notimage.jpg"]),
        "truncated image": (argv(image=str(tmp_path / "truncated.jpg")), ["--image", "truncated.jpg"]),
        "empty text": (argv(text="   "), ["--text", "empty"]),
        "missing checkpoint": (argv(checkpoint=str(tmp_path / "none.pt")), ["--checkpoint", "none.pt"]),
        "corrupt checkpoint": (argv(checkpoint=str(tmp_path / "garbage.pt")), ["--checkpoint", "garbage.pt"]),
        "bad threshold": (argv(threshold="1.5"), ["--threshold"]),
    }


@pytest.mark.parametrize("case", ["missing image", "not an image", "truncated image", "empty text",
                                  "missing checkpoint", "corrupt checkpoint", "bad threshold"])
def test_cli_errors_name_the_culprit_without_traceback(tmp_path, checkpoint, capsys, case):
    argv, expected = _bad_inputs(tmp_path, checkpoint[0])[case]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "tris-predict: error:" in err and "Traceback" not in err
    for fragment in expected:
        assert fragment in err
    assert not (tmp_path / "mask.png").exists()


def test_cli_missing_required_argument_returns_nonzero(capsys):
    assert main(["--image", "x.jpg", "--text", "a"]) == 2
    assert "--out" in capsys.readouterr().err


def _output_cases(tmp_path: Path, ckpt: Path) -> dict[str, tuple[dict[str, str], list[str]]]:
    image = _write_jpeg(tmp_path / "photo.jpg", 24, 24)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "hard.jpg").hardlink_to(image)
    return {
        "out equals image": ({"out": str(image)}, ["--out", "photo.jpg", "--image", "overwrite an input"]),
        "out is image by another path": ({"out": str(tmp_path / "sub" / ".." / "photo.jpg")},
                                         ["--out", "overwrite an input"]),
        "out is a hard link to image": ({"out": str(tmp_path / "hard.jpg")}, ["--out", "overwrite an input"]),
        "overlay equals image": ({"out": str(tmp_path / "m.png"), "overlay": str(image)},
                                 ["--overlay", "overwrite an input"]),
        "out equals checkpoint": ({"out": str(ckpt)}, ["--out", "--checkpoint", "overwrite an input"]),
        "out is a directory": ({"out": str(tmp_path / "adir")}, ["--out", "adir", "is a directory"]),
        "out under a file": ({"out": str(tmp_path / "afile" / "m.png")}, ["--out", "not a directory"]),
        "overlay equals out": ({"out": str(tmp_path / "m.png"), "overlay": str(tmp_path / "m.png")},
                               ["--overlay", "also the --out"]),
        "device cuda without a GPU": ({"out": str(tmp_path / "m.png"), "device": "cuda"},
                                      ["--device='cuda'", "no CUDA device"]),
        "device typo": ({"out": str(tmp_path / "m.png"), "device": "cdua"}, ["--device='cdua'"]),
    }


OUTPUT_CASES = ["out equals image", "out is image by another path", "out is a hard link to image",
                "overlay equals image", "out equals checkpoint", "out is a directory", "out under a file",
                "overlay equals out", "device cuda without a GPU", "device typo"]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_cli_checks_outputs_and_device_before_any_work(tmp_path, checkpoint, capsys, monkeypatch, case):
    if case == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(checkpoint[0].read_bytes())
    over, expected = _output_cases(tmp_path, ckpt)[case]
    image = tmp_path / "photo.jpg"
    before = {p: p.read_bytes() for p in (image, ckpt)}

    def no_work(*args, **kwargs):
        raise AssertionError("the network was loaded before the arguments were checked")

    monkeypatch.setattr("pipeline.predict.load_segmenter", no_work)
    argv = ["--image", str(image), "--text", "the cube", "--checkpoint", str(ckpt)]
    argv += [s for k, v in over.items() for s in (f"--{k}", v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tris-predict: error:" in err and "Traceback" not in err
    for fragment in expected:
        assert fragment in err
    assert {p: p.read_bytes() for p in before} == before  # inputs untouched
    assert not (tmp_path / "m.png").exists()


def test_overlay_in_bands_equals_the_whole_image_computation(monkeypatch):
    """The banded overlay (bounded memory for large photos) gives the bytes of the one-shot formula."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    mask = rng.random((37, 23)) > 0.5
    monkeypatch.setattr("pipeline.predict.OVERLAY_BAND_BYTES", 23 * 3 * 4 * 5)  # 5-row bands
    banded = overlay_mask(rgb, mask)
    whole = rgb.astype(np.float32)
    whole[mask] = 0.55 * whole[mask] + 0.45 * np.array([255, 40, 40], dtype=np.float32)
    whole = whole.round().astype(np.uint8)
    edge = mask & ~__import__("scipy.ndimage", fromlist=["x"]).binary_erosion(mask, iterations=1,
                                                                               border_value=0)
    whole[edge] = [255, 230, 0]
    assert np.array_equal(banded, whole)
