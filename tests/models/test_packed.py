"""Packed training equals separate training: same seeds, same numbers (bit for bit in fp32 and
amp_bf16 on one thread), with a cell that converges early and stops while the others go on, and a
pack interrupted mid-run and resumed (packed, or one cell alone through train()) equal to one run
straight through."""

import dataclasses

import numpy as np
import pytest
import torch

from measure.memorization import summarize_synthetic
from models.checkpoint import CheckpointStore
from models.data import synthetic_members
from models.packed import PackedGPT, check_packable, train_packed
from models.scoring import nll_bits
from models.spec import CellSpec, DataSpec, ModelSpec, SpecError, TrainSpec
from models.train import train

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cell(num_sequences: int, seed: int, precision: str = "fp32", **train) -> CellSpec:
    recipe = dict(max_steps=240, batch_size=32, lr=1e-2, warmup_steps=20, eval_interval=20,
                  schedule="wsd", trigger_tol=0.02, cooldown_fraction=0.25, converge_tol=0.02,
                  checkpoint_interval=60)
    recipe.update(train)
    return CellSpec(ModelSpec("l1_d16", 1, 2, 16), DataSpec(64, 32, num_sequences, 64), TrainSpec(**recipe),
                    precision, seed)


def evaluator(spec: CellSpec, members: np.ndarray):
    def evaluate(model):
        nll = nll_bits(model, members)
        return {"mem_bits": summarize_synthetic(nll, spec.data.seq_len, spec.data.vocab_size).mem_bits}
    return evaluate


def separately(specs, stores=None):
    members = [synthetic_members(s.data, s.seed) for s in specs]
    stores = stores or [None] * len(specs)
    return [train(s, m, device=CPU, evaluate=evaluator(s, m), checkpoints=c) for s, m, c in zip(specs, members, stores)]


def packed(specs, stores=None, **kwargs):
    members = [synthetic_members(s.data, s.seed) for s in specs]
    return train_packed(specs, members, device=CPU, evaluates=[evaluator(s, m) for s, m in zip(specs, members)],
                        checkpoints=stores, **kwargs)


def assert_same(a, b, atol=1e-6):
    assert a.steps == b.steps and a.converged == b.converged
    assert [s for s, _ in a.mem_history] == [s for s, _ in b.mem_history]
    for (_, x), (_, y) in zip(a.mem_history, b.mem_history):
        assert x == pytest.approx(y, rel=1e-5)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert p.dtype == q.dtype
        assert torch.allclose(p.float(), q.float(), rtol=0, atol=atol), name


def test_init_rows_equal_separate_models():
    specs = [cell(16, 0), cell(64, 3)]
    pack = PackedGPT.from_specs(specs)
    for k, spec in enumerate(specs):
        torch.manual_seed(spec.seed)
        from models.gpt import GPT

        alone = GPT.from_spec(spec)
        for (name, p), q in zip(alone.named_parameters(), pack.to_gpt(k).parameters()):
            assert torch.equal(p, q), name


def test_incompatible_cells_are_refused():
    with pytest.raises(SpecError, match="cannot share a pack"):
        check_packable([cell(16, 0), cell(16, 1, lr=2e-2)])
    with pytest.raises(SpecError, match="cannot share a pack"):
        check_packable([cell(16, 0), cell(16, 1, precision="bf16")])


@pytest.mark.slow
def test_packed_equals_separate_with_an_early_stop():
    # The small cell's gain per doubling falls under 5% by step 200: it cools down and converges at 250.
    early = dict(max_steps=300, trigger_tol=0.05)
    specs = [cell(16, 0, **early), cell(128, 1, **early), cell(48, 2, **early)]
    alone, together = separately(specs), packed(specs)
    assert together[0].converged and together[0].steps < 300, "the small cell stopped early"
    assert not together[1].converged and together[1].steps == 300, "the large one went on to the end"
    for a, b in zip(alone, together):
        assert_same(a, b)


@pytest.mark.slow
def test_packed_amp_bf16_equals_separate():
    specs = [cell(16, 0, "amp_bf16", max_steps=60), cell(64, 1, "amp_bf16", max_steps=60)]
    for a, b in zip(separately(specs), packed(specs)):
        assert_same(a, b)


