"""Step-2 model selection (``step2.select``): keep the last epoch's model, or the epoch with the best
val mIoU, as the authors' ``train_stage2.py`` does (it validates after every epoch and keeps the best).

``best_val`` reads the ground-truth masks of the val split, and only of val: choosing a setting (here,
an epoch) on val is what val is for, and testA / testB never choose anything. Nothing trains on those
masks; they rank the epochs. The score is a callable the stage builds,
:func:`pipeline.eval.scoring.val_miou_scorer`: exactly ``evaluate_step2``'s val mIoU (same maps, same
threshold, same up-sampling), so the kept epoch is the one that stage would rank first. (Taking it as a
callable keeps training from importing evaluation.)

The best weights so far live in ``best_val.pt`` beside the run's ``resume.pt``, written atomically each
time an epoch beats the best, so a run killed and resumed keeps the best of the epochs it had done. The
file carries the run's fingerprint: a file of another run (another configuration) is ignored. The stage
deletes it once ``model.pt`` is in place (:meth:`BestValSelection.discard`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from pipeline.atomic import CheckpointError, load_torch, save_torch

Scorer = Callable[[nn.Module], float]
BEST_FILE = "best_val.pt"


class BestValSelection:
    """Tracks the epoch with the best val score of one training run and restores its weights.

    ``observe`` after every epoch (rank 0), ``select`` when training ends. ``resuming`` is the run's
    :attr:`~pipeline.train.loop.TrainingRun.resuming`: a fresh run starts from no best, whatever file
    an earlier run left.
    """

    def __init__(self, out_dir: Path, fingerprint: str, score: Scorer, *, resuming: bool) -> None:
        self.path = Path(out_dir) / BEST_FILE
        self.fingerprint = fingerprint
        self.score = score
        self.best_epoch: int | None = None
        self.best_score = float("-inf")
        if not resuming:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            try:
                state = load_torch(self.path)
            except CheckpointError as err:  # torn or foreign: the epochs to come still choose
                print(f"ignoring {self.path}: {err}")
                state = None
            if isinstance(state, dict) and state.get("fingerprint") == fingerprint:
                self.best_epoch, self.best_score = int(state["epoch"]), float(state["score"])

    def observe(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Score ``model`` after ``epoch`` (1-based epochs done); keep its weights when it is the best so
        far (ties keep the earlier epoch). Returns the scalars to log."""
        was_training = model.training
        value = self.score(model)
        model.train(was_training)
        if value > self.best_score:
            self.best_epoch, self.best_score = epoch, value
            state = {"fingerprint": self.fingerprint, "epoch": epoch, "score": value,
                     "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
            save_torch(self.path, state)
        return {"val_mIoU": value, "best_val_mIoU": self.best_score}

    def select(self, model: nn.Module) -> nn.Module:
        """``model`` with the best epoch's weights loaded (in place); unchanged when nothing was observed."""
        if self.best_epoch is None:
            return model
        model.load_state_dict(load_torch(self.path)["model"])
        print(f"step2.select=best_val: keeping epoch {self.best_epoch} (val mIoU {self.best_score:.4f})")
        return model

    def discard(self) -> None:
        """Delete the best-weights file (after ``model.pt`` holds them)."""
        self.path.unlink(missing_ok=True)
