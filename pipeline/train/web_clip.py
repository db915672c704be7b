"""Build the embedded "web CLIP": a small open_clip CLIP pretrained once on the web-like corpus of
:mod:`pipeline.data.web_corpus`, shipped as fp16 weights that ``pretrain_clip`` loads as a real user
loads downloaded CLIP weights.

    python scripts/build_web_clip.py [--recipe weights/web-clip/recipe.yaml] [--out DIR] [--seed N]

The recipe (corpus size, resolution, width, steps) lives beside the weights; the folder gets
``clip.pt`` (fp16 state dict), ``clip.json`` (the spec :func:`pipeline.models.clip_artifact.load_clip`
reads) and ``manifest.json`` (seed, corpus sizes, steps, time, device, diagnostics). Seeded: the same
recipe and seed on the same machine give the same weights.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import Field
from torch import nn

from pipeline.atomic import atomic_dir, save_torch, write_json
from pipeline.data.web_corpus import WebPicture, caption_text, mean_objects, positives, web_corpus
from pipeline.maps import clip_normalize
from pipeline.models.clip_backbone import TINY_RN, build_clip, tokenize
from pipeline.params import Bool, Float, Int, LearningRate, WeightDecay, _Strict
from pipeline.runtime import channels_last, seed_everything, to_channels_last
from pipeline.train.common import warmup_cosine_scheduler
from pipeline.train.loop import Epoch, StepOut, Training, TrainingRun, fit

DEFAULT_DIR = Path("weights/web-clip")
RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "manifest.json"


class WebClipRecipe(_Strict):
    """How the web CLIP is built (``recipe.yaml`` beside the weights)."""

    seed: Int = Field(ge=0, le=2**31 - 1)
    groups: Int = Field(ge=1, le=1_000_000, description="scene groups of the corpus (about 6 pictures each)")
    tiny: dict = Field(description="tiny CLIP architecture (pipeline.models.clip_backbone.tiny_clip_config)")
    max_tokens: Int = Field(ge=4, le=77)
    epochs: Int = Field(ge=1, le=1000)
    batch_size: Int = Field(ge=2, le=1024, description="pictures per batch (whole groups)")
    lr: LearningRate
    weight_decay: WeightDecay
    warmup_steps: Int = Field(ge=0, le=1_000_000)
    noise: Float = Field(ge=0, le=0.5, description="share of pictures given another picture's caption")
    two_object_rate: Float = Field(ge=0, le=1)
    isolated: tuple[Int, Int]
    objects_per_image: tuple[Int, Int]
    image_side: tuple[Int, Int]
    object_scale: tuple[Float, Float]
    distractor_rate: Float = Field(ge=0, le=1)
    placement_rate: Float = Field(default=0.5, ge=0, le=1,
                                  description="share of one-object captions that name a clear placement")
    shared_colour: Bool = Field(default=False, description="a group's isolated objects share one colour")
    fp16: Bool = True


def read_recipe(path: Path) -> WebClipRecipe:
    """The recipe at ``path``, validated (an unknown or out-of-range key names itself and the file)."""
    try:
        return WebClipRecipe.model_validate(yaml.safe_load(Path(path).read_text()))
    except Exception as err:
        raise ValueError(f"{path}: invalid web CLIP recipe: {err}") from err


def truth_table_clip_loss(image_f: torch.Tensor, text_f: torch.Tensor, positive: torch.Tensor,
                          logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with a truth table: ``positive[i, j]`` says text ``j`` is true of picture ``i``.

    Each direction's target is uniform over the row's positives, so a caption true of several pictures of
    the batch pulls all of them and pushes none (CLIP's one-positive loss would push away every picture
    but its own). With one text per picture and a diagonal table this is CLIP's loss.
    """
    logits = logit_scale * image_f @ text_f.T  # (pictures, texts)
    pos = positive.float()
    i2t = -(pos / pos.sum(1, keepdim=True).clamp_min(1) * F.log_softmax(logits, dim=1)).sum(1)
    t2i = -(pos.T / pos.T.sum(1, keepdim=True).clamp_min(1) * F.log_softmax(logits.T, dim=1)).sum(1)
    return (i2t[pos.any(1)].mean() + t2i[pos.any(0)].mean()) / 2


