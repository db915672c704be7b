"""The one training loop of the pipeline: CLIP pretraining, Step-1, the affinity net and Step-2 all run
through :func:`fit`, each supplying only what is specific to it (a :class:`Training`: how an epoch's
batches are drawn and what one batch's loss terms are).

:class:`TrainingRun` owns what a run needs around the loop: the resume file (loaded once), its
fingerprint, DVCLive logging and finishing (final save, then ``resume.pt`` deleted so that only an
interrupted run resumes). :func:`fit` owns the NaN guard, the optimiser and scheduler steps, DDP loss
weighting and logging, and the per-epoch atomic resume state, which includes every random generator the
training carries across epochs, so a resumed run is byte-identical to an uninterrupted one.

A step reads nothing back from the device: its loss terms stay there (:class:`_TermLog`) and are copied
to the host in one transfer every :attr:`Training.log_every` steps and at the epoch's end, where the NaN
guard checks them (before any checkpoint) and the epoch means add them up. On a GPU a per-step read
(``float(loss)``, ``bool(isfinite)``) would make the host wait for the queued kernels at every step, ten
times a step here before, and leave the GPU idle while the host prepares the next one.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.atomic import CheckpointError, load_torch, save_torch
from pipeline.distributed import SINGLE_PROCESS, DistContext
from pipeline.progress import progress
from pipeline.stage import StageTimer
from pipeline.train.common import check_finite, fingerprint, set_train_mode, stack_terms, training_code

Generator = np.random.Generator | torch.Generator


@dataclass
class Epoch:
    """One epoch's work: ``inputs`` yields what :meth:`Training.step` takes, ``size`` items of it (the
    divisor of the logged epoch means and the progress bar's total)."""

    inputs: Iterable[Any]
    size: int


