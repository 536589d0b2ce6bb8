"""Adaptive sweeps: rounds of cells chosen by what the rounds before measured (measure/adaptive.py).

    # conf/sweep/NAME.yaml
    adaptive:
      max_cells: 60      # the whole sweep's cells at most, every round included
      max_rounds: 6      # the grid is round 1
      # plateau_tol, seed_tol, max_seeds, knee_factor, near_entropy, size_factor: measure.adaptive.Tolerances

Round 1 is the composed grid. Once a round's cells have finished, the driver reads every capacity
group's finished cells from the store, applies the rules to each group, and derives the cells they call
for from one of the group's cells (compose.with_updates: a typed update of the size and the
seed). A cell the plan already holds is never added again, so a finished one is never rerun. Each
decided round is recorded on the latest launch run before its cells run, append-only: its cells' plan
rows (`plan-round-NNN.parquet`, read back by orchestrator/plan.py with the launch's own plan) and a JSON
of why each cell was added and what each group has established (`adaptive/round-NNN.json`, named by a
tag set last). `status` reads those JSONs only; `resume` runs the recorded plan's unfinished cells and
continues the rounds. A group is done when its plateau is established and its knee placed, or when
memorization falls past an unconverged largest size (a lower bound: see measure/adaptive.py); when the
budget or the rounds run out first, it is flagged a lower bound with the reason.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

from measure.adaptive import Addition, Tolerances, assess
from measure.memorization import PAPER_ALPHA_BITS_PER_PARAM, predicted_mem_bits
from measure.sweep import NOT_IN_CAPACITY_GROUP, SEED, SIZE
from models.spec import Cell, SpecError
from orchestrator.compose import ConfigError, typed_options, with_updates

SECTION = "sweep.adaptive"
TAG_ROUND = "memsweep.adaptive.round."  # + the round's number, on the launch run: its JSON's artifact path
GRID = "round 1: the sweep's grid"


@dataclass(frozen=True)
class AdaptiveOptions:
    """`sweep.adaptive`: the budget, and the tolerances of measure.adaptive.Tolerances."""

    max_cells: int
    max_rounds: int = 8
    plateau_tol: float = Tolerances.plateau_tol
    seed_tol: float = Tolerances.seed_tol
    max_seeds: int = Tolerances.max_seeds
    knee_factor: float = Tolerances.knee_factor
    near_entropy: float = Tolerances.near_entropy
    size_factor: float = Tolerances.size_factor

    def tolerances(self) -> Tolerances:
        return Tolerances(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Tolerances)})


def adaptive_options(config: dict) -> AdaptiveOptions | None:
    """A cell's `sweep.adaptive`, typed and checked (None: a fixed sweep); a bad field is a one-line
    ConfigError naming it."""
    node = (config.get("sweep") or {}).get("adaptive")
    if node is None:
        return None
    if not isinstance(node, dict):
        raise ConfigError(f"{SECTION}={node!r} must be a mapping, e.g. {{max_cells: 60}}")
    try:
        options = typed_options(AdaptiveOptions, node, SECTION)
        options.tolerances()
    except SpecError as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:
        raise ConfigError(f"{SECTION}.{err}") from None
    for name in ("max_cells", "max_rounds"):
        if getattr(options, name) < 1:
            raise ConfigError(f"{SECTION}.{name}={getattr(options, name)} must be at least 1")
    return options


def plan_options(cells: list[Cell]) -> AdaptiveOptions | None:
    """The sweep's adaptive options as its cells were composed (or recorded), checked against its grid:
    synthetic cells only (a rule needs H(X)), and a budget that holds round 1."""
    options = adaptive_options(cells[0].config) if cells else None
    if options is None:
        return None
    text = next((c for c in cells if c.spec.is_text), None)
    if text is not None:
        raise ConfigError(f"{SECTION}: adaptive sweeps need H(X), defined for synthetic data; cell "
                          f"[{' '.join(text.overrides)}] is a text cell")
    if len(cells) > options.max_cells:
        raise ConfigError(f"{SECTION}.max_cells={options.max_cells} is below the {len(cells)} cells planned already")
    return options


# -- deciding a round ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """What the rules read of a finished cell."""

    mem_bits: float
    converged: bool
    entropy_bits: float


@dataclass
class Round:
    """One decided round: the cells it adds (each with its reason) and each group's state."""

    number: int
    cells: list[Cell]
    added: list[dict]  # {cell_id, group, num_sequences, seed, reason}
    groups: dict[str, dict]  # label -> what the group established and its state

    def document(self) -> dict:
        return {"round": self.number, "added": self.added, "groups": self.groups}


def group_key(cell: Cell) -> tuple:
    """What a capacity group's cells share: every recorded param but the size, seed and non-members."""
    return tuple(sorted((k, str(v)) for k, v in cell.recorded_params().items() if k not in NOT_IN_CAPACITY_GROUP))


