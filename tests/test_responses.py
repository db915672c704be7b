"""A response map read back from responses.zarr equals the model's own output for that sentence."""

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tiny_pipeline import TINY_CLIP

from pipeline.data.samples import ImageBank
from pipeline.maps import clip_normalize
from pipeline.models.clip_backbone import ClipBackbone, build_clip, tokenize
from pipeline.models.step1 import TRISLocaliser
from pipeline.responses import iter_responses
from pipeline.store import RESPONSE_SCHEMA, RecordWriter, open_responses


def test_stored_map_equals_model_output(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    paths = {}
    for image_id in (1, 2, 3):
        path = tmp_path / f"{image_id}.jpg"
        Image.fromarray(rng.integers(0, 255, (50 + image_id, 70, 3), dtype=np.uint8)).save(path)
        paths[image_id] = path
    sentences = pd.DataFrame({
        "sent_id": [10, 11, 12, 13, 14], "ref_id": [1, 1, 2, 3, 4], "image_id": [1, 1, 1, 2, 3],
        "text": ["the red circle", "big disc", "left square", "the star", "a green thing on the right"],
        "height": [51, 51, 51, 52, 53], "width": [70] * 5,
    })
    clip = build_clip("tiny-rn", None, tiny=TINY_CLIP, context_length=20)
    model = TRISLocaliser(ClipBackbone(clip), 32).eval()
    bank = ImageBank(paths, 96)
    store_path = tmp_path / "responses.zarr"
    attrs = {"input_size": [96, 96]}
    with RecordWriter(store_path, RESPONSE_SCHEMA, (3, 3), shard_size=4, attrs=attrs) as writer:
        writer.add_split("val", len(sentences))
        for start, maps in iter_responses(model, bank, sentences, 2, 20, torch.device("cpu")):
            writer.write_table("val", start, maps, sentences.iloc[start:start + len(maps)])
    store = open_responses(store_path)
    for row in sentences.itertuples():
        with torch.inference_mode():
            image = clip_normalize(bank.batch([row.image_id]))
            expected = model.forward_paired(image, tokenize([row.text], 20))[0].numpy()
        stored = store.get("val", row.sent_id)
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)  # float16 storage
        assert store.meta("val", row.sent_id)["height"] == row.height
