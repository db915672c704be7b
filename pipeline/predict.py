"""Referring segmentation of one image from one expression with the trained Step-2 network.

``python -m pipeline.predict --image IMG --text "the man on the left" --out mask.png [--overlay o.png]``

The image goes through the same preprocessing as Step-2 training (``read_image_rgb``: RGB;
``stretch_resize`` to the square input size; CLIP normalisation), except that a user's photo is first
turned upright by its EXIF orientation (dataset images are read as stored, their annotations' space);
the probability map is resized back to the upright (height, width), so the written mask lines up with
the photo as a viewer shows it. The Step-2
checkpoint format (``save_segmenter`` / ``load_segmenter``) lives in :mod:`pipeline.models.checkpoints`,
shared with training, so training and inference cannot disagree about it.

Before any work (reading the image, loading the network) the CLI checks what would otherwise fail late
or do harm: the device (``--device cuda`` without a GPU), and the outputs: neither ``--out`` nor
``--overlay`` may be a directory, sit under a path that cannot be a writable folder, or be the same
file as an input (``--image``, ``--checkpoint``, compared after resolving links and ``..``) or as
each other; the user's photo is never replaced by its mask.

Memory: the network only ever sees the ``input_size`` stretch of the image; what grows with the photo is
the full-size probability map and mask (5 bytes a pixel) and the decoded image (3 bytes a pixel), about
200 MB for a 6000x4000 photo. The overlay is tinted in bands of rows, so it adds little beyond its
uint8 output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from pipeline.atomic import atomic_file
from pipeline.data.images import UnreadableImageError, read_image_rgb
from pipeline.data.samples import stretch_resize
from pipeline.maps import clip_normalize, upsample
from pipeline.models.checkpoints import load_segmenter
from pipeline.models.clip_backbone import activation_name, tokenize, uses_quick_gelu
from pipeline.models.segmenter import ReferringSegmenter
from pipeline.runtime import DeviceError, device_note, select_device

DEFAULT_CHECKPOINT = "artifacts/step2/model.pt"
TINT = np.array([255, 40, 40], dtype=np.float32)  # mask colour of the overlay
CONTOUR = np.array([255, 230, 0], dtype=np.uint8)
OVERLAY_BAND_BYTES = 1 << 24  # float32 working set of one band of overlay rows (16 MB)


# ---------------------------------------------------------------------------------------------- inference
def predict_mask(
    image: np.ndarray | str | Path,
    text: str,
    model: ReferringSegmenter,
    *,
    input_size: int,
    max_tokens: int,
    threshold: float = 0.5,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment the object ``text`` refers to: (probability ``(H, W)`` float32, mask ``(H, W)`` bool).

    ``image`` is an RGB uint8 array or a file path; outputs have the original image size. ``device``
    defaults to the model's; giving another moves the model there. The model runs in eval mode and
    its previous train/eval mode is restored afterwards.
    """
    rgb = read_image_rgb(image, exif_transpose=True) if isinstance(image, (str, Path)) else np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if device is None:
        device = next(model.parameters()).device
    else:
        model.to(device)
    H, W = rgb.shape[:2]
    resized = torch.from_numpy(np.array(stretch_resize(rgb, input_size)))  # copy: PIL's view is read-only
    images = clip_normalize(resized.permute(2, 0, 1)[None].float().div(255.0).to(device))
    tokens = tokenize([text], max_tokens).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            prob = torch.sigmoid(model(images, tokens)[:, 0].float())
            prob = upsample(prob, (H, W))[0].clamp_(0, 1)
    finally:
        model.train(was_training)
    prob_np = prob.cpu().numpy()  # float32 already: no second full-size copy
    return prob_np, prob_np > threshold