def group_label(cell: Cell) -> str:
    spec = cell.spec
    return f"{spec.shape_slug} {spec.precision} (V={spec.data.vocab_size}, S={spec.data.seq_len})"


def groups_of(cells: list[Cell]) -> dict[str, list[Cell]]:
    """The cells by capacity group (labelled), in plan order."""
    by_key: dict[tuple, list[Cell]] = {}
    for cell in cells:
        by_key.setdefault(group_key(cell), []).append(cell)
    labelled: dict[str, list[Cell]] = {}
    for members in by_key.values():
        label = group_label(members[0])
        labelled[label if label not in labelled else f"{label} #{len(labelled)}"] = members
    return labelled


def decide_round(cells: list[Cell], measured: dict[str, Measured], options: AdaptiveOptions, number: int) -> Round:
    """Round `number` after the planned `cells`, given the finished ones' measurements: what each group
    needs (measure.adaptive.assess), as cells not yet planned, within the budget (the groups in plan
    order; a group cut short is flagged with the reason)."""
    planned = {c.cell_id for c in cells}
    room = options.max_cells - len(cells) if number <= options.max_rounds else 0
    limit = (f"budget spent ({SECTION}.max_cells={options.max_cells})" if number <= options.max_rounds
             else f"rounds spent ({SECTION}.max_rounds={options.max_rounds})")
    decided = Round(number, [], [], {})
    for label, members in groups_of(cells).items():
        done = [c for c in members if c.cell_id in measured]
        if not done:
            decided.groups[label] = {"state": "waiting", "notes": ["no finished cell yet"]}
            continue
        points = [measured[c.cell_id] for c in done]
        verdict = assess([c.spec.data.num_sequences for c in done], [c.spec.seed for c in done],
                         [p.mem_bits for p in points], [p.converged for p in points],
                         [p.entropy_bits for p in points], options.tolerances())
        wanted = _new_cells(members[0], verdict.additions, planned)
        taken, cut = wanted[:max(room, 0)], wanted[max(room, 0):]
        room -= len(taken)
        for cell, addition in taken:
            decided.cells.append(cell)
            decided.added.append({"cell_id": cell.cell_id, "group": label, "num_sequences": addition.num_sequences,
                                  "seed": addition.seed, "reason": addition.reason})
        notes = list(verdict.notes)
        if cut:
            notes.append(f"{limit}: {len(cut)} cells it needs were not added ({cut[0][1].reason}); its "
                         "capacity is a lower bound")
        decided.groups[label] = {
            "state": "done" if not wanted else "refining" if not cut else "stopped",
            "capacity_bits": verdict.capacity_bits, "num_sequences_at_max": verdict.num_sequences_at_max,
            "plateau_established": verdict.plateau_established, "knee": list(verdict.knee) if verdict.knee else None,
            "lower_bound": verdict.lower_bound or bool(cut), "notes": notes, "cells": len(members), "added": len(taken)}
    return decided


def _new_cells(template: Cell, additions: tuple[Addition, ...], planned: set[str]) -> list[tuple[Cell, Addition]]:
    """The additions as cells derived from one of their group's cells, less those already planned
    (`planned` grows with them: two groups never add one cell twice)."""
    wanted = []
    for addition in additions:
        cell = with_updates(template, {SIZE: addition.num_sequences, SEED: addition.seed})
        if cell.cell_id not in planned:
            planned.add(cell.cell_id)
            wanted.append((cell, addition))
    return wanted


def grid_round(cells: list[Cell]) -> Round:
    """Round 1, for the record: the composed grid."""
    added = [{"cell_id": c.cell_id, "group": label, "num_sequences": c.spec.data.num_sequences,
              "seed": c.spec.seed, "reason": GRID} for label, members in groups_of(cells).items() for c in members]
    return Round(1, list(cells), added, {})


def expected_rounds(cells: list[Cell], options: AdaptiveOptions, alpha: dict | None = None) -> list[list[Cell]]:
    """The rounds the rules would run if every cell measured exactly its prediction min(alpha * params,
    H(X)) and converged (alpha per precision, by default the paper's): the sweep's expected cost."""
    alpha = alpha or PAPER_ALPHA_BITS_PER_PARAM
    rounds, planned = [list(cells)], list(cells)
    for number in range(2, options.max_rounds + 1):
        measured = {c.cell_id: Measured(predicted_mem_bits(alpha[c.spec.precision], c.spec.params,
                                                           c.spec.data.entropy_bits), True, c.spec.data.entropy_bits)
                    for c in planned}
        decided = decide_round(planned, measured, options, number)
        if not decided.cells:
            break
        rounds.append(decided.cells)
        planned += decided.cells
    return rounds


# -- the record -----------------------------------------------------------------------------------------------
def round_artifacts(number: int) -> tuple[str, str]:
    """(the round's plan rows, its JSON) on the launch run."""
    return f"plan-round-{number:03d}.parquet", f"adaptive/round-{number:03d}.json"


