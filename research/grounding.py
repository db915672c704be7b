"""Which object a Step-1 map responds to: the object hit, a diagnostic beside PointM.

The computation lives in the library (:mod:`pipeline.eval.grounding`), where ``evaluate_step1`` reports
it per split as ``object_hit``; the study tools import it from here as they always did.
"""

from __future__ import annotations

from pipeline.eval.grounding import response_object_hits

__all__ = ["response_object_hits"]