@dataclass
class StepOut:
    """One batch's result: ``loss`` is back-propagated (times ``weight``, a DDP rank's share of the global
    loss), ``terms`` are checked for NaN and logged, each rank's weighted by ``share`` under DDP."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    weight: float = 1.0
    share: float = 1.0


class Training(ABC):
    """What one training supplies to :func:`fit`. Subclasses set the attributes in ``__init__`` and
    implement :meth:`epoch` and :meth:`step`; the other hooks default to nothing."""

    name: str
    model: nn.Module  # what is saved and resumed
    net: nn.Module  # what runs the forward pass (``model``, or its DDP / compiled wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    epochs: int
    freeze_batchnorm: bool = False
    log_every: int = 20  # steps between host reads of the loss terms (progress bar, NaN guard)

    @abstractmethod
    def epoch(self, epoch: int) -> Epoch:
        """Draw epoch ``epoch``'s batches (0-based)."""

    @abstractmethod
    def step(self, item: Any) -> StepOut:
        """Forward one item of :attr:`Epoch.inputs` and return its loss terms (no backward)."""

    def after_step(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Called after each optimiser step (e.g. to clamp a parameter)."""

    def metrics(self) -> dict[str, float]:
        """Extra scalars logged after each epoch beside the loss means."""
        return {}

    def generators(self) -> dict[str, Generator]:
        """Random generators carried across epochs: saved with the resume state and restored from it."""
        return {}


def _generator_state(gen: Generator) -> Any:
    return gen.get_state() if isinstance(gen, torch.Generator) else gen.bit_generator.state


def _restore_generator(gen: Generator, state: Any) -> None:
    if isinstance(gen, torch.Generator):
        gen.set_state(state)
    else:
        gen.bit_generator.state = state


def load_resume_state(path: Path, expected_fingerprint: str) -> dict | None:
    """The saved state if it belongs to this exact configuration, else ``None`` (start fresh).

    Loaded weights-only (the state is tensors, state dicts and plain data; numpy generator states are
    dicts of ints), so a planted ``resume.pt`` cannot run code; such a file, or a torn one, is reported
    in one line and training starts afresh (it overwrites the file at the first epoch's checkpoint).
    """
    if not path.is_file():
        return None
    try:
        state = load_torch(path)
    except CheckpointError as err:  # a torn or foreign file is not worth crashing over: retrain
        print(f"ignoring the resume state, training from scratch: {err}")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        return None
    return state


class TrainingRun:
    """One run of a training: where it checkpoints, what it logs to, on which ranks.

    The resume file is read once, here: the stage asks :attr:`resuming` (e.g. to skip an
    initialisation the checkpoint overwrites) and :func:`fit` continues from :attr:`state`. Without a
    ``resume_path`` the run neither resumes nor checkpoints (the affinity net, CLIP pretraining: their
    outputs are not DVC ``persist`` outs).
    """

    def __init__(self, name: str, *, resume_path: Path | None = None, fingerprint: str = "",
                 live_dir: Path | None = None, dist: DistContext = SINGLE_PROCESS) -> None:
        self.name, self.resume_path, self.fingerprint, self.dist = name, resume_path, fingerprint, dist
        self.state = load_resume_state(resume_path, fingerprint) if resume_path is not None else None
        self.live, self.log = None, None
        if live_dir is not None and dist.is_main:
            from pipeline.train.live import open_live  # dvclive is only needed by logged runs

            if not self.resuming:  # a fresh run's curves start empty
                shutil.rmtree(live_dir, ignore_errors=True)
            self.live, self.log = open_live(live_dir, resume=self.resuming)

    @classmethod
    def start(cls, name: str, out: Path, *, config: dict[str, Any], inputs: Sequence[str | Path],
              stage_script: str | Path, resume: bool, dist: DistContext = SINGLE_PROCESS) -> TrainingRun:
        """The run of a resumable training stage writing ``out/model.pt``: ``out/resume.pt`` checkpoints
        it (ignored unless its fingerprint of ``config``, ``inputs`` and the training code matches, and
        deleted first when ``resume`` is off), ``out/live`` holds its curves.

        The previous ``model.pt`` stays until the new one replaces it, atomically, as the run finishes
        (:meth:`finish`): deleting it first would lose a good model to a run that then fails (a full
        disk) and gain nothing. The rule is: ``model.pt`` is always a complete model of the last run
        that finished; a run is finished only once its ``model.pt`` is in place, and then its
        ``resume.pt`` is deleted, so ``resume.pt`` beside ``model.pt`` means a newer run is unfinished.
        DVC cannot take the previous model for a new one: only a finished run updates ``dvc.lock``, and
        an unfinished one changes the (``persist``) output folder (``resume.pt``, ``live/``), so the
        folder no longer matches the lock and the stage stays out of date until a run finishes; a folder
        that does match holds exactly the model the lock recorded for those params and inputs. A reader
        run outside DVC is told when ``resume.pt`` sits beside the ``model.pt`` it loads
        (:func:`pipeline.models.checkpoints.load_localiser`)."""
        run_id = fingerprint(config, [*inputs, *training_code(stage_script)])
        resume_path = out / "resume.pt"
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if not resume:
                resume_path.unlink(missing_ok=True)
        dist.barrier()
        return cls(name, resume_path=resume_path, fingerprint=run_id, live_dir=out / "live", dist=dist)

    @property
    def resuming(self) -> bool:
        """Whether a checkpoint of this exact run was found (training continues after its epoch)."""
        return self.state is not None

    def checkpoint(self, training: Training, epoch: int, step: int) -> None:
        """Atomically write what continues the run after a kill (``epoch`` = epochs completed)."""
        if self.resume_path is None:
            return
        state = {
            "fingerprint": self.fingerprint, "epoch": epoch, "step": step,
            "model": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
            "scheduler": training.scheduler.state_dict() if training.scheduler is not None else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "generators": {k: _generator_state(g) for k, g in training.generators().items()},
        }
        save_torch(self.resume_path, state)

    def restore(self, training: Training) -> tuple[int, int]:
        """Load :attr:`state` into ``training`` and the global RNGs; ``(epochs done, steps done)``."""
        state = self.state
        if state is None:
            return 0, 0
        training.model.load_state_dict(state["model"])
        training.optimizer.load_state_dict(state["optimizer"])
        if training.scheduler is not None:
            training.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        for key, gen in training.generators().items():
            _restore_generator(gen, state["generators"][key])
        print(f"{self.name}: resuming after epoch {state['epoch']} (step {state['step']}) "
              f"from {self.resume_path}")
        return state["epoch"], state["step"]

    def run_stage(self, train: Callable[[], nn.Module], save: Callable[[nn.Module], None]) -> None:
        """The end of a training stage: ``train()`` timed under the stage's name, its model saved
        (on the CPU, by rank 0) as the run finishes, then the process group closed."""
        with StageTimer(self.name):
            model = train()
        self.finish(lambda: save(model.cpu()))
        self.dist.close()

    def finish(self, save: Callable[[], None] | None = None) -> None:
        """End logging, ``save`` the final weights (rank 0; atomically, so the previous ``model.pt`` is
        replaced only by a complete one), then delete ``resume.pt``: a finished run must not be
        "resumed" after its last epoch by a forced re-run. A ``save`` that fails (a full disk: one line
        naming the file, :class:`~pipeline.atomic.DiskFullError`) keeps ``resume.pt`` and the previous
        model, so the next run resumes after the last epoch and only saves again."""
        if self.dist.is_main:
            if self.live is not None:
                self.live.end()
            if save is not None:
                save()
            if self.resume_path is not None:
                self.resume_path.unlink(missing_ok=True)
        self.dist.barrier()


class _TermLog:
    """An epoch's loss terms: kept on the device per step, read to the host a block of steps at a time.

    :meth:`read` copies every pending step's terms in one transfer (the loop's one host sync per log
    interval), checks them step by step in step order (:func:`check_finite` names the first bad step and
    the steps read with it) and adds them to the epoch sums in step order: the same float64 additions of
    the same values as a read after every step, so the logged means are unchanged.
    """

    def __init__(self, stage: str, epoch: int) -> None:
        self.stage, self.epoch = stage, epoch
        self.pending: list[tuple[int, list[str], torch.Tensor]] = []  # (step, term names, float64 values)
        self.sums: dict[str, float] = {}
        self.last: dict[str, float] = {}  # the last read step's terms (the progress bar shows them)

    def add(self, step: int, names: list[str], values: torch.Tensor) -> None:
        self.pending.append((step, names, values))

    def read(self) -> None:
        if not self.pending:
            return
        flat = torch.cat([values for _, _, values in self.pending]).tolist()  # the one host read
        first, last, at = self.pending[0][0], self.pending[-1][0], 0
        for step, names, _ in self.pending:
            terms = dict(zip(names, flat[at:at + len(names)], strict=True))
            at += len(names)
            check_finite(self.stage, self.epoch, step, terms, steps=(first, last))
            for k, v in terms.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.last = terms
        self.pending.clear()

    def means(self, size: int) -> dict[str, float]:
        return {k: v / max(1, size) for k, v in self.sums.items()}


def fit(training: Training, run: TrainingRun | None = None) -> nn.Module:
    """Train ``training.model`` in place for ``training.epochs`` epochs; returns it in eval mode.

    Continues after the run's checkpoint when it has one. Every rank runs the same steps (under DDP the
    gradient average comes from the wrapped ``net``); rank 0 alone prints, logs and checkpoints, and all
    ranks meet at a barrier after each epoch. The loss terms are read and checked for NaN every
    ``training.log_every`` steps and at each epoch's end, always before the checkpoint.
    """
    run = run or TrainingRun(training.name)
    dist = run.dist
    start_epoch, step = run.restore(training)
    for epoch in range(start_epoch, training.epochs):
        set_train_mode(training.net, training.freeze_batchnorm)
        work = training.epoch(epoch)
        log = _TermLog(training.name, epoch)
        bar = progress(work.inputs, total=work.size, desc=f"{training.name} {epoch + 1}/{training.epochs}",
                       disable=not dist.is_main or None)
        for item in bar:
            out = training.step(item)
            log.add(step, list(out.terms), stack_terms(out.terms, dist, out.share))  # queued, not read
            training.optimizer.zero_grad(set_to_none=True)
            (out.loss if out.weight == 1.0 else out.loss * out.weight).backward()
            training.optimizer.step()
            if training.scheduler is not None:
                training.scheduler.step()
            training.after_step()
            step += 1
            if len(log.pending) >= training.log_every:
                log.read()
                bar.set_postfix({k: f"{v:.3f}" for k, v in list(log.last.items())[:2]})
        log.read()  # the epoch's last steps, checked before the checkpoint below
        means = log.means(work.size)
        if dist.is_main:
            print(f"{training.name} epoch {epoch + 1}/{training.epochs}: "
                  + ", ".join(f"{k}={v:.4f}" for k, v in means.items()))
            if run.log is not None:
                lr = training.optimizer.param_groups[-1]["lr"]
                run.log(epoch=epoch + 1, step=step, lr=lr, **training.metrics(), **means)
            run.checkpoint(training, epoch + 1, step)
        dist.barrier()
    return training.model.eval()
