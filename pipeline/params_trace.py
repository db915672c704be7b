"""Which ``params.yaml`` keys a stage reads, observed rather than guessed from its source.

With ``TRIS_PARAMS_TRACE=<dir>`` set, :mod:`pipeline.stage` hands the stage a :class:`ParamsReads` view
of its params and writes the dotted keys read to ``<dir>/<stage>.json`` on exit; ``tests/test_dvc_params.py``
compares them with the stage's ``params:`` list in ``dvc.yaml``.
"""

from __future__ import annotations

from pydantic import BaseModel

from pipeline.params import Params


class ParamsReads:
    """A view of a params model that records the dotted key of every value read through it.

    It exists so that a test can *observe* which keys a stage reads (and compare them with the stage's
    ``params:`` list in dvc.yaml) instead of guessing from the stage's source text: reads made deep in
    the library through a section handed down (``make_pseudo_masks(..., params.pseudo_masks)``) count.
    A section is returned as another view; a leaf value is returned as is and recorded. Anything else
    taken from a section (``model_dump()``, ``model_copy()``, iterating it, pickling it) hands out all of
    its values at once, so it records the whole section.
    """

    __slots__ = ("_target", "_key", "_reads")

    def __init__(self, target: BaseModel, reads: set[str], key: str = "") -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_reads", reads)

    def _record_all(self) -> None:
        if self._key:
            self._reads.add(self._key)
        else:  # the whole file: every section
            self._reads.update(type(self._target).model_fields)

    def __getattr__(self, name: str) -> object:
        value = getattr(self._target, name)
        if name in type(self._target).model_fields:
            key = f"{self._key}.{name}" if self._key else name
            if isinstance(value, BaseModel):
                return ParamsReads(value, self._reads, key)
            self._reads.add(key)
            return value
        self._record_all()
        return value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("recorded params are read-only")

    def __iter__(self):  # noqa: ANN204 - mirrors BaseModel.__iter__
        self._record_all()
        return iter(self._target)

    def __eq__(self, other: object) -> bool:
        self._record_all()
        return self._target == (other._target if isinstance(other, ParamsReads) else other)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        """Pickled (e.g. for a worker process) as the plain model, read in full."""
        self._record_all()
        return (_identity, (self._target,))

    def __repr__(self) -> str:
        return f"ParamsReads({self._key or '<params>'})"


def _identity(value: object) -> object:
    return value


def record_reads(params: Params) -> tuple[Params, set[str]]:
    """``params`` wrapped in a :class:`ParamsReads` view, and the set it fills with the keys read."""
    reads: set[str] = set()
    return ParamsReads(params, reads), reads  # type: ignore[return-value]