def overlay_mask(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the mask tinted and its outline drawn, ``(H, W, 3)`` uint8, for a quick look.

    Tinted in bands of rows, so a large photo needs a few MB of float32 scratch, not 12 bytes a pixel.
    """
    out = np.empty_like(rgb, dtype=np.uint8)
    band = max(1, OVERLAY_BAND_BYTES // max(1, rgb.shape[1] * 3 * 4))
    for r0 in range(0, rgb.shape[0], band):
        rows = slice(r0, r0 + band)
        block, inside = rgb[rows].astype(np.float32), mask[rows]
        block[inside] = (1 - alpha) * block[inside] + alpha * TINT
        out[rows] = block.round().astype(np.uint8)
    width = max(1, min(mask.shape) // 200)
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    out[edge] = CONTOUR
    return out


def _write_png(path: str | Path, array: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tris-predict",
        description="Segment the object a referring expression names, with the trained Step-2 network.",
    )
    p.add_argument("--image", required=True, help="input image (any format PIL reads)")
    p.add_argument("--text", required=True, help="referring expression, e.g. 'the man on the left'")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"Step-2 checkpoint (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--out", required=True, help="binary mask PNG to write (0/255, original image size)")
    p.add_argument("--overlay", help="optional PNG of the image with the mask tinted and outlined")
    p.add_argument("--threshold", type=float, default=0.5, help="probability above which a pixel is target")
    p.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N")
    return p


def _output_problem(flag: str, value: str, inputs: dict[str, Path]) -> str | None:
    """Why ``value`` cannot be written as ``flag``'s output, or ``None``: checked before any work so that
    a bad path fails in a second, not after inference, and an input is never overwritten."""
    path = Path(value)
    if path.is_dir():
        return f"argument {flag}: {path} is a directory; give a .png file name"
    for in_flag, in_path in inputs.items():
        same = path.resolve() == in_path.resolve()
        if not same and path.exists() and in_path.exists():
            same = os.path.samefile(path, in_path)  # hard links
        if same:
            return f"argument {flag}: {path} is the {in_flag} file; refusing to overwrite an input"
    folder = path.parent.resolve()
    while not folder.exists():  # the first existing ancestor is where the folders would be created
        folder = folder.parent
    if not folder.is_dir():
        return f"argument {flag}: cannot create {path}: {folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"argument {flag}: cannot write to {folder} (permission denied)"
    return None


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    """argparse's error format (usage line + 'prog: error: ...'), but returned instead of raised."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 on success and 2 with a one-line message on bad input (no traceback)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its message
        return int(exc.code or 0)
    if not args.text.strip():
        return _fail(parser, "argument --text: the referring expression is empty")
    if not 0.0 <= args.threshold <= 1.0:
        return _fail(parser, f"argument --threshold: {args.threshold} is not in [0, 1]")
    image_path, ckpt_path = Path(args.image), Path(args.checkpoint)
    if not image_path.is_file():
        return _fail(parser, f"argument --image: file not found: {image_path}")
    if not ckpt_path.is_file():
        return _fail(parser, f"argument --checkpoint: file not found: {ckpt_path} "
                             "(train Step-2 first: dvc repro)")
    inputs = {"--image": image_path, "--checkpoint": ckpt_path}
    outputs = [("--out", args.out)] + ([("--overlay", args.overlay)] if args.overlay else [])
    for flag, value in outputs:
        problem = _output_problem(flag, value, inputs)
        if problem:
            return _fail(parser, problem)
    if args.overlay and Path(args.overlay).resolve() == Path(args.out).resolve():
        return _fail(parser, f"argument --overlay: {args.overlay} is also the --out file")
    try:
        device = select_device(args.device, setting="--device")
    except DeviceError as exc:
        return _fail(parser, f"argument {exc}")
    try:
        rgb = read_image_rgb(image_path, exif_transpose=True)
    except UnreadableImageError as exc:  # its message names the file and the decoder's complaint
        return _fail(parser, f"argument --image: {exc}")
    try:
        model, meta = load_segmenter(ckpt_path)
    except Exception as exc:  # torn file, foreign pickle, architecture mismatch: all mean "bad checkpoint"
        return _fail(parser, f"argument --checkpoint: cannot load {ckpt_path} ({type(exc).__name__}: {exc})")
    prob, mask = predict_mask(rgb, args.text, model, input_size=meta["input_size"],
                              max_tokens=meta["max_tokens"], threshold=args.threshold, device=device)
    _write_png(args.out, mask.astype(np.uint8) * 255)
    if args.overlay:
        _write_png(args.overlay, overlay_mask(rgb, mask))
    # the CLIP as rebuilt here, activation included (load_segmenter refused any other than training's)
    print(f"{args.out}: {int(mask.sum())} of {mask.size} pixels ({mask.mean():.1%}), "
          f"max probability {prob.max():.3f}; Step-2 CLIP {meta['clip_name']} with "
          f"{activation_name(uses_quick_gelu(model.backbone.clip))} on {device}"
          f"{device_note(args.device, device, '--device')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
