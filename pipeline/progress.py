"""One progress-bar style for every loop: tqdm, quiet when output is not a terminal (CI logs, files),
and redrawn at most every few seconds so `dvc repro` output stays readable."""

from functools import partial

from tqdm import tqdm

progress = partial(tqdm, mininterval=5.0, disable=None, leave=False)
