"""Where each stage writes (mirrors dvc.yaml's outs; stages and tests import these, not literals)."""

from pathlib import Path

ARTIFACTS = Path("artifacts")
SYNTHETIC = ARTIFACTS / "synthetic"
INDEX = ARTIFACTS / "index"
CLIP = ARTIFACTS / "clip"
STEP1 = ARTIFACTS / "step1"
RESPONSES = ARTIFACTS / "responses.zarr"
PSEUDO_MASKS = ARTIFACTS / "pseudo_masks.zarr"
AFFINITY = ARTIFACTS / "affinity"
STEP2 = ARTIFACTS / "step2"
REPORTS = ARTIFACTS / "reports"