def record_round(tracker, launch_run_id: str, decided: Round) -> None:
    """Record a decided round on the launch run: its cells' plan rows (round 1's are the launch's own
    plan), then its JSON, then the tag that names it (a round is recorded once its tag is there)."""
    from orchestrator.plan import record_plan

    rows, document = round_artifacts(decided.number)
    if decided.number > 1 and decided.cells:
        record_plan(tracker, launch_run_id, decided.cells, artifact=rows)
    tracker.log_text(launch_run_id, json.dumps(decided.document(), indent=1, default=str), document)
    tracker.set_tags(launch_run_id, {f"{TAG_ROUND}{decided.number:03d}": document})


def recorded_rounds(tracker, sweep: str) -> list[dict]:
    """Every recorded round's JSON, in round order (a round recorded twice counts once)."""
    from orchestrator.tracking import read_runs

    found: dict[int, tuple[str, str]] = {}
    for run in read_runs(tracker, sweep, kind="launch"):
        for key, path in run.tags.items():
            if key.startswith(TAG_ROUND):
                found.setdefault(int(key[len(TAG_ROUND):]), (run.run_id, path))
    return [json.loads(tracker.load_text(*found[number])) for number in sorted(found)]


def finished_measurements(plan) -> dict[str, Measured]:
    """The finished cells of the plan, as the rules read them, from the store."""
    from orchestrator.tracking import TAG_CELL, read_cell_runs, tag

    experiment = plan.cells[0].options.experiment
    runs, _ = read_cell_runs(plan.tracker, experiment)  # each cell's current run
    chosen = {tag(run.tags, TAG_CELL): run for run in runs}
    measured = {}
    for cell in plan.cells:
        run = chosen.get(cell.cell_id)
        if run is not None and run.status == "FINISHED" and "mem_bits" in run.metrics:
            measured[cell.cell_id] = Measured(run.metrics["mem_bits"], run.metrics.get("converged", 0.0) > 0.5,
                                              run.metrics["entropy_bits"])
    return measured


# -- the driver ---------------------------------------------------------------------------------------------
def round_lines(document: dict) -> list[str]:
    """A recorded round as `launch` and `status` print it: the cells added per group and why, then the
    state of each group that is done or stopped (capacity, plateau, knee, lower-bound reasons)."""
    added = document["added"]
    lines = [f"round {document['round']}: {len(added)} cells"]
    by_group: dict[str, list[dict]] = {}
    for row in added:
        by_group.setdefault(row["group"], []).append(row)
    for label, rows in by_group.items():
        reasons = list(dict.fromkeys(r["reason"] for r in rows))
        lines.append(f"  {label}: +{len(rows)}: " + "; ".join(reasons))
    for label, group in document.get("groups", {}).items():
        if group["state"] in ("done", "stopped"):
            capacity = f"capacity {group['capacity_bits']:,.0f} bits at N={group['num_sequences_at_max']}"
            knee = f"placed between {group['knee'][0]} and {group['knee'][1]}" if group["knee"] else "not placed"
            flags = [f"plateau {'established' if group['plateau_established'] else 'NOT established'}", f"knee {knee}"]
            bound = f"; a lower bound: {'; '.join(group['notes'])}" if group["lower_bound"] else ""
            lines.append(f"  {label}: {group['state']}: {capacity}, {', '.join(flags)}{bound}")
    return lines


def drive(plan, options: AdaptiveOptions, run: Callable[[list[Cell]], int], first: list[Cell] | None = None,
          say: Callable[[str], None] = print) -> int:
    """Run an adaptive sweep's rounds until every group is done or the budget is spent: `first` (default:
    the plan's unfinished cells), then each decided round's cells, each batch through `run` (cells ->
    exit code: launch's and resume's way of running cells). A batch that fails or is interrupted stops
    the rounds (its code is returned): `memsweep resume` retries it and continues them."""
    from orchestrator.tracking import latest_launch_run

    experiment = plan.cells[0].options.experiment
    rounds = recorded_rounds(plan.tracker, plan.name)
    todo = [c for c in plan.cells if plan.state(c) != "FINISHED"] if first is None else first
    while True:
        if todo:
            code = run(todo)
            if code:
                return code
            plan.records = plan.tracker.cell_records(experiment)
        elif rounds and not rounds[-1]["added"]:
            say(f"sweep {plan.name}: adaptive rounds finished at round {rounds[-1]['round']}")
            return 0
        launch = latest_launch_run(plan.tracker, experiment).run_id
        if not rounds:
            grid = grid_round(plan.cells)
            record_round(plan.tracker, launch, grid)
            rounds.append(grid.document())
        decided = decide_round(plan.cells, finished_measurements(plan), options, len(rounds) + 1)
        record_round(plan.tracker, launch, decided)
        rounds.append(decided.document())
        for line in round_lines(decided.document()):
            say(line)
        if not decided.cells:
            return 0
        plan.cells = plan.cells + decided.cells
        todo = decided.cells