class WebCorpusBatches:
    """The corpus flattened for training: pictures as one uint8 tensor, each picture's caption texts
    and meanings, the group of each picture, and the noisy (picture, caption) pairs."""

    def __init__(self, groups: list[list[WebPicture]], noise: float, max_tokens: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 1])
        self.pictures = [p for g in groups for p in g]
        self.images = torch.from_numpy(np.stack([p.pixels for p in self.pictures])).permute(0, 3, 1, 2)
        self.group_rows: list[np.ndarray] = []
        start = 0
        for g in groups:
            self.group_rows.append(np.arange(start, start + len(g)))
            start += len(g)
        self.texts: list[list[str]] = [[caption_text(c, rng) for c in p.captions] for p in self.pictures]
        self.meanings = [list(p.captions) for p in self.pictures]
        self.noisy = np.zeros(len(self.pictures), dtype=bool)
        for i in np.flatnonzero(rng.random(len(self.pictures)) < noise):
            j = int(rng.integers(len(self.pictures)))
            if j != i and self.texts[j]:
                self.texts[i], self.meanings[i] = self.texts[j][:1], self.meanings[j][:1]
                self.noisy[i] = True
        vocab = sorted({t for ts in self.texts for t in ts})
        self.column = {t: k for k, t in enumerate(vocab)}
        self.tokens = tokenize(vocab, max_tokens)  # once: BPE is slow per step

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``(B, 3, S, S)`` float in [0, 1], the batch's distinct caption tokens and the truth
        table (every caption against every picture, by the generator's resolver; a noisy pair is a
        positive of its own picture whatever the resolver says)."""
        texts: dict[str, object] = {}
        for r in rows:
            for t, m in zip(self.texts[r], self.meanings[r], strict=True):
                texts.setdefault(t, m)
        column = {t: k for k, t in enumerate(texts)}
        table = positives([self.pictures[r] for r in rows], list(texts.values()))
        for i, r in enumerate(rows):
            for t in self.texts[r]:
                table[i, column[t]] = True
        tokens = self.tokens[[self.column[t] for t in column]]
        return self.images[rows].float().div(255), tokens, torch.from_numpy(table)


class WebClipPretraining(Training):
    """Batches of whole scene groups (the objects of one scene are each other's hard negatives)."""

    name = "build_web_clip"

    def __init__(self, model: nn.Module, corpus: WebCorpusBatches, recipe: WebClipRecipe,
                 device: torch.device) -> None:
        self.model = self.net = to_channels_last(model.to(device))
        self.corpus, self.recipe, self.device, self.epochs = corpus, recipe, device, recipe.epochs
        self.rng = np.random.default_rng([recipe.seed, 2])
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
        self.total_steps = recipe.epochs * len(self._batches(np.random.default_rng(0)))
        self.scheduler = warmup_cosine_scheduler(self.optimizer, self.total_steps, recipe.warmup_steps)

    def _batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Groups in a random order, packed into batches of about ``batch_size`` pictures."""
        batches, current = [], []
        for g in rng.permutation(len(self.corpus.group_rows)):
            current.extend(self.corpus.group_rows[g].tolist())
            if len(current) >= self.recipe.batch_size:
                batches.append(np.asarray(current))
                current = []
        if len(current) >= 2:
            batches.append(np.asarray(current))
        return batches

    def epoch(self, epoch: int) -> Epoch:
        batches = self._batches(self.rng)
        return Epoch(batches, len(batches))

    def step(self, rows: np.ndarray) -> StepOut:
        images, tokens, table = self.corpus.batch(rows)
        model, device = self.model, self.device
        image_f = model.encode_image(channels_last(clip_normalize(images).to(device)), normalize=True)
        text_f = model.encode_text(tokens.to(device), normalize=True)
        loss = truth_table_clip_loss(image_f, text_f, table.to(device), model.logit_scale.exp())
        return StepOut(loss, {"loss": loss})

    def after_step(self) -> None:
        """CLIP's cap on the logit scale (a temperature of at least 1/100)."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, np.log(100))

    def generators(self) -> dict[str, np.random.Generator]:
        return {"order": self.rng}


def build_web_clip(recipe: WebClipRecipe, device: torch.device) -> tuple[nn.Module, dict]:
    """Generate the corpus, train the CLIP; return it (eval mode) and the manifest's build figures."""
    started = time.time()
    seed_everything(recipe.seed)
    model = build_clip(TINY_RN, None, tiny=recipe.tiny, context_length=recipe.max_tokens)
    groups = web_corpus(recipe.groups, size=recipe.tiny["image_size"], seed=recipe.seed,
                        image_side=recipe.image_side, objects_per_image=recipe.objects_per_image,
                        object_scale=recipe.object_scale, distractor_rate=recipe.distractor_rate,
                        two_object_rate=recipe.two_object_rate, isolated=recipe.isolated,
                        placement_rate=recipe.placement_rate, shared_colour=recipe.shared_colour)
    corpus = WebCorpusBatches(groups, recipe.noise, recipe.max_tokens, recipe.seed)
    corpus_seconds = time.time() - started
    training = WebClipPretraining(model, corpus, recipe, device)
    model = fit(training, TrainingRun("build_web_clip"))
    return model, {
        "seed": recipe.seed, "groups": recipe.groups, "pictures": len(corpus.pictures),
        "captions": len(corpus.column), "noisy_pictures": int(corpus.noisy.sum()),
        "visible_objects_mean": mean_objects(groups), "steps": training.total_steps, "epochs": recipe.epochs,
        "corpus_seconds": round(corpus_seconds, 1), "seconds": round(time.time() - started, 1),
        "device": str(device), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }


def write_web_clip(out: Path, model: nn.Module, recipe: WebClipRecipe, build: dict,
                   diagnostics: dict | None = None) -> None:
    """``out``: fp16 weights, the spec ``load_clip`` reads, the recipe and the manifest (atomically)."""
    from pipeline.models.clip_artifact import WEIGHTS_FILE, clip_spec, write_clip_spec

    with atomic_dir(out) as tmp:
        state = {k: (v.half() if recipe.fp16 and v.is_floating_point() else v)
                 for k, v in model.state_dict().items()}
        save_torch(tmp / WEIGHTS_FILE, state)
        write_clip_spec(tmp, clip_spec(TINY_RN, WEIGHTS_FILE, recipe.tiny, recipe.max_tokens))
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        write_json(tmp / MANIFEST_FILE, {**build, "diagnostics": diagnostics or {}})
