"""How a step runs never changes what it computes: today's step (no host synchronisation per step) equals
the step before issue 19 (`LEGACY_STEP`) bit for bit on a CPU, alone and packed, in every precision; the
loss is read from the device only when something reads it; a checkpoint written with the fused AdamW
of a GPU resumes on a CPU on the CPU's path; MEMSWEEP_COMPILE picks a compile mode; and a compiled
model trains the same cell up to float rounding."""

import dataclasses

import numpy as np
import pytest
import torch

from measure.memorization import summarize_synthetic
from models.checkpoint import CheckpointStore
from models.data import synthetic_members
from models.packed import train_packed
from models.scoring import nll_bits
from models.spec import CellSpec, DataSpec, ModelSpec, SpecError, TrainSpec
from models.train import LEGACY_STEP, LOSS_KEY, StepOptions, train

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spec(precision: str = "fp32", seed: int = 0, num_sequences: int = 48, **train) -> CellSpec:
    recipe = dict(max_steps=40, batch_size=16, lr=1e-2, warmup_steps=5, eval_interval=15, checkpoint_interval=20,
                  grad_clip=1.0, schedule="cosine")  # steps 1..40 in order (how a step runs, not a schedule)
    recipe.update(train)
    return CellSpec(ModelSpec("l2_d16", 2, 2, 16), DataSpec(64, 32, num_sequences, 32), TrainSpec(**recipe),
                    precision, seed)


def evaluator(cell: CellSpec, members: np.ndarray):
    return lambda model: {"mem_bits": summarize_synthetic(nll_bits(model, members), cell.data.seq_len,
                                                          cell.data.vocab_size).mem_bits}


def trained(cell: CellSpec, options: StepOptions, store: CheckpointStore | None = None):
    """Train `cell`; return its result and every step's loss (read through the progress callback)."""
    members = synthetic_members(cell.data, cell.seed)
    losses = {}
    result = train(cell, members, device=CPU, evaluate=evaluator(cell, members), checkpoints=store,
                   progress=lambda step, metrics: losses.update({step: metrics[LOSS_KEY]}), options=options)
    return result, losses


def assert_bit_equal(a, b, history: bool = True):
    assert a.steps == b.steps and (a.mem_history == b.mem_history or not history)
    assert a.mem_history[-1] == b.mem_history[-1]
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), name


@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp_bf16"])
def test_todays_step_equals_the_step_before_issue_19_bit_for_bit(precision):
    before, before_losses = trained(spec(precision), LEGACY_STEP)
    after, after_losses = trained(spec(precision), StepOptions())
    assert_bit_equal(after, before)
    assert after_losses == before_losses and sorted(after_losses) == list(range(1, 41))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_pack_without_per_step_synchronisation_equals_one_with_it(precision):
    cells = [spec(precision, seed=k, num_sequences=32 + 16 * k) for k in range(3)]
    members = [synthetic_members(c.data, c.seed) for c in cells]

    def run(options):
        losses = [{} for _ in cells]
        results = train_packed(cells, members, device=CPU, evaluates=[evaluator(c, m) for c, m in zip(cells, members)],
                               progresses=[lambda step, metrics, seen=seen: seen.update({step: metrics[LOSS_KEY]})
                                           for seen in losses], options=options)
        return results, losses

    (before, before_losses), (after, after_losses) = run(LEGACY_STEP), run(StepOptions())
    for a, b in zip(after, before):
        assert_bit_equal(a, b)
    assert after_losses == before_losses


def test_the_loss_stays_on_the_device_until_something_reads_it():
    cell = spec()
    members = synthetic_members(cell.data, cell.seed)
    seen, logged = {}, {}
    train(cell, members, device=CPU, evaluate=evaluator(cell, members), options=StepOptions(),
          progress=lambda step, metrics: seen.update({step: metrics}),
          log=lambda metrics, step: logged.update({step: dict(metrics)}))
    evaluated = {15, 30, 40}
    assert sorted(logged) == sorted(evaluated) and all(LOSS_KEY in m for m in logged.values())
    assert all((LOSS_KEY in seen[step]) == (step in evaluated) for step in seen)  # read at evaluations only
    _, read_each_step = trained(cell, LEGACY_STEP)
    assert seen[7][LOSS_KEY] == read_each_step[7]  # and read on demand: the same number
    assert LOSS_KEY in seen[7]


def test_a_checkpoint_of_fused_adamw_resumes_on_the_cpus_path(tmp_path):
    """A GPU run saves its AdamW with `fused` on; resumed on a CPU the step must be the CPU's foreach
    one (torch's CPU fused kernel rounds differently), so the run equals one that never left the CPU."""
    cell = spec(schedule="constant")  # its rates do not depend on max_steps: a 20-step run starts it
    straight, _ = trained(cell, StepOptions())
    store = CheckpointStore(str(tmp_path), cell.cell_id)
    trained(dataclasses.replace(cell, train=dataclasses.replace(cell.train, max_steps=20)), StepOptions(), store)
    saved = store.load_latest()
    for group in saved["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = True, False  # as torch.optim.AdamW(fused=True) records it
    store.save(saved.pop("step"), {k: v for k, v in saved.items() if k != "cell_id"})
    resumed, _ = trained(cell, StepOptions(), store)
    assert resumed.resumed_from_step == 20
    assert_bit_equal(resumed, straight, history=False)  # the 20-step run evaluated at its end too


def test_memsweep_compile_chooses_the_compile_mode(monkeypatch):
    for value, mode in (("", None), ("0", None), ("1", "default"), ("reduce-overhead", "reduce-overhead")):
        monkeypatch.setenv("MEMSWEEP_COMPILE", value)
        assert StepOptions.from_env() == StepOptions(compile_mode=mode)
    monkeypatch.setenv("MEMSWEEP_COMPILE", "fast")
    with pytest.raises(SpecError, match="MEMSWEEP_COMPILE='fast'"):
        StepOptions.from_env()


@pytest.mark.slow
def test_a_compiled_model_trains_the_cell_up_to_float_rounding():
    cell = spec()
    eager, eager_losses = trained(cell, StepOptions())
    compiled, compiled_losses = trained(cell, StepOptions(compile_mode="default"))
    assert type(compiled.model) is type(eager.model)  # checkpoints and scoring see the plain GPT
    assert [s for s, _ in compiled.mem_history] == [s for s, _ in eager.mem_history]
    for (_, a), (_, b) in zip(compiled.mem_history, eager.mem_history):
        assert a == pytest.approx(b, rel=1e-3)
    assert compiled_losses[40] == pytest.approx(eager_losses[40], rel=1e-3)
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-3)
