"""One cell's progress through training, and the rules that follow from it, in one place.

`train()` (models/train.py) and `train_packed()` (models/packed.py) step the weights; a `CellProgress`
decides everything else for one cell: the learning rate of the next step, when to evaluate, when the
cell has converged, when to checkpoint, when it is done, what a checkpoint keeps of all that, and the
TrainResult at the end. Both loops read the same way:

    progress = CellProgress.resume(spec, saved)      # saved: the latest checkpoint, or None
    while not progress.done:
        if progress.branch_due:                      # the trunk reached a horizon T
            trunk = <a copy of weights and optimizer state>
            progress.start_branch()                  # a cool-down branch from the trunk's state
        lr = progress.learning_rate()                # for the step about to be taken
        ... one optimizer step ...
        progress.advance()
        if progress.evaluation_due:
            log(*progress.record_evaluation(metrics))   # a branch's end records a(T); may set `converged`
        if progress.branch_over:                     # a(T) measured, not converged: the trunk goes on
            <weights and optimizer state = trunk>
            progress.end_branch()
        if progress.checkpoint_due:
            store.save(progress.step, {"weights": ..., "optimizer": ..., **progress.checkpoint_state()})
    progress.stop_clock()
    result = progress.result(model)

The `branches` schedule (the default of both recipes) is a constant-rate trunk with annealed branches:
after warm-up the rate stays at `lr`; when the trunk reaches a horizon T (first_branch, 2 first_branch,
4 first_branch, ... up to max_steps), the loop keeps the trunk's state, and a branch cools the rate down
linearly to its floor over cooldown_fraction * T steps, is measured at its end (a(T), the annealed
memorization at horizon T), and is either the cell's final model (it converged, or T was the last
horizon) or thrown away, the trunk going on from the state kept. The convergence rule compares like
with like: |a(T) - a(T/2)| < converge_tol * a(T), both annealed. The trunk is checkpointed when it
reaches a horizon (before its branch) and again after the branch with a(T) recorded; a branch itself
is never checkpointed, so a crash inside one resumes from the trunk at T and runs it again (steps are
deterministic: the same branch). The final checkpoint holds the last branch's weights.

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
    branches: list[tuple[int, int, float]] = field(default_factory=list)  # (horizon T, end step, a(T))
    steps_trained: int = 0  # optimizer steps taken in total (trunk and every branch), across resumes


def learning_rate(train: TrainSpec, step: int, decay: tuple[int, int] | None = None) -> float:
    """The rate of optimizer step `step` (0-based): a linear warm-up over `warmup_steps`, then the
    schedule's. `decay` = (first step, end step) of a cool-down: wsd's once it was triggered, or the
    branch being run (None: the stable phase, or the trunk)."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    floor = train.min_lr_ratio * train.lr
    if train.schedule == "constant":
        return train.lr
    if train.schedule in ("wsd", "branches"):
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


def annealed_gain(branches: list[tuple[int, int, float]]) -> float | None:
    """(a(T) - a(T/2)) / a(T) of the last branch against the one before it (its horizon is half):
    annealed memorization's relative gain over the last doubling. None with fewer than two branches,
    or a(T) not positive."""
    if len(branches) < 2 or branches[-1][2] <= 0:
        return None
    return (branches[-1][2] - branches[-2][2]) / branches[-1][2]


def forced_decay_start(train: TrainSpec) -> int:
    """wsd: the last step a cool-down of `cooldown_fraction` of the steps so far can start and still end
    by `max_steps`."""
    return max(train.warmup_steps, math.ceil(train.max_steps / (1.0 + train.cooldown_fraction)))


