"""Planning at a fraction of a millisecond a cell (issue 18, point 1): Hydra composes once per
combination of config groups, every cell is derived from that by typed updates, and the result is
exactly what a full Hydra compose of each cell gives (orchestrator.compose.GridComposer). The recorded
plan reads back into the same cells; a dry run's planning reads a store without creating one."""

from __future__ import annotations

import dataclasses
import random

import pytest

from models.spec import to_dict
import orchestrator.compose as compose_module
from orchestrator.compose import ConfigError, GridComposer, check_distinct, compose_cell, load_sweep, prepared
from orchestrator.launch import make_plan, store_exists
from orchestrator.plan import RecordedPlan, _json, plan_table

# paper_synthetic's grid with 57 seeds: 16 shapes x 11 sizes x 2 precisions x 57 seeds = 20,064 cells
# over 16 x 2 combinations of config groups (model=, precision=; train=paper is one choice).
# The paper grid with its former fixed sizes (11 for every shape) and 57 seeds: 20,064 cells.
BIG = ["sweep=paper_synthetic", "data.num_sequences=128,256,512,1024,2048,4096,8192,16384,32768,65536,131072",
       "seed=range(0,57)"]


def same_cell(fast, full) -> None:
    """Everything the planner derives equals what Hydra's full compose of the cell gives."""
    assert fast.cell_id == full.cell_id, fast.overrides
    assert fast.spec == full.spec and fast.options == full.options, fast.overrides
    assert fast.config == full.config, fast.overrides
    assert fast.reference_options == full.reference_options, fast.overrides


