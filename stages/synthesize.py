"""Stage synthesize: the embedded default dataset, written in REFER's RefCOCO layout.

Writes ``artifacts/synthetic/`` atomically: ``<dataset>/refs(<split_by>).p``, ``<dataset>/instances.json``,
``<dataset>/scenes.json``, ``images/*.jpg`` and ``summary.json`` (counts, expression families, and the
random-point / centre-point chance rates the evaluation is compared against).

With ``data.source: refer`` nothing reads the synthetic data (``index`` and the image readers depend on
``inputs.refs`` / ``inputs.images`` instead), so the stage generates nothing: it writes a placeholder
(``summary.json`` saying so, and ``images/README.txt``) in a moment. The placeholder keeps the default
``inputs`` paths existing, so that forgetting to set them reaches ``index``'s one-line error naming them
instead of DVC's "No such file or directory".
"""

from pipeline import paths
from pipeline.atomic import atomic_dir, write_json
from pipeline.data.synthetic import generate_synthetic_refer
from pipeline.stage import StageTimer, start_stage


def main() -> None:
    params, _ = start_stage("synthesize")
    if params.data.source != "synthetic":
        with atomic_dir(paths.SYNTHETIC) as out:
            reason = f"data.source is {params.data.source!r}: the dataset comes from data.refer"
            write_json(out / "summary.json", {"generated": False, "reason": reason})
            (out / "images").mkdir()
            (out / "images" / "README.txt").write_text(f"No synthetic images: {reason}.\n")
        print(f"[synthesize] nothing generated ({reason})")
        return
    p = params.synthesize
    with StageTimer("synthesize"), atomic_dir(paths.SYNTHETIC) as out:
        summary = generate_synthetic_refer(
            out, dataset=p.dataset, split_by=p.split_by, num_images=p.num_images,
            objects_per_image=p.objects_per_image, image_side=p.image_side,
            expressions_per_object=p.expressions_per_object, object_scale=p.object_scale,
            distractor_rate=p.distractor_rate, split_fractions=p.split_fractions,
            jpeg_quality=p.jpeg_quality, seed=params.base.seed, family_weights=p.family_weights.model_dump())
        write_json(out / "summary.json", summary)
    print(f"[synthesize] {summary['images']} images, {summary['refs']} refs, "
          f"{summary['sentences']} sentences "
          f"(families {summary['expression_families']}); chance: random point "
          f"{summary['chance_random_point']:.3f}, centre point {summary['chance_centre_point']:.3f}")


if __name__ == "__main__":
    main()
