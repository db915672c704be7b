"""tris-pipeline: weakly-supervised referring image segmentation from text alone (TRIS, ICCV 2023)."""

__version__ = "0.1.0"
