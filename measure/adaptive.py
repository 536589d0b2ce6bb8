"""The rules of an adaptive sweep: which cells a capacity group still needs (README, "Adaptive sweeps").

A capacity measurement needs few dataset sizes per group (one model shape, precision, data shape and
recipe): some well below capacity, where a model holds its whole dataset (mem_bits = H(X)); two on the
plateau, where memorization stopped growing; and enough around the knee between them to place it.
`assess` reads a group's finished cells and says what evidence is missing, each added cell with its
reason, or that the group is done:

- the smallest size is not near H(X) (its seed mean's mem_fraction below `near_entropy`): a smaller size;
- the plateau is not established (measure.sweep.plateau_reached at `plateau_tol`): a larger size, unless
  memorization falls between the two largest sizes while the largest did not converge: a larger size
  trains no further at the same step cap, so the group stops there, its capacity a lower bound;
- the knee (between the largest size near H(X) and the next size) spans more than `knee_factor` (up
  to a whole sequence: the next size may be ceil(knee_factor * the size)): the size between them (their
  geometric mean, rounded);
- the seed spread at a size (sample std over the mean) exceeds `seed_tol`: the next seed, up to
  `max_seeds` seeds.

The capacity and the plateau are measure.capacity.capacity and measure.sweep.plateau_reached: the
definitions fits.json reports, not copies of them. Every rule reads each cell's reported mem_bits and
its `converged` flag: under the branches schedule (the default) the annealed memorization of its last
branch and the annealed rule (|a(T) - a(T/2)| < tol a(T)), so sizes are compared like with like, every
value taken after a cool-down. Plain numpy, deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from measure.capacity import capacity
from measure.sweep import PLATEAU_TOL, plateau_reached


@dataclass(frozen=True)
class Tolerances:
    """When a group's evidence suffices (README, "Adaptive sweeps")."""

    plateau_tol: float = PLATEAU_TOL  # relative difference of the two largest sizes' seed means
    seed_tol: float = 0.05  # relative seed spread (std / mean) at a size that calls for another seed
    max_seeds: int = 5  # seeds per size at most
    knee_factor: float = math.sqrt(2)  # the knee is placed once its two sizes are at most this ratio apart
    near_entropy: float = 0.95  # mem_fraction of the smallest size that counts as holding its whole dataset
    size_factor: float = 2.0  # a size added below the smallest or above the largest: this factor away

    def __post_init__(self) -> None:
        checks = {
            "plateau_tol": 0 < self.plateau_tol < 1, "seed_tol": 0 < self.seed_tol < 1,
            "max_seeds": self.max_seeds >= 1, "knee_factor": self.knee_factor > 1,
            "near_entropy": 0 < self.near_entropy <= 1, "size_factor": self.size_factor > 1,
        }
        rules = {"plateau_tol": "lie strictly between 0 and 1", "seed_tol": "lie strictly between 0 and 1",
                 "max_seeds": "be at least 1", "knee_factor": "be greater than 1",
                 "near_entropy": "lie in (0, 1]", "size_factor": "be greater than 1"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must {rules[name]}")


@dataclass(frozen=True)
class Addition:
    """One cell a group needs: its dataset size, its seed, and why."""

    num_sequences: int
    seed: int
    reason: str


@dataclass(frozen=True)
class Verdict:
    """What a group's finished cells establish, and what it still needs (nothing: it is done)."""

    additions: tuple[Addition, ...]
    capacity_bits: float
    num_sequences_at_max: int
    plateau_established: bool
    knee: tuple[int, int] | None  # (largest size near H(X), the next size), once within knee_factor
    lower_bound: bool  # the capacity may be higher: why in `notes`
    notes: tuple[str, ...]  # what stops the group short of an established plateau, or why a bound

    @property
    def done(self) -> bool:
        return not self.additions


@dataclass(frozen=True)
class _Levels:
    """A group's cells by dataset size (ascending): seed means, H(X), seeds and convergence."""

    sizes: np.ndarray
    means: np.ndarray
    entropy: np.ndarray
    seeds: list[np.ndarray]
    mem: list[np.ndarray]
    converged: np.ndarray  # every seed of the size converged

    @property
    def fraction(self) -> np.ndarray:
        return self.means / self.entropy


def _levels(sizes, seeds, mem_bits, converged, entropy_bits) -> _Levels:
    values, inverse = np.unique(sizes, return_inverse=True)
    at = [inverse == i for i in range(values.size)]
    return _Levels(values, np.array([mem_bits[m].mean() for m in at]), np.array([entropy_bits[m][0] for m in at]),
                   [seeds[m] for m in at], [mem_bits[m] for m in at], np.array([converged[m].all() for m in at]))


def _base_seeds(levels: _Levels) -> list[int]:
    """The seeds a new size gets: those every size has (the first round's), else the smallest seed."""
    common = set.intersection(*(set(int(s) for s in seeds) for seeds in levels.seeds))
    return sorted(common) or [int(min(min(seeds) for seeds in levels.seeds))]


def _smaller(levels: _Levels, tol: Tolerances) -> tuple[list[tuple[int, str]], list[str]]:
    """A smaller size when the smallest does not hold (nearly) its whole dataset."""
    smallest, fraction = int(levels.sizes[0]), float(levels.fraction[0])
    if fraction >= tol.near_entropy:
        return [], []
    n = max(1, round(smallest / tol.size_factor))
    if n >= smallest:
        return [], [f"smallest size {smallest} at mem_fraction {fraction:.2f} < {tol.near_entropy:g}, and no "
                    "smaller size exists"]
    return [(n, f"smallest size {smallest} at mem_fraction {fraction:.2f} < {tol.near_entropy:g}: add {n}")], []


def _larger(levels: _Levels, capacity_bits: float, tol: Tolerances) -> tuple[list[tuple[int, str]], list[str]]:
    """A larger size while the plateau is not established; none where memorization falls past an
    unconverged largest size (more data at the same step cap only trains each sequence less)."""
    beyond = levels.entropy > capacity_bits
    n = round(int(levels.sizes[-1]) * tol.size_factor)
    if beyond.sum() < 2:
        why = f"{int(beyond.sum())} size(s) hold more information than the capacity, 2 needed"
        return [(n, f"plateau not established: {why}: add {n}")], []
    (n2, m2), (n1, m1) = zip(levels.sizes[beyond][-2:], levels.means[beyond][-2:])
    gap = abs(m1 - m2) / abs(m2)
    if m1 < m2 and not levels.converged[-1]:
        return [], [f"plateau not established: mem_bits falls {gap:.1%} from N={n2} to N={n1}, whose cells did "
                    "not converge by their last horizon (annealed mem_bits): a larger size trains no further, so "
                    "the capacity is a lower bound"]
    return [(n, f"plateau not established: the two largest sizes' means ({n2}, {n1}) differ by {gap:.1%} > "
                f"{tol.plateau_tol:.1%}: add {n}")], []


def _knee(levels: _Levels, tol: Tolerances) -> tuple[list[tuple[int, str]], tuple[int, int] | None]:
    """The size between the largest size near H(X) and the next, until they are within knee_factor."""
    near = np.flatnonzero(levels.fraction >= tol.near_entropy)
    if near.size == 0 or near[-1] == levels.sizes.size - 1:
        return [], None  # below every size, or above: the smaller and larger rules look for it
    low, high = int(levels.sizes[near[-1]]), int(levels.sizes[near[-1] + 1])
    middle = round(math.sqrt(low * high))
    if high <= math.ceil(tol.knee_factor * low) or not low < middle < high:  # whole sequences: round up
        return [], (low, high)
    return [(middle, f"knee between {low} and {high} (ratio {high / low:.2f} > {tol.knee_factor:.2f}): "
                     f"add {middle}")], None


def _seeds(levels: _Levels, tol: Tolerances) -> tuple[list[Addition], list[str]]:
    """The next seed at each size whose seeds scatter more than seed_tol."""
    additions, notes = [], []
    for n, seeds, mem in zip(levels.sizes, levels.seeds, levels.mem):
        if seeds.size < 2 or mem.mean() <= 0:
            continue
        spread = float(mem.std(ddof=1) / mem.mean())
        if spread <= tol.seed_tol:
            continue
        if seeds.size >= tol.max_seeds:
            notes.append(f"seed spread {spread:.1%} > {tol.seed_tol:.1%} at {int(n)} with max_seeds={tol.max_seeds}")
            continue
        seed = min(set(range(seeds.size + 1)) - {int(s) for s in seeds})
        additions.append(Addition(int(n), seed, f"seed spread {spread:.1%} > {tol.seed_tol:.1%} at {int(n)}: "
                                                f"add seed {seed}"))
    return additions, notes


def assess(sizes, seeds, mem_bits, converged, entropy_bits, tol: Tolerances = Tolerances()) -> Verdict:
    """What one capacity group's finished cells establish and which cells it still needs.

    Every argument has shape (num_cells,): each cell's dataset size N, seed, mem_bits, whether it
    converged, and H(X) in bits. Additions come in rule order (smaller, larger, knee, seeds), each new
    size with the seeds every measured size has; a (size, seed) already measured is never proposed.
    """
    sizes = np.asarray(sizes, dtype=np.int64).ravel()
    seeds = np.asarray(seeds, dtype=np.int64).ravel()
    mem = np.asarray(mem_bits, dtype=np.float64).ravel()
    done = np.asarray(converged, dtype=bool).ravel()
    entropy = np.asarray(entropy_bits, dtype=np.float64).ravel()
    if not sizes.size == seeds.size == mem.size == done.size == entropy.size:
        raise ValueError(f"sizes, seeds, mem_bits, converged and entropy_bits differ in length: "
                         f"{sizes.size}, {seeds.size}, {mem.size}, {done.size}, {entropy.size}")
    estimate = capacity(sizes, mem, done, entropy)  # checks emptiness and finiteness
    levels = _levels(sizes, seeds, mem, done, entropy)
    established = plateau_reached(sizes, mem, entropy, estimate.capacity_bits, tol.plateau_tol)

    smaller, notes = _smaller(levels, tol)
    larger, stops = ([], []) if established else _larger(levels, estimate.capacity_bits, tol)
    knee_sizes, knee = _knee(levels, tol)
    extra_seeds, seed_notes = _seeds(levels, tol)
    measured = set(zip(sizes.tolist(), seeds.tolist()))
    proposed: dict[tuple[int, int], Addition] = {}
    for n, reason in smaller + larger + knee_sizes:
        for seed in _base_seeds(levels):
            proposed.setdefault((n, seed), Addition(n, seed, reason))
    for addition in extra_seeds:
        proposed.setdefault((addition.num_sequences, addition.seed), addition)
    additions = tuple(a for key, a in proposed.items() if key not in measured)

    notes = notes + stops + seed_notes
    if estimate.lower_bound:
        unconverged = sorted({int(sizes[i]) for i in estimate.unconverged_plateau_cells})
        notes.append(f"unconverged cells (annealed mem_bits still moving at their last horizon) hold more "
                     f"information than the capacity at N={unconverged}")
    return Verdict(additions, estimate.capacity_bits, estimate.num_sequences_at_max, established, knee,
                   bool(estimate.lower_bound or stops), tuple(notes))
