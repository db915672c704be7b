"""research/scratch_baseline.py: issue 14's from-scratch baseline (Eq. 6-7 alone, no pretrained CLIP)."""

import numpy as np
import pandas as pd
import pytest
import torch

from research.scratch_baseline import ScratchLocaliser, batches


def test_batches_hold_one_expression_each_of_distinct_images():
    sentences = pd.DataFrame({"image_id": [1, 1, 2, 3, 3, 3, 4, 5], "sent_id": range(8)})
    stream = batches(sentences, 4, np.random.default_rng(0))
    for _ in range(5):
        rows = next(stream)
        assert len(rows) == 4 and len(set(sentences["image_id"].to_numpy()[rows])) == 4
    with pytest.raises(ValueError, match="--batch-size 6 exceeds the split's 5 images"):
        next(batches(sentences, 6, np.random.default_rng(0)))


def test_maps_are_stride_8_and_paired_is_the_diagonal():
    torch.manual_seed(0)
    model = ScratchLocaliser(width=8, dim=16).eval()
    images = torch.rand(3, 3, 64, 64)
    tokens = torch.tensor([[49406, 320, 49407, 0], [49406, 530, 531, 49407], [49406, 700, 49407, 0]])
    with torch.no_grad():
        every = model(images, tokens)
        paired = model.paired(images, tokens)
    assert every.shape == (3, 3, 8, 8) and paired.shape == (3, 8, 8)
    torch.testing.assert_close(paired, every[torch.arange(3), torch.arange(3)])
    # cosine times the temperature (10 at init)
    assert float(every.abs().max()) <= 10.0 + 1e-4


def test_grey_sees_no_colour():
    """With ``grey`` the maps depend on luminance only: swapping two colour channels changes nothing."""
    torch.manual_seed(0)
    tokens = torch.tensor([[49406, 320, 49407]])
    images = torch.rand(2, 3, 32, 32)
    swapped = images[:, [2, 1, 0]]
    with torch.no_grad():
        grey = ScratchLocaliser(width=8, dim=16, grey=True).eval()
        torch.testing.assert_close(grey(images, tokens), grey(swapped, tokens))
        torch.manual_seed(0)
        colour = ScratchLocaliser(width=8, dim=16).eval()
        assert not torch.allclose(colour(images, tokens), colour(swapped, tokens))