@pytest.mark.slow
def test_packed_bf16_trains_like_separate():
    """bf16 weights: the packed products round in another order than the stock ones, so the pack
    follows the separate cells closely but not bit for bit."""
    specs = [cell(16, 0, "bf16", max_steps=60), cell(64, 1, "bf16", max_steps=60)]
    for a, b in zip(separately(specs), packed(specs)):
        assert a.steps == b.steps
        assert next(b.model.parameters()).dtype == torch.bfloat16
        assert b.mem_history[-1][1] == pytest.approx(a.mem_history[-1][1], rel=0.05)


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_pack_resumed_from_checkpoints_equals_straight_run(tmp_path):
    specs = [cell(16, 0, max_steps=150), cell(64, 1, max_steps=150)]
    straight = packed(specs)

    stores = [CheckpointStore(str(tmp_path), s.cell_id) for s in specs]

    def crash_at(step):
        def progress(at, metrics):
            if at == step:
                raise Crash(f"crash at step {at}")
        return progress

    with pytest.raises(Crash):
        packed(specs, stores, progresses=[lambda step, metrics: None, crash_at(100)])
    assert [s.latest_step() for s in stores] == [60, 60]  # both cells checkpointed, in train()'s format
    resumed = packed(specs, stores)
    assert [r.resumed_from_step for r in resumed] == [60, 60]
    for a, b in zip(straight, resumed):
        assert_same(a, b)

    # A packed cell's checkpoint resumes alone in train(), and the result is the packed one.
    fresh_dir = tmp_path / "fresh"
    with pytest.raises(Crash):
        packed(specs, [CheckpointStore(str(fresh_dir), s.cell_id) for s in specs],
               progresses=[lambda step, metrics: None, crash_at(100)])
    (alone,) = separately([specs[1]], [CheckpointStore(str(fresh_dir), specs[1].cell_id)])
    assert alone.resumed_from_step == 60
    assert_same(alone, straight[1])


@pytest.mark.slow
def test_a_failing_cell_leaves_the_pack_and_the_others_finish():
    specs = [cell(16, 0, max_steps=60), cell(64, 1, max_steps=60)]

    def broken(model):
        raise OSError("storage fault")

    members = [synthetic_members(s.data, s.seed) for s in specs]
    results = train_packed(specs, members, device=CPU, evaluates=[broken, evaluator(specs[1], members[1])],
                           isolate_errors=True)
    assert isinstance(results[0], OSError)
    (alone,) = separately([specs[1]])
    assert_same(alone, results[1])


def test_pack_key_ignores_data_size_and_seed():
    a, b = cell(16, 0), dataclasses.replace(cell(64, 5), data=DataSpec(64, 32, 64, 128))
    check_packable([a, b])


def test_batched_reductions_equal_the_exact_ones_up_to_rounding():
    """The GPU default (exact=False): LayerNorm backward and clipping norms batched over the cells.
    Gradients and norms agree with the per-cell (bit-exact) path to float rounding."""
    from models.packed import _clip_norms

    specs = [cell(16, 0), cell(64, 3), cell(48, 5)]
    members = [synthetic_members(s.data, s.seed) for s in specs]
    targets = torch.stack([torch.as_tensor(m[:16]) for m in members])  # (K, B, S)
    grads = {}
    for exact in (True, False):
        pack = PackedGPT.from_specs(specs, exact=exact)
        logits = pack(pack.inputs_for(targets))
        torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten()).backward()
        grads[exact] = pack.grad.clone()
        assert pack.grad.abs().sum() > 0
    assert torch.allclose(grads[True], grads[False], rtol=1e-4, atol=1e-7)
    exact_norms = _clip_norms(grads[True], pack.slots, exact=True)
    assert torch.allclose(_clip_norms(grads[True], pack.slots, exact=False), exact_norms, rtol=1e-5)


@pytest.mark.slow
def test_batched_pack_trains_like_separate():
    specs = [cell(16, 0, max_steps=120), cell(128, 1, max_steps=120)]
    for a, b in zip(separately(specs), packed(specs, exact=False)):
        assert a.steps == b.steps
        assert b.mem_history[-1][1] == pytest.approx(a.mem_history[-1][1], rel=0.02)