@dataclass
class CellProgress:
    """Where one cell's training stands: its step, its mem_bits curve, its schedule's phase (a wsd
    cool-down, or the branch being run and the branches measured), whether it has converged, and its
    wall time (earlier sessions' total plus this session's clock)."""

    train: TrainSpec
    tokens_per_step: int  # batch_size * seq_len: training tokens per optimizer step
    num_sequences: int  # N: exposures are steps * batch_size / N
    step: int = 0  # optimizer steps of the current model (the trunk's, or the branch's), across resumes
    mem_history: list[tuple[int, float]] = field(default_factory=list)  # (step, mem_bits) per evaluation
    resumed_from_step: int = 0  # 0 for a fresh start
    prior_wall_s: float = 0.0  # training wall time of earlier sessions
    decay: tuple[int, int] | None = None  # wsd: (first step, end step) of the cool-down once triggered
    converged_step: int | None = None  # the evaluation step at which the convergence rule held
    branch: tuple[int, int] | None = None  # branches: (horizon T, end step) of the branch being run
    branches: list[tuple[int, int, float]] = field(default_factory=list)  # (T, end step, a(T)) measured
    steps_trained: int = 0  # every optimizer step taken (trunk and branches), across resumes
    session_steps: int = 0  # optimizer steps this process took (its throughput)
    trunk_restored: bool = False  # a branch just ended and the trunk's state came back: checkpoint it
    started_at: float = field(default_factory=time.perf_counter)  # this session's clock, perf_counter s
    stopped_at: float | None = None

    @classmethod
    def resume(cls, spec: CellSpec, saved: dict | None) -> CellProgress:
        """A fresh start (`saved` None), or the progress a checkpoint of this cell recorded. The clock
        of this session starts now. Restores only this cell's bookkeeping: the process's RNG states
        are the caller's to restore (`models.checkpoint.restore_rng`), as a pack shares one process.
        A checkpoint written before schedules had state (no "schedule" key) resumes unconverged, in
        its schedule's first phase."""
        progress = cls(spec.train, spec.train.batch_size * spec.data.seq_len, spec.data.num_sequences)
        if saved is not None:
            progress.step = progress.resumed_from_step = saved["step"]
            progress.prior_wall_s = saved["wall_s"]
            progress.mem_history = [(int(s), float(v)) for s, v in saved["mem_history"]]
            schedule = saved.get("schedule") or {}
            progress.decay = tuple(schedule["decay"]) if schedule.get("decay") else None
            progress.converged_step = schedule.get("converged_step")
            progress.branches = [(int(t), int(e), float(v)) for t, e, v in schedule.get("branches", [])]
            progress.steps_trained = int(schedule.get("steps_trained", saved["step"]))
        return progress

    # -- the rules, asked in loop order -------------------------------------------------------------
    @property
    def branched(self) -> bool:
        return self.train.schedule == "branches"

    @property
    def converged(self) -> bool:
        return self.converged_step is not None

    @property
    def done(self) -> bool:
        """Converged, or at the cap: for branches, the branch of the last horizon was measured."""
        if self.branched:
            last = self.train.horizons[-1]
            return self.converged or bool(self.branches and self.branches[-1][0] == last and self.branch is None
                                          and self.step == self.branches[-1][1])
        return self.converged or self.step >= self.train.max_steps

    @property
    def branch_due(self) -> bool:
        """branches: the trunk stands at a horizon whose branch has not been measured."""
        return (self.branched and self.branch is None and self.step in self.train.horizons
                and all(t != self.step for t, _, _ in self.branches))

    def start_branch(self) -> None:
        """The caller kept the trunk's state: from here the steps are the branch's cool-down."""
        self.branch = (self.step, self.step + self.train.branch_length(self.step))

    def learning_rate(self) -> float:
        """The learning rate of the step about to be taken (optimizer step `self.step + 1`)."""
        return learning_rate(self.train, self.step, self.branch if self.branched else self.decay)

    def advance(self) -> None:
        """One optimizer step was taken. A wsd cell still in its stable phase starts its cool-down now
        if waiting longer would not let it end by `max_steps`."""
        self.step += 1
        self.steps_trained += 1
        self.session_steps += 1
        self.trunk_restored = False
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
        """branches: every `eval_interval` steps of the trunk (its curve) and at each branch's end (the
        rule's a(T)), never inside a branch. Others: every `eval_interval` steps, at the end of a
        cool-down (where the rule is first measured), and at `max_steps`."""
        if self.branched:
            if self.branch is not None:
                return self.step == self.branch[1]
            return self.step % self.train.eval_interval == 0
        return (self.step % self.train.eval_interval == 0 or self.step == self.train.max_steps
                or self.step == self.decayed_from)

    def exposures(self) -> float:
        """How often the current model saw each training sequence: step * batch_size / N."""
        return self.step * self.train.batch_size / self.num_sequences

    def record_evaluation(self, metrics: dict[str, float]) -> tuple[dict[str, float], int]:
        """Add an evaluation (`metrics` holds its "mem_bits") and return what to log, at which step.

        branches: at a branch's end, a(T) is recorded (logged as `annealed_mem_bits` and
        `annealed_exposures` at the horizon T) and the cell has converged when it moved by less than
        `converge_tol` since a(T/2); a trunk evaluation adds to the trunk's curve. wsd: an evaluation may
        end the stable phase (the gain over the last doubling fell under `trigger_tol`) or, once the
        final decay is over, show the cell converged (under `converge_tol`)."""
        mem_bits = metrics["mem_bits"]
        if self.branched and self.branch is not None:
            horizon, end = self.branch
            self.branches.append((horizon, end, mem_bits))
            gain = annealed_gain(self.branches)
            if gain is not None and settled(gain, self.train.converge_tol):
                self.converged_step = self.step
            if self.converged or horizon == self.train.horizons[-1]:
                self.branch = None  # this branch is the cell's model
            return {"annealed_mem_bits": mem_bits, "annealed_exposures": self.exposures()}, horizon
        self.mem_history.append((self.step, mem_bits))
        gain = self.gain
        if gain is None or self.branched:
            return metrics, self.step
        if self.train.schedule == "wsd" and self.decay is None and settled(gain, self.train.trigger_tol) \
                and self.step >= self.train.warmup_steps:
            length = max(1, round(self.train.cooldown_fraction * self.step))
            self.decay = (self.step, min(self.train.max_steps, self.step + length))
        elif self.decayed_from is not None and self.step >= self.decayed_from and settled(gain, self.train.converge_tol):
            self.converged_step = self.step
        return metrics, self.step

    @property
    def branch_over(self) -> bool:
        """A branch was measured and is not the cell's model: the caller puts the trunk's state back
        and calls `end_branch`."""
        return self.branch is not None and self.step == self.branch[1] and bool(self.branches) \
            and self.branches[-1][0] == self.branch[0]

    def end_branch(self) -> None:
        """The trunk's state is back: its step is the horizon again."""
        self.step, self.branch = self.branch[0], None
        self.trunk_restored = True

    @property
    def gain(self) -> float | None:
        """The relative gain over the last doubling of the steps that the convergence rule reads: of
        annealed memorization between the last two branches (branches), of mem_bits at the last
        evaluation (others)."""
        if self.branched:
            return annealed_gain(self.branches)
        return gain_over_last_doubling(self.mem_history)

    @property
    def checkpoint_due(self) -> bool:
        """Every `checkpoint_interval` steps of the trunk, when it reaches a horizon (before its
        branch), after a branch (a(T) recorded), never inside a branch, and once at the end (when this
        session took a step), so a retry after a later failure (tracking, scoring) does not retrain."""
        if self.done:
            return self.session_steps > 0
        if self.branch is not None:
            return False
        return self.trunk_restored or self.branch_due or self.step % self.train.checkpoint_interval == 0

    # -- checkpoints and the result -----------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """This cell's part of a checkpoint (the caller adds "weights" and "optimizer")."""
        return {
            "step": self.step,
            "rng": rng_state(),
            "wall_s": self.wall_s,
            "mem_history": [[s, v] for s, v in self.mem_history],
            "schedule": {"decay": list(self.decay) if self.decay else None, "converged_step": self.converged_step,
                         "branches": [[t, e, v] for t, e, v in self.branches], "steps_trained": self.steps_trained},
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
        tokens = self.session_steps * self.tokens_per_step
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
            branches=list(self.branches),
            steps_trained=self.steps_trained,
        )
