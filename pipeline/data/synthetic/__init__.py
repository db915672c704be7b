"""A synthetic referring-expression dataset written in the exact REFER (RefCOCO) file layout.

Why: the pipeline must run end to end, and be tested, without the 20k-image RefCOCO download. Each
scene holds a few non-overlapping coloured shapes on a textured background; every expression is
checked against *all* objects of its image with the same predicate a reader would apply
(:func:`resolve`), so an expression is kept only if it singles out exactly its own object. Attributes
alone are often ambiguous (``distractor_rate`` makes objects share a colour or a shape), so position
("the circle on the left") and relation ("the star left of the blue square") expressions carry real
information, as in RefCOCO.

Files (``out_root`` = the stage output):

- ``<dataset>/refs(<split_by>).p``: REFER's pickled list of ref dicts (``ref_id, ann_id, image_id,
  split, sentences[{raw, sent, tokens, sent_id}], sent_ids, category_id, file_name``);
- ``<dataset>/instances.json``: COCO images / annotations (polygon, xywh bbox, area) / categories;
- ``<dataset>/scenes.json``: each object's shape, colour, size class and geometry (a sidecar the REFER
  readers ignore; tests use it to re-check every expression with :func:`parse_expression`);
- ``images/synth_<image_id, six digits>.jpg``, e.g. ``images/synth_000042.jpg``.

Objects are painted through the pycocotools raster of their own COCO polygon, so the ground-truth mask
that the index decodes covers exactly the painted pixels (PIL's polygon fill differs on the boundary).
Everything is a pure function of ``seed``: each image draws from its own ``numpy`` generator.

Modules: :mod:`.scene` (objects, placement, pixels), :mod:`.expressions` (the expression language:
meanings, the referent predicate, text rendering and parsing, choosing expressions) and
:mod:`.refer_writer` (sampling describable scenes and writing the REFER files). The public names are
re-exported here.
"""

from pipeline.data.synthetic.expressions import (
    GENERIC_NOUNS,
    POSITIONS,
    RELATIONS,
    SHAPE_WORDS,
    SIZE_WORDS,
    Desc,
    Expr,
    candidate_expressions,
    choose_expressions,
    clean_sentence,
    parse_expression,
    relation_holds,
    render_expression,
    resolve,
)
from pipeline.data.synthetic.refer_writer import generate_synthetic_refer
from pipeline.data.synthetic.scene import COLOURS, SHAPES, SIZES, SceneObject, object_polygon

__all__ = [
    "COLOURS",
    "GENERIC_NOUNS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SHAPE_WORDS",
    "SIZES",
    "SIZE_WORDS",
    "Desc",
    "Expr",
    "SceneObject",
    "candidate_expressions",
    "choose_expressions",
    "clean_sentence",
    "generate_synthetic_refer",
    "object_polygon",
    "parse_expression",
    "relation_holds",
    "render_expression",
    "resolve",
]
