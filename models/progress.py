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
    converged_step: int | None = None  # the evaluation at which the convergence rule held
    gain_last_doubling: float | None = None  # mem_bits' relative gain over the last doubling, at the end
    decay_start_step: int | None = None  # wsd: the step the cool-down started


def learning_rate(train: TrainSpec, step: int, decay: tuple[int, int] | None = None) -> float:
    """The rate of optimizer step `step` (0-based): a linear warm-up over `warmup_steps`, then the
    schedule's. `decay` = (first step, end step) of a wsd cool-down once it was triggered (None: the
    stable phase)."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    floor = train.min_lr_ratio * train.lr
    if train.schedule == "constant":
        return train.lr
    if train.schedule == "wsd":
        if decay is None or step < decay[0]:
            return train.lr
        start, end = decay
        return train.lr - (train.lr - floor) * min(1.0, (step - start) / max(1, end - start))
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    return floor + 0.5 * (train.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def gain_over_last_doubling(history: list[tuple[int, float]]) -> float | None:
    """(m(t) - m(t/2)) / m(t) at the last evaluation t, with m(t/2) the value of the last evaluation at
    or before step t/2: mem_bits' relative growth over the last doubling of the steps. None when no
    evaluation lies that early, or m(t) is not positive."""
    if not history:
        return None
    step, latest = history[-1]
    earlier = [value for s, value in history if 2 * s <= step]
    if not earlier or latest <= 0:
        return None
    return (latest - earlier[-1]) / latest


def settled(gain: float, tol: float) -> bool:
    """mem_bits moved by less than `tol` over the last doubling, up or down: the convergence rule and the
    wsd trigger. The rule's bound is on growth; a fall counts too, because a curve falling by more
    than `tol` is not at rest: before memorization starts on data far past capacity, mem_bits is a few
    hundred bits of noise on millions and falls as often as it rises (a laptop cell at N = 16,384
    fell 1,880 -> 695 bits and stopped as 'converged' at 600 steps under a one-sided bound)."""
    return abs(gain) < tol


def forced_decay_start(train: TrainSpec) -> int:
    """wsd: the last step a cool-down of `cooldown_fraction` of the steps so far can start and still end
    by `max_steps`."""
    return max(train.warmup_steps, math.ceil(train.max_steps / (1.0 + train.cooldown_fraction)))


@dataclass
class CellProgress:
    """Where one cell's training stands: its step, its mem_bits curve, its schedule's phase, whether it
    has converged, and its wall time (earlier sessions' total plus this session's clock)."""

    train: TrainSpec
    tokens_per_step: int  # batch_size * seq_len: training tokens per optimizer step
    step: int = 0  # optimizer steps taken, across resumes
    mem_history: list[tuple[int, float]] = field(default_factory=list)  # (step, mem_bits) per evaluation
    resumed_from_step: int = 0  # 0 for a fresh start
    prior_wall_s: float = 0.0  # training wall time of earlier sessions
    decay: tuple[int, int] | None = None  # wsd: (first step, end step) of the cool-down once triggered
    converged_step: int | None = None  # the evaluation step at which the convergence rule held
    started_at: float = field(default_factory=time.perf_counter)  # this session's clock, perf_counter s
    stopped_at: float | None = None

    @classmethod
    def resume(cls, spec: CellSpec, saved: dict | None) -> CellProgress:
        """A fresh start (`saved` None), or the progress a checkpoint of this cell recorded. The clock
        of this session starts now. Restores only this cell's bookkeeping: the process's RNG states
        are the caller's to restore (`models.checkpoint.restore_rng`), as a pack shares one process.
        A checkpoint written before schedules had state (no "schedule" key) resumes unconverged, in
        its schedule's first phase."""
        progress = cls(spec.train, spec.train.batch_size * spec.data.seq_len)
        if saved is not None:
            progress.step = progress.resumed_from_step = saved["step"]
            progress.prior_wall_s = saved["wall_s"]
            progress.mem_history = [(int(s), float(v)) for s, v in saved["mem_history"]]
            schedule = saved.get("schedule") or {}
            progress.decay = tuple(schedule["decay"]) if schedule.get("decay") else None
            progress.converged_step = schedule.get("converged_step")
        return progress

    # -- the rules, asked in loop order -------------------------------------------------------------
    @property
    def converged(self) -> bool:
        return self.converged_step is not None

    @property
    def done(self) -> bool:
        return self.converged or self.step >= self.train.max_steps

    def learning_rate(self) -> float:
        """The learning rate of the step about to be taken (optimizer step `self.step + 1`)."""
        return learning_rate(self.train, self.step, self.decay)

    def advance(self) -> None:
        """One optimizer step was taken. A wsd cell still in its stable phase starts its cool-down now
        if waiting longer would not let it end by `max_steps`."""
        self.step += 1
        if self.train.schedule == "wsd" and self.decay is None and self.step >= forced_decay_start(self.train):
            self.decay = (self.step, self.train.max_steps)

    @property
    def decayed_from(self) -> int | None:
        """The step from which the schedule's final decay is over (None: not yet known): the end of a
        wsd cool-down, `max_steps` for cosine, the end of warm-up for a constant rate (no decay)."""
        if self.train.schedule == "wsd":
            return self.decay[1] if self.decay else None
        return self.train.max_steps if self.train.schedule == "cosine" else self.train.warmup_steps

    @property
    def evaluation_due(self) -> bool:
        """Every `eval_interval` steps, at the end of a cool-down (where the rule is first measured),
        and at `max_steps`."""
        return (self.step % self.train.eval_interval == 0 or self.step == self.train.max_steps
                or self.step == self.decayed_from)

    def record_evaluation(self, mem_bits: float) -> None:
        """Add an evaluation; it may end a wsd cell's stable phase (the gain over the last doubling fell
        under `trigger_tol`) or, once the final decay is over, show the cell converged (under
        `converge_tol`)."""
        self.mem_history.append((self.step, mem_bits))
        gain = self.gain
        if gain is None:
            return
        if self.train.schedule == "wsd" and self.decay is None and settled(gain, self.train.trigger_tol) \
                and self.step >= self.train.warmup_steps:
            length = max(1, round(self.train.cooldown_fraction * self.step))
            self.decay = (self.step, min(self.train.max_steps, self.step + length))
        elif self.decayed_from is not None and self.step >= self.decayed_from and settled(gain, self.train.converge_tol):
            self.converged_step = self.step

    @property
    def gain(self) -> float | None:
        """mem_bits' relative gain over the last doubling of the steps, at the last evaluation."""
        return gain_over_last_doubling(self.mem_history)

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
            "schedule": {"decay": list(self.decay) if self.decay else None, "converged_step": self.converged_step},
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
            converged_step=self.converged_step,
            gain_last_doubling=self.gain,
            decay_start_step=self.decay[0] if self.decay else None,
        )
