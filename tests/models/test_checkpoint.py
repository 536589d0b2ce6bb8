"""Checkpoints: atomic step folders that count only once COMPLETE, the latest two kept, another
cell's state refused, and a crash at step k resumed to 2k equal, bit for bit, to 2k straight."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from measure.memorization import summarize_synthetic
from models.checkpoint import MARKER, CheckpointError, CheckpointStore
from models.data import synthetic_members
from models.scoring import nll_bits
from models.spec import CellSpec, DataSpec, ModelSpec, TrainSpec
from models.train import train

CELL = "l2_d16-v64-s32-n16-fp32-seed0-0123456789"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def state(value: float) -> dict:
    return {"weights": {"w": torch.full((3, 2), value)}, "history": [[1, value]], "wall_s": value}


def store_path(store: CheckpointStore) -> Path:
    return Path(store.dir)


def step_dirs(store: CheckpointStore) -> list[str]:
    return sorted(p.name for p in store_path(store).iterdir() if p.name.startswith("step-"))


def test_round_trip(tmp_path):
    store = CheckpointStore(str(tmp_path), CELL)
    assert store.latest_step() is None and store.load_latest() is None
    store.save(7, state(1.5))
    loaded = store.load_latest()
    assert loaded["step"] == 7 and loaded["cell_id"] == CELL
    assert torch.equal(loaded["weights"]["w"], torch.full((3, 2), 1.5))
    assert loaded["history"] == [[1, 1.5]] and loaded["wall_s"] == 1.5
    # A second store object on the same folder (a new process after a crash) finds it too.
    assert CheckpointStore(str(tmp_path), CELL).latest_step() == 7


def test_a_step_folder_without_its_marker_is_ignored(tmp_path):
    store = CheckpointStore(str(tmp_path), CELL)
    store.save(10, state(1.0))
    store.save(20, state(2.0))
    (store_path(store) / "step-000000020" / MARKER).unlink()  # a save that died before its marker
    assert store.latest_step() == 10
    assert store.load_latest()["step"] == 10
    assert torch.equal(store.load_latest()["weights"]["w"], torch.full((3, 2), 1.0))
    # Saving that step again replaces the leftover and counts.
    store.save(20, state(2.5))
    assert store.load_latest()["wall_s"] == 2.5


def test_only_the_latest_two_are_kept(tmp_path):
    store = CheckpointStore(str(tmp_path), CELL)
    for step in (100, 200, 300, 400):
        store.save(step, state(float(step)))
    assert step_dirs(store) == ["step-000000300", "step-000000400"]
    assert not [p for p in store_path(store).iterdir() if p.name.startswith(".tmp")]
    assert store.load_latest()["step"] == 400


def test_another_cells_checkpoint_is_refused(tmp_path):
    theirs = CheckpointStore(str(tmp_path), "other-cell")
    theirs.save(5, state(5.0))
    ours = CheckpointStore(str(tmp_path), CELL)
    shutil.copytree(store_path(theirs), store_path(ours))  # e.g. a folder copied by hand
    assert ours.latest_step() == 5
    with pytest.raises(CheckpointError, match="other-cell"):
        ours.load_latest()


# -- resume equivalence -------------------------------------------------------------------------------
K = 20  # checkpoint interval; the crash comes at step K + 7, the run ends at 2K


class Crash(RuntimeError):
    pass


# Schedules under test: cosine, and wsd whose cool-down is triggered at step K (the gain per doubling
# falls under 90% there) and ends at K + 5: the checkpoint at K holds a triggered schedule, the crash
# comes mid-way through the floor phase, and nothing converges (tolerance 1e-12).
SCHEDULES = {"cosine": {"schedule": "cosine"},
             "wsd": {"schedule": "wsd", "trigger_tol": 0.9, "cooldown_fraction": 0.25}}


def resume_spec(precision: str, schedule: str = "cosine") -> CellSpec:
    return CellSpec(
        model=ModelSpec("l2_d16", n_layer=2, n_head=2, n_embd=16),
        data=DataSpec(vocab_size=64, seq_len=32, num_sequences=16, num_nonmembers=16),
        train=TrainSpec(
            max_steps=2 * K, batch_size=12, lr=1e-2, warmup_steps=5, eval_interval=10, checkpoint_interval=K,
            converge_tol=1e-12, **SCHEDULES[schedule],  # never stops early
        ),
        precision=precision,
        seed=3,
    )


def run(spec, members, store, crash_at=None):
    """Train; return (result, {step: metrics}). `crash_at` raises from the progress callback."""
    seen = {}

    def progress(step, metrics):
        seen[step] = {"train_loss_bits_per_token": metrics["train_loss_bits_per_token"], **metrics}
        if step == crash_at:
            raise Crash(f"killed at step {step}")

    def evaluate(model):
        nll = nll_bits(model, members)
        return {"mem_bits": summarize_synthetic(nll, spec.data.seq_len, spec.data.vocab_size).mem_bits}

    result = train(spec, members, device=torch.device("cpu"), evaluate=evaluate, checkpoints=store,
                   progress=progress)
    return result, seen


@pytest.mark.parametrize("precision, schedule", [("fp32", "cosine"), ("bf16", "cosine"), ("fp32", "wsd")])
def test_crash_after_k_then_resume_to_2k_equals_2k_straight(tmp_path, precision, schedule):
    spec = resume_spec(precision, schedule)
    members = synthetic_members(spec.data, spec.seed)
    straight, straight_seen = run(spec, members, CheckpointStore(str(tmp_path / "a"), spec.cell_id))

    store = CheckpointStore(str(tmp_path / "b"), spec.cell_id)
    with pytest.raises(Crash):
        run(spec, members, store, crash_at=K + 7)
    assert store.latest_step() == K  # steps K+1..K+7 were lost with the process
    resumed, resumed_seen = run(spec, members, store)

    assert resumed.resumed_from_step == K and straight.resumed_from_step == 0
    assert resumed.steps == straight.steps == 2 * K
    assert sorted(resumed_seen) == list(range(K + 1, 2 * K + 1))
    for step in resumed_seen:  # the same batches, learning rates and optimizer state
        assert resumed_seen[step] == straight_seen[step], step
    assert resumed.mem_history == straight.mem_history  # the history before K came from the checkpoint
    assert resumed.decay_start_step == straight.decay_start_step == (K if schedule == "wsd" else None)
    straight_params = dict(straight.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert p.dtype == straight_params[name].dtype
        assert torch.equal(p, straight_params[name]), name
    np.testing.assert_array_equal(nll_bits(resumed.model, members), nll_bits(straight.model, members))
    assert store.latest_step() == 2 * K  # the final state is saved too


def test_training_with_max_steps_k_then_2k_on_a_constant_schedule_equals_2k_straight(tmp_path):
    """The 'extend a finished run' path: a constant schedule does not depend on max_steps."""
    base = resume_spec("fp32")

    def with_steps(n):
        return dataclasses.replace(base, train=dataclasses.replace(base.train, max_steps=n, schedule="constant"))

    members = synthetic_members(base.data, base.seed)
    straight, _ = run(with_steps(2 * K), members, None)
    store = CheckpointStore(str(tmp_path), "extended")
    first, _ = run(with_steps(K), members, store)
    assert first.steps == K and store.latest_step() == K
    second, _ = run(with_steps(2 * K), members, store)
    assert second.resumed_from_step == K and second.steps == 2 * K
    straight_params = dict(straight.model.named_parameters())
    for name, p in second.model.named_parameters():
        assert torch.equal(p, straight_params[name]), name


def test_a_branched_cell_crashed_inside_a_branch_resumes_alone_to_the_straight_run(tmp_path):
    """branches: horizons 10, 20, 40 (K = 20 is also the checkpoint interval). The crash comes inside the
    branch of horizon 20 (steps 20 -> 24), after the trunk's checkpoint at 20: the resumed run redoes
    that branch from the trunk and ends bit for bit as the straight run, its branches and model alike."""
    spec = resume_spec("fp32")
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, schedule="branches", first_branch=10,
                                                               max_steps=2 * K, cooldown_fraction=0.2))
    members = synthetic_members(spec.data, spec.seed)
    straight, _ = run(spec, members, CheckpointStore(str(tmp_path / "a"), spec.cell_id))
    assert [t for t, _, _ in straight.branches] == [10, 20, 40] and straight.steps == 48

    store = CheckpointStore(str(tmp_path / "b"), spec.cell_id)
    with pytest.raises(Crash):
        run(spec, members, store, crash_at=K + 2)  # step 22: inside the branch of horizon 20
    assert store.latest_step() == K
    resumed, _ = run(spec, members, store)
    assert resumed.resumed_from_step == K and resumed.branches == straight.branches
    for (name, p), q in zip(resumed.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(p, q), name
    assert store.latest_step() == 48  # the final checkpoint: the last branch's weights
