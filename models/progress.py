"""One cell's progress through training, and the rules that follow from it, in one place.

`train()` (models/train.py) and `train_packed()` (models/packed.py) step the weights; a `CellProgress`
decides everything else for one cell: the learning rate of the next step, when to evaluate, when the
cell has converged, when to checkpoint, when it is done, what a checkpoint keeps of all that, and the
TrainResult at the end. Both loops read the same way:

    progress = CellProgress.resume(spec, saved)      # saved: the latest checkpoint, or None
    while not progress.done:
        lr = progress.learning_rate()                # for the step about to be taken
        ... one optimizer step ...
        progress.advance()
        if progress.evaluation_due:
            progress.record_evaluation(mem_bits)     # may set `converged`
        if progress.checkpoint_due:
            store.save(progress.step, {"weights": ..., "optimizer": ..., **progress.checkpoint_state()})
    progress.stop_clock()
    result = progress.result(model)

A schedule that depends on what has been measured (its phase, the step a decay was triggered at) keeps
that state here too, saves it under a key of its own in `checkpoint_state` and reads it back in
`resume`, so the loops never change when a rule does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from models.checkpoint import rng_state
from models.gpt import GPT
from models.spec import CellSpec, TrainSpec


@dataclass
class TrainResult:
    model: GPT
    steps: int  # optimizer steps taken in total, across resumes
    converged: bool
    resumed_from_step: int  # 0 for a fresh start
    wall_s: float  # training wall time, summed across resumes
    tokens_per_s: float  # training throughput of this process
    mem_history: list[tuple[int, float]] = field(default_factory=list)  # (step, mem_bits)


def learning_rate(train: TrainSpec, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` (or constant)."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    floor = train.min_lr_ratio * train.lr
    return floor + 0.5 * (train.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def has_converged(history: list[tuple[int, float]], train: TrainSpec) -> bool:
    """mem_bits moved by less than `converge_tol` (relative) across the last `converge_window` evals."""
    if len(history) < train.converge_window:
        return False
    recent = [value for _, value in history[-train.converge_window :]]
    top = max(recent)
    return top > 0 and (top - min(recent)) / top < train.converge_tol


@dataclass
class CellProgress:
    """Where one cell's training stands: its step, its mem_bits curve, whether it has converged, and
    its wall time (earlier sessions' total plus this session's clock)."""

    train: TrainSpec
    tokens_per_step: int  # batch_size * seq_len: training tokens per optimizer step
    step: int = 0  # optimizer steps taken, across resumes
    mem_history: list[tuple[int, float]] = field(default_factory=list)  # (step, mem_bits) per evaluation
    resumed_from_step: int = 0  # 0 for a fresh start
    prior_wall_s: float = 0.0  # training wall time of earlier sessions
    converged: bool = False
    started_at: float = field(default_factory=time.perf_counter)  # this session's clock, perf_counter s
    stopped_at: float | None = None

    @classmethod
    def resume(cls, spec: CellSpec, saved: dict | None) -> CellProgress:
        """A fresh start (`saved` None), or the progress a checkpoint of this cell recorded. The clock
        of this session starts now. Restores only this cell's bookkeeping: the process's RNG states
        are the caller's to restore (`models.checkpoint.restore_rng`), as a pack shares one process."""
        progress = cls(spec.train, spec.train.batch_size * spec.data.seq_len)
        if saved is not None:
            progress.step = progress.resumed_from_step = saved["step"]
            progress.prior_wall_s = saved["wall_s"]
            progress.mem_history = [(int(s), float(v)) for s, v in saved["mem_history"]]
            progress.converged = has_converged(progress.mem_history, progress.train)
        return progress

    # -- the rules, asked in loop order -------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.converged or self.step >= self.train.max_steps

    def learning_rate(self) -> float:
        """The learning rate of the step about to be taken (optimizer step `self.step + 1`)."""
        return learning_rate(self.train, self.step)

    def advance(self) -> None:
        """One optimizer step was taken."""
        self.step += 1

    @property
    def evaluation_due(self) -> bool:
        """Evaluate every `eval_interval` steps and at `max_steps`."""
        return self.step % self.train.eval_interval == 0 or self.step == self.train.max_steps

    def record_evaluation(self, mem_bits: float) -> None:
        self.mem_history.append((self.step, mem_bits))
        self.converged = has_converged(self.mem_history, self.train)

    @property
    def checkpoint_due(self) -> bool:
        """Every `checkpoint_interval` steps while training goes on, and once at the end (when this
        session took a step), so a retry after a later failure (tracking, scoring) does not retrain."""
        if self.done:
            return self.step > self.resumed_from_step
        return self.step % self.train.checkpoint_interval == 0

    # -- checkpoints and the result -----------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """This cell's part of a checkpoint (the caller adds "weights" and "optimizer")."""
        return {
            "step": self.step,
            "rng": rng_state(),
            "wall_s": self.wall_s,
            "mem_history": [[s, v] for s, v in self.mem_history],
        }

    def stop_clock(self) -> None:
        """This session's training is over: its wall time stops here."""
        self.stopped_at = time.perf_counter()

    @property
    def session_s(self) -> float:
        end = time.perf_counter() if self.stopped_at is None else self.stopped_at
        return end - self.started_at

    @property
    def wall_s(self) -> float:
        return self.prior_wall_s + self.session_s

    def result(self, model: GPT) -> TrainResult:
        session_s = self.session_s
        tokens = (self.step - self.resumed_from_step) * self.tokens_per_step
        return TrainResult(
            model=model,
            steps=self.step,
            converged=self.converged,
            resumed_from_step=self.resumed_from_step,
            wall_s=self.prior_wall_s + session_s,
            tokens_per_s=tokens / session_s if session_s > 0 else 0.0,
            mem_history=self.mem_history,
        )
