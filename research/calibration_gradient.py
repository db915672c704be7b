"""How often is the calibration's positive term (Eq. 8) dead?

    python -m research.calibration_gradient [--images 480]

With ``step1.calibration_score: cosine`` the similarity ``S`` of Eq. 9 is the cosine of the frozen
CLIP's embedding of the masked image ``I * up(R^p)`` and of the positive expression, clamped into
``[1e-6, 1 - 1e-6]`` before ``-log S``. Wherever the cosine is at or below the clamp, ``L_pos`` gives no
gradient at all. This script measures, on train images with one of their expressions each, for the
localiser at initialisation (what the first steps see) and after training (``artifacts/step1``):

- the share of positives at or below the clamp (no L_pos gradient);
- the mean cosine of the positive and of the K calibration negatives (other objects of the image);
- how often the positive scores above every negative (what Eq. 8 asks for).

Reads no mask or box; it runs the training's own forward pass on images and text only.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pipeline import paths
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.losses import S_EPS, calibration_similarity
from pipeline.maps import clip_normalize, mask_images
from pipeline.models.checkpoints import build_localiser, load_localiser
from pipeline.models.clip_artifact import load_frozen_clip, resolve_calibration_size
from pipeline.models.clip_backbone import encode_texts, tokenize
from pipeline.params import load_params
from pipeline.train.step1 import CalibrationNegatives, localiser_meta


@torch.no_grad()
def calibration_statistics(model: torch.nn.Module, frozen: torch.nn.Module, bank: ImageBank,
                           rows: np.ndarray, sentences, text_emb: torch.Tensor, negatives: np.ndarray,
                           size: int, max_tokens: int, mode: str, batch: int = 48) -> dict:
    """The three figures of the module docstring for ``rows`` of ``sentences`` (one per image)."""
    model.eval()
    pos_all, neg_all = [], []
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        images01 = bank.batch(sentences["image_id"].to_numpy()[part])
        tokens = tokenize(sentences["text"].iloc[part].tolist(), max_tokens)
        responses = model(clip_normalize(images01), tokens)  # (b, b, h, w): every image x every query
        positive = responses[torch.arange(len(part)), torch.arange(len(part))].float()
        masked = frozen.encode_image(mask_images(images01, positive, size)).float()
        pos_all.append(calibration_similarity(masked, text_emb[part], mode))
        neg_emb = text_emb[negatives[start:start + batch]]
        neg_all.append(calibration_similarity(masked.unsqueeze(1), neg_emb, mode))
    pos, neg = torch.cat(pos_all), torch.cat(neg_all)
    return {"dead_positive_share": float((pos <= S_EPS).float().mean()), "positive_mean": float(pos.mean()),
            "negative_mean": float(neg.mean()),
            "positive_above_all_negatives": float((pos[:, None] > neg).all(dim=1).float().mean()),
            "n": len(pos)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=480)
    args = parser.parse_args()
    params = load_params()
    p = params.step1
    torch.manual_seed(params.base.seed)
    index = load_index(paths.INDEX)
    train = split_sentences(index.images, index.sentences, "train")
    rng = np.random.default_rng(params.base.seed)
    first = train.groupby("image_id").sample(1, random_state=params.base.seed).index.to_numpy()
    rows = np.sort(rng.permutation(first)[:args.images])  # one expression per image
    frozen = load_frozen_clip(paths.CLIP)
    size = resolve_calibration_size(p.calibration_size, frozen)
    text_emb = encode_texts(frozen, train["text"].tolist(), params.model.max_tokens, torch.device("cpu"))
    negatives = CalibrationNegatives(train).sample(rows, p.calibration_negatives, rng)
    bank = ImageBank.from_index(index.images, p.input_size, workers=params.base.num_workers)
    initial = build_localiser(paths.CLIP, localiser_meta(params, str(paths.CLIP)))
    if p.init_projectors == "clip":
        initial.init_projectors_from_clip()
    trained, _ = load_localiser(paths.STEP1 / "model.pt")
    print(f"calibration_score: {p.calibration_score}; {len(rows)} train images, "
          f"K = {p.calibration_negatives}")
    print("| localiser | positives with no L_pos gradient | mean S positive | mean S negatives | "
          "positive above all K |\n|---|---|---|---|---|")
    for name, model in (("at initialisation", initial), ("trained (artifacts/step1)", trained)):
        r = calibration_statistics(model, frozen, bank, rows, train, text_emb, negatives, size,
                                   params.model.max_tokens, p.calibration_score)
        print(f"| {name} | {r['dead_positive_share']:.3f} | {r['positive_mean']:.3f} | "
              f"{r['negative_mean']:.3f} | {r['positive_above_all_negatives']:.3f} |")


if __name__ == "__main__":
    main()
