"""Decoding COCO run-length encodings: the one pycocotools call that both the index reader and the
synthetic dataset generator need.

It is its own module so that the generator (which writes the dataset the index later reads) does not
import the index reader.
"""

from __future__ import annotations

import warnings

import numpy as np
from pycocotools import mask as mask_utils


def decode_rle(rle: dict) -> np.ndarray:
    """Boolean ``(H, W)`` mask of one compressed COCO RLE.

    pycocotools' Cython array trips a NumPy 2 ``copy=`` DeprecationWarning on every decode; it is
    harmless and would otherwise flood every log that decodes thousands of masks.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*copy keyword.*")
        return mask_utils.decode(rle).astype(bool)
