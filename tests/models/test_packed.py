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