# -- the branches schedule: a trunk with annealed cool-down branches, alone and packed ---------------------
def branched(num_sequences: int, seed: int, precision: str = "fp32", **train) -> CellSpec:
    recipe = dict(schedule="branches", first_branch=40, max_steps=160, converge_tol=0.01, cooldown_fraction=0.25)
    return cell(num_sequences, seed, precision, **{**recipe, **train})


def assert_same_branches(a, b):
    assert_same(a, b)
    assert [(t, e) for t, e, _ in a.branches] == [(t, e) for t, e, _ in b.branches]
    for (_, _, x), (_, _, y) in zip(a.branches, b.branches):
        assert x == y
    assert a.steps_trained == b.steps_trained


early_stop = dict(max_steps=320, converge_tol=0.05)  # N = 16 holds 97% of its 3,072 bits by step 80


def test_packed_branches_equal_separate_each_cell_branching_and_stopping_on_its_own():
    """A cell below capacity converges at an early horizon (its last two annealed values agree) and
    leaves the pack with that branch as its model; the others branch at every horizon to the cap, the
    trunk going on after each branch exactly as if it had not been taken."""
    specs = [branched(16, 0, **early_stop), branched(128, 1, **early_stop), branched(48, 2, **early_stop)]
    alone, together = separately(specs), packed(specs)
    assert together[0].converged and together[0].steps == 160 + 40, "the small cell stopped at the branch of 160"
    assert not together[1].converged and together[1].steps == 320 + 80, "the last branch: 320 + 0.25 * 320"
    assert [t for t, _, _ in together[1].branches] == [40, 80, 160, 320]
    for a, b in zip(alone, together):
        assert_same_branches(a, b)


def test_a_branch_leaves_the_trunk_as_it_found_it():
    """Branches are copies: the trunk's weights at the cap equal those of a constant-rate run to the
    cap without branches (the branches schedule's trunk is that constant-rate run)."""
    spec = branched(128, 1, converge_tol=1e-12)
    trunk_only = dataclasses.replace(spec, train=dataclasses.replace(spec.train, schedule="constant"))
    (with_branches,), (constant,) = separately([spec]), separately([trunk_only])
    # The branches run's trunk evaluations are the constant run's, step for step.
    assert with_branches.mem_history == [(s, v) for s, v in constant.mem_history if s <= 160]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_branched_cells_resumed_from_a_crash_inside_a_branch_equal_the_straight_run(tmp_path, precision):
    specs = [branched(16, 0, precision, converge_tol=1e-12), branched(64, 1, precision, converge_tol=1e-12)]
    straight = packed(specs)
    stores = [CheckpointStore(str(tmp_path / "pack"), s.cell_id) for s in specs]

    def crash_at(step, after_branches):
        state = {"calls": 0}

        def progress(at, metrics):  # the second time the cell is at `step`: inside the branch at 80
            state["calls"] += at == step
            if state["calls"] == after_branches:
                raise Crash(f"crash at step {at}")
        return progress

    # Step 90 comes first inside the branch of horizon 80 (80 -> 100), then again on the trunk.
    with pytest.raises(Crash):
        packed(specs, stores, progresses=[lambda step, metrics: None, crash_at(90, 1)])
    assert [s.latest_step() for s in stores] == [80, 80]  # the trunk at the horizon, before its branch
    resumed = packed(specs, stores)
    for a, b in zip(straight, resumed):  # bit for bit: a resumed pack retraces the pack (bf16 too)
        assert_same_branches(a, b)
    if precision == "bf16":
        return  # a bf16 pack rounds its products in another order than a lone cell: see the bf16 test above

    # A packed cell's checkpoint, taken before the branch the crash cut short, resumes alone in train().
    fresh = tmp_path / "fresh"
    with pytest.raises(Crash):
        packed(specs, [CheckpointStore(str(fresh), s.cell_id) for s in specs],
               progresses=[lambda step, metrics: None, crash_at(90, 1)])
    (alone,) = separately([specs[1]], [CheckpointStore(str(fresh), specs[1].cell_id)])
    assert alone.resumed_from_step == 80
    assert_same_branches(alone, straight[1])
