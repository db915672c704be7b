"""The synthetic dataset written in the exact REFER (RefCOCO) file layout: scenes sampled until every
object has a unique expression, painted, and written as REFER's pickle, COCO instances and a sidecar.

Everything is a pure function of ``seed``: each image draws from its own ``numpy`` generator, in the
fixed order scene sampling, painting, expression wording.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.rle import decode_rle
from pipeline.data.synthetic.expressions import (
    Expr,
    anchor_desc,
    candidate_expressions,
    choose_expressions,
    clean_sentence,
    render_expression,
)
from pipeline.data.synthetic.scene import SHAPES, SceneObject, object_polygon, paint, place_objects


def _split_assignment(num_images: int, fractions: dict[str, float], seed: int) -> list[str]:
    """Split name of each image (by image, largest-remainder rounding, every named split non-empty)."""
    names = list(fractions)
    raw = np.array([fractions[n] for n in names], dtype=float) * num_images
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: num_images - counts.sum()]:
        counts[i] += 1
    for i in range(len(names)):  # borrow from the largest split so no named split is empty
        if fractions[names[i]] > 0 and counts[i] == 0 and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    labels = [n for n, c in zip(names, counts, strict=True) for _ in range(int(c))]
    order = np.random.default_rng([seed, 1]).permutation(num_images)
    return [labels[int(j)] for j in order]


def _raw_variant(text: str, rng: np.random.Generator) -> str:
    """RefCOCO's ``raw`` is as typed: sometimes capitalised, sometimes with a full stop."""
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.15:
        text += "."
    return text


@dataclass
class Scene:
    height: int
    width: int
    objects: list[SceneObject]
    expressions: list[list[Expr]]


def sample_scene(rng: np.random.Generator, image_side: tuple[int, int], objects_per_image: tuple[int, int],
                object_scale: tuple[float, float], expressions_per_object: tuple[int, int],
                distractor_rate: float, family_weights: dict[str, float] | None = None) -> tuple[Scene, int]:
    """Sample a scene whose every object gets at least one unique expression; return it and the retries."""
    for retry in range(1000):
        width = int(rng.integers(image_side[0], image_side[1] + 1))
        height = int(rng.integers(image_side[0], image_side[1] + 1))
        n = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
        objs = place_objects(rng, n, height, width, object_scale, distractor_rate)
        if objs is None:
            continue
        anchors = [anchor_desc(k, objs, rng) for k in range(len(objs))]
        chosen = []
        for t in range(len(objs)):
            k = int(rng.integers(expressions_per_object[0], expressions_per_object[1] + 1))
            chosen.append(choose_expressions(candidate_expressions(t, objs, anchors), max(k, 1), rng,
                                             family_weights))
        if all(chosen):
            return Scene(height, width, objs, chosen), retry
    raise RuntimeError("could not sample a describable scene in 1000 tries; relax objects_per_image / "
                       "object_scale / image_side")


def generate_synthetic_refer(out_root: Path, *, dataset: str, split_by: str, num_images: int,
                             objects_per_image: tuple[int, int], image_side: tuple[int, int],
                             expressions_per_object: tuple[int, int], object_scale: tuple[float, float],
                             distractor_rate: float, split_fractions: dict[str, float], jpeg_quality: int,
                             seed: int, family_weights: dict[str, float] | None = None) -> dict:
    """Write the dataset under ``out_root`` (see the module docstring) and return summary counts.

    The summary includes the two chance rates the evaluation compares against: how often a uniformly
    random pixel, and the image centre, fall inside the referred object's mask (per sentence).
    """
    out_root = Path(out_root)
    image_dir, data_dir = out_root / "images", out_root / dataset
    image_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = _split_assignment(num_images, split_fractions, seed)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    category_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, annotations, refs, scenes = [], [], [], []
    families = {"attribute": 0, "position": 0, "relation": 0}
    random_hits, centre_hits, retries = [], [], 0
    ann_id = ref_id = sent_id = 0
    for image_id in range(1, num_images + 1):
        rng = np.random.default_rng([seed, 2, image_id])
        scene, tries = sample_scene(rng, image_side, objects_per_image, object_scale, expressions_per_object,
                                   distractor_rate, family_weights)
        retries += tries
        pixels, rles = paint(rng, scene.height, scene.width, scene.objects)
        file_name = f"synth_{image_id:06d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=jpeg_quality, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width})
        scene_objects = []
        for obj, rle, exprs in zip(scene.objects, rles, scene.expressions, strict=True):
            ann_id += 1
            ref_id += 1
            polygon = object_polygon(obj)
            xs, ys = polygon[0::2], polygon[1::2]
            bbox = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
            area = float(mask_utils.area(rle))
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id[obj.shape],
                                "segmentation": [polygon], "bbox": bbox, "area": area, "iscrowd": 0})
            sentences = []
            for expr in exprs:
                sent_id += 1
                raw = _raw_variant(render_expression(expr, rng), rng)
                sent = clean_sentence(raw)
                sentences.append({"tokens": sent.split(), "raw": raw, "sent_id": sent_id, "sent": sent})
                families[expr.family] += 1
            refs.append({"sent_ids": [s["sent_id"] for s in sentences], "file_name":
                         f"synth_{image_id:06d}_{ann_id}.jpg", "ann_id": ann_id, "ref_id": ref_id,
                         "image_id": image_id, "split": splits[image_id - 1], "sentences": sentences,
                         "category_id": category_id[obj.shape]})
            mask = decode_rle(rle)
            random_hits += [area / (scene.height * scene.width)] * len(sentences)
            centre_hits += [bool(mask[scene.height // 2, scene.width // 2])] * len(sentences)
            scene_objects.append({"ann_id": ann_id, **asdict(obj)})
        scenes.append({"image_id": image_id, "objects": scene_objects})

    with (data_dir / f"refs({split_by}).p").open("wb") as fh:
        pickle.dump(refs, fh, protocol=4)
    instances = {"info": {"description": "synthetic shapes in REFER layout", "seed": seed},
                 "images": images, "annotations": annotations, "categories": categories}
    (data_dir / "instances.json").write_text(json.dumps(instances))
    (data_dir / "scenes.json").write_text(json.dumps({"images": scenes}))

    per_split = {name: {"images": 0, "refs": 0, "sentences": 0} for name in split_fractions}
    for ref in refs:
        per_split[ref["split"]]["refs"] += 1
        per_split[ref["split"]]["sentences"] += len(ref["sentences"])
    for split in splits:
        per_split[split]["images"] += 1
    n_sent = sent_id
    return {
        "images": num_images, "refs": ref_id, "sentences": n_sent, "per_split": per_split,
        "expression_families": families, "scene_retries": retries,
        "objects_per_image_mean": round(ref_id / num_images, 3),
        "sentences_per_ref_mean": round(n_sent / max(ref_id, 1), 3),
        "chance_random_point": round(float(np.mean(random_hits)), 4),
        "chance_centre_point": round(float(np.mean(centre_hits)), 4),
    }
