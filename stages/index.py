"""Stage index: one Parquet view (images / refs / sentences + report.json) of the configured dataset.

``data.source: synthetic`` reads the synthesize stage's output; ``data.source: refer`` reads a real REFER
download (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF) from ``data.refer``. Structural faults (duplicate or
non-integer ids or ids past int64, an image entry without a size, a file_name outside the image folder,
code or a memory bomb in the refs pickle, text that is not Unicode, nesting past the limit) stop it in one
line naming file, field and id; refs with bad ground truth (an unknown split name, an image outside the
folder once symlinks are resolved, a bbox that does not bound the mask, an overlong sentence, ...) are
skipped and counted by reason in ``artifacts/index/report.json``; it also fails if nothing usable is left.
Under DVC it first checks that the files it reads lie under ``inputs.refs`` / ``inputs.images``, the
paths dvc.yaml lists as its deps (:mod:`pipeline.inputs`).
"""

import sys
from pathlib import Path

from pipeline import paths
from pipeline.data.index import build_index, format_report, write_index
from pipeline.data.refer import load_refer
from pipeline.inputs import require_tracked, uncovered
from pipeline.params import Params
from pipeline.stage import StageTimer, start_stage


def dataset_location(params: Params) -> tuple[Path, str, str, Path]:
    """``(root, dataset, split_by, image_dir)`` of the configured data source."""
    if params.data.source == "synthetic":
        s = params.synthesize
        return paths.SYNTHETIC, s.dataset, s.split_by, paths.SYNTHETIC / "images"
    r = params.data.refer
    return Path(r.root), r.dataset, r.split_by, Path(r.image_dir)


def untracked_reads(params: Params) -> list[str]:
    """What :func:`main` reads that is not under the ``inputs`` paths dvc.yaml makes its deps: the refs
    pickle and instances.json (``inputs.refs``) and the image folder (``inputs.images``)."""
    root, dataset, split_by, image_dir = dataset_location(params)
    root_key, image_key = (("data.source",) * 2 if params.data.source == "synthetic"
                           else ("data.refer.root", "data.refer.image_dir"))
    refs = [(root_key, root / dataset / f"refs({split_by}).p"), (root_key, root / dataset / "instances.json")]
    return (uncovered(refs, "refs", params.inputs.refs, repr(str(root)))
            + uncovered([(image_key, image_dir)], "images", params.inputs.images, repr(str(image_dir))))


def main() -> None:
    params, _ = start_stage("index")
    require_tracked("index", untracked_reads(params))
    root, dataset, split_by, image_dir = dataset_location(params)
    with StageTimer("index"):
        try:
            refs, instances = load_refer(root, dataset, split_by)
            tables, report = build_index(refs, instances, image_dir)
        except (OSError, ValueError) as err:  # FileNotFoundError, PermissionError; every data fault
            sys.exit(f"index: {err}")
        print(format_report(report))
        if report["kept"]["refs"] == 0:
            sys.exit("index: no usable refs left; see the skipped counts above")
        write_index(paths.INDEX, tables, report)


if __name__ == "__main__":
    main()