@pytest.fixture
def counted_composes(monkeypatch):
    """The override lists Hydra's compose is called with (the real compose runs: it is only counted)."""
    calls = []
    real = compose_module.compose

    def counting(*args, **kwargs):
        calls.append(tuple(kwargs["overrides"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(compose_module, "compose", counting)
    return calls


def test_a_20000_cell_grid_composes_once_per_combination_of_config_groups(counted_composes, memsweep_root):
    sweep = load_sweep(BIG)
    assert len(sweep.cells) == 20064
    combinations = {(c.spec.model.name, c.spec.precision) for c in sweep.cells}
    assert len(combinations) == 32
    assert len(counted_composes) == 1 + len(combinations), "the sweep file itself, then one per combination"
    assert len(set(counted_composes)) == len(counted_composes)
    assert len({c.cell_id for c in sweep.cells}) == len(sweep.cells)

    counted_composes.clear()
    for cell in random.Random(18).sample(sweep.cells, 20):
        same_cell(cell, compose_cell([*sweep.fixed_overrides, *cell.overrides]))
    assert len(counted_composes) == 20, "the comparison composed each sampled cell in full"


@pytest.mark.parametrize("overrides", [
    ["seed=3", "root_dir=/tmp/elsewhere"],  # storage and tracking interpolate root_dir
    ["data.num_sequences=${seed}", "seed=5"],  # a value that is an interpolation
    ["train.max_steps=${data.num_sequences}", "data.num_sequences=48"],
    ["data=text", "data.num_sequences=32", "data.reference.seed=2"],  # a group choice, then plain values
    ["data=text", "data.reference={seed: 2, num_sequences: 64}"],  # a value that is a dict
    ["eval_batch_size=64", "tracking=server", "storage=/tmp/ckpt"],
])
def test_a_cell_equals_its_full_compose_where_values_depend_on_each_other(overrides, memsweep_root):
    fixed = ["sweep=smoke", "train.max_steps=40"]
    same_cell(GridComposer(fixed).cell(overrides), compose_cell([*fixed, *overrides]))


def test_a_value_others_interpolate_resolves_in_each_of_them(memsweep_root):
    cell = GridComposer(["sweep=smoke"]).cell(["seed=3", "root_dir=/tmp/elsewhere"])
    assert cell.options.storage == "/tmp/elsewhere/checkpoints"
    assert cell.options.tracking_uri == "sqlite:////tmp/elsewhere/mlflow.db"
    cell = GridComposer(["sweep=smoke"]).cell(["data.num_sequences=${seed}", "seed=5"])
    assert cell.spec.data.num_sequences == 5 and cell.config["data"]["num_sequences"] == 5


@pytest.mark.parametrize("axis, bad", [
    ("seed=0,x", "seed=x"),
    ("data.num_sequences=10,-1", "data.num_sequences=-1"),
    ("train.lr=1e-3,abc", "train.lr=abc"),
    ("model.n_head=2,3", "model.n_head=3"),
    ("train.momentum=0.9,0.99", "train.momentum=0.9"),
])
def test_a_bad_grid_value_is_refused_as_a_full_compose_refuses_it(axis, bad):
    with pytest.raises(ConfigError) as err:
        load_sweep(["sweep=smoke", axis])
    message = str(err.value)
    label = message[len("cell ["):message.index("]")]
    assert bad in label.split() and "\n" not in message
    with pytest.raises(ConfigError) as full:
        compose_cell(["sweep=smoke", *label.split()])
    if bad.startswith("train.momentum"):  # Hydra's own wording differs; both name the key
        assert "Could not override 'train.momentum'" in message and "train.momentum" in str(full.value)
    else:
        assert message == f"cell [{label}]: {full.value}"


def test_a_size_set_after_composition_is_a_cell_like_any_other(memsweep_root):
    """A typed update of a composed cell (as a capacity axis sizes cells) gets the id and checks of a
    cell composed with that size: ids are cached per spec, never carried over."""
    cells = load_sweep(["sweep=smoke", "seed=0"]).cells
    resized = [dataclasses.replace(c, spec=dataclasses.replace(
        c.spec, data=dataclasses.replace(c.spec.data, num_sequences=40 + i))) for i, c in enumerate(cells)]
    check_distinct(resized)
    assert prepared(resized) == resized
    direct = load_sweep(["sweep=smoke", "seed=0", "data.num_sequences=40"]).cells[0]
    assert resized[0].spec == direct.spec and resized[0].cell_id == direct.cell_id != cells[0].cell_id
    with pytest.raises(ConfigError, match=r"are the same cell"):
        check_distinct([resized[0], dataclasses.replace(resized[1], spec=resized[0].spec)])


@pytest.mark.parametrize("overrides", [
    ["sweep=laptop"],
    ["sweep=laptop_adaptive", "seed=0,1"],
    ["sweep=text_small", "data.num_sequences=16,64", "data.reference.num_sequences=512"],
])
def test_the_recorded_plan_reads_back_the_planned_cells(overrides, memsweep_root):
    cells = load_sweep(overrides).cells
    table = plan_table(cells)
    # Every column is the plain JSON of each cell's values (the table shares what cells share).
    plain = {"cell_id": [c.cell_id for c in cells], "spec": [_json(to_dict(c.spec)) for c in cells],
             "overrides": [_json(list(c.overrides)) for c in cells], "config": [_json(c.config) for c in cells],
             "reference_options": [None if c.reference_options is None else _json(vars(c.reference_options))
                                   for c in cells],
             "params": [_json({k: str(v)[:6000] for k, v in c.recorded_params().items()}) for c in cells]}
    assert {name: table.column(name).to_pylist() for name in plain} == plain
    recorded = RecordedPlan({row["cell_id"]: row for row in table.to_pylist()}, set())
    back = recorded.cells(cells[0].options)
    assert [c.cell_id for c in back] == [c.cell_id for c in cells] and not any(c.stale for c in back)
    for cell, read in zip(cells, back):
        assert (read.spec, read.overrides, read.config, read.reference_options) == (
            cell.spec, cell.overrides, cell.config, cell.reference_options)


def test_a_read_only_plan_creates_no_store_and_reads_one_that_exists(memsweep_root):
    plan = make_plan(["sweep=smoke"], read_only=True)
    assert plan.tracker is None and plan.records == {} and len(plan.cells) == 4
    assert not memsweep_root.exists()

    make_plan(["sweep=smoke"])  # a launch's planning opens (creates) the store
    files = {p: p.read_bytes() for p in memsweep_root.rglob("*") if p.is_file()}
    assert any(p.name == "mlflow.db" for p in files)
    plan = make_plan(["sweep=smoke"], read_only=True)
    assert plan.tracker is not None and plan.records == {}
    assert {p: p.read_bytes() for p in memsweep_root.rglob("*") if p.is_file()} == files


def test_which_stores_exist(tmp_path):
    assert not store_exists(f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "mlflow.db").touch()
    assert store_exists(f"sqlite:///{tmp_path}/mlflow.db")
    assert not store_exists(str(tmp_path / "mlruns")) and not store_exists((tmp_path / "mlruns").as_uri())
    assert store_exists(str(tmp_path)) and store_exists(tmp_path.as_uri())
    assert store_exists("http://127.0.0.1:5000")  # a server answers for itself


def test_status_composes_today_s_grid_only_when_something_composing_reads_changed(memsweep_root, monkeypatch,
                                                                                 tmp_path):
    """A launch records what its cells were composed from (compose.grid_fingerprint); plan_drift, which
    `status` runs, composes today's grid only when that changed: not at all for an unchanged conf/,
    code and environment, and when a file or a variable conf/ reads changed, with the note only where
    the ids moved."""
    import shutil
    from pathlib import Path

    import orchestrator.launch as launch_module
    from orchestrator.launch import _start_launch, plan_drift, recorded_plan

    plan = make_plan(["sweep=smoke", "seed=0,1"])
    _start_launch(plan, plan.cells, force=False)
    composed = []
    real = launch_module.load_sweep
    monkeypatch.setattr(launch_module, "load_sweep", lambda overrides: composed.append(overrides) or real(overrides))

    assert plan_drift(recorded_plan("smoke", [])) is None and composed == []
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # read by conf/cluster/ray.yaml: moves no id
    assert plan_drift(recorded_plan("smoke", [])) is None and len(composed) == 1

    conf = tmp_path / "conf"  # a changed default: every id moves
    shutil.copytree(Path(compose_module.__file__).resolve().parents[1] / "conf", conf)
    recipe = conf / "train" / "cpu.yaml"
    recipe.write_text(recipe.read_text().replace("lr: ", "lr: 2.0e-2 #", 1))
    monkeypatch.setenv("MEMSWEEP_CONF", str(conf))
    note = plan_drift(recorded_plan("smoke", []))
    assert len(composed) == 2 and note and "4 of 4 cells that no launch recorded" in note, note

    text = make_plan(["sweep=text_small", "data.num_sequences=16", "data.reference.num_sequences=64"],
                     read_only=True)
    assert text.fingerprint is None  # composing text cells also reads their corpus: never fingerprinted
