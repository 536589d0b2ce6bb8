"""One cell's training rules (models/progress.py), without training: when to evaluate, checkpoint and
stop, the learning rate of each step under each schedule, the scale-free convergence rule, and the
bookkeeping a checkpoint keeps and a resume restores."""

import math

import pytest
import torch

from models.checkpoint import CheckpointStore
from models.progress import (
    CellProgress,
    annealed_gain,
    forced_decay_start,
    gain_over_last_doubling,
    learning_rate,
)
from models.spec import CellSpec, DataSpec, ModelSpec, TrainSpec

MEM_BITS = [10.0, 20.0, 25.0, 25.0, 25.0, 25.0]  # a curve that flattens after the third evaluation


def spec(**train) -> CellSpec:
    recipe = dict(max_steps=10, batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=3, checkpoint_interval=4,
                  schedule="cosine", converge_tol=1e-12)
    return CellSpec(ModelSpec("l1_d16", 1, 2, 16), DataSpec(64, 8, 16, 16), TrainSpec(**{**recipe, **train}),
                    "fp32", 0)


def from_list(progress: CellProgress) -> float:
    return MEM_BITS[len(progress.mem_history) % len(MEM_BITS)]


def walk(progress: CellProgress, curve=from_list) -> dict[str, list]:
    """Run the loop's bookkeeping to the end, as train() does; what was due at which step. `curve`
    gives mem_bits at an evaluation (from the progress, e.g. its step)."""
    seen = {"lr": [], "evaluations": [], "checkpoints": [], "logged": [], "steps": []}
    while not progress.done:
        if progress.branch_due:
            progress.start_branch()
        seen["lr"].append(progress.learning_rate())
        seen["steps"].append(progress.step)
        progress.advance()
        if progress.evaluation_due:
            seen["logged"].append(progress.record_evaluation({"mem_bits": curve(progress)}))
            seen["evaluations"].append(progress.step)
        if progress.branch_over:
            progress.end_branch()
        if progress.checkpoint_due:
            seen["checkpoints"].append(progress.step)
    return seen


def test_cadence_of_evaluations_checkpoints_and_learning_rates():
    cell = spec()
    progress = CellProgress.resume(cell, None)
    seen = walk(progress)
    assert seen["evaluations"] == [3, 6, 9, 10]  # every eval_interval, and at max_steps
    assert seen["checkpoints"] == [4, 8, 10]  # every checkpoint_interval, and the final state
    assert seen["lr"] == [learning_rate(cell.train, step) for step in range(10)]
    assert seen["lr"][:2] == [0.005, 0.01]  # warm-up, then cosine down to min_lr_ratio * lr
    assert progress.step == 10 and not progress.converged and progress.done


def test_gain_over_the_last_doubling_reads_the_evaluation_at_or_before_half_the_steps():
    assert gain_over_last_doubling([]) is None
    assert gain_over_last_doubling([(100, 5.0)]) is None  # nothing at or before step 50
    assert gain_over_last_doubling([(50, 4.0), (100, 5.0)]) == pytest.approx(0.2)
    assert gain_over_last_doubling([(40, 2.0), (60, 4.0), (100, 5.0)]) == pytest.approx(0.6)  # 40, not 60
    assert gain_over_last_doubling([(50, 0.0), (100, 0.0)]) is None


@pytest.mark.parametrize("scale", [1, 100, 10_000])
def test_the_rule_fires_on_a_plateau_and_never_on_a_slow_climb_at_any_step_scale(scale):
    """A saturating curve converges a few doublings after it flattens, wherever that is; a power-law
    climb gains the same 3.4% per doubling at every scale and never converges (a fixed window of
    steps would fire on it once the steps are many)."""
    def recipe(max_steps):
        return spec(schedule="constant", warmup_steps=0, max_steps=max_steps, eval_interval=scale,
                    checkpoint_interval=max_steps, converge_tol=0.01)

    plateau = CellProgress.resume(recipe(1000 * scale), None)
    walk(plateau, lambda p: 1000.0 * (1 - math.exp(-p.step / (20 * scale))))
    assert plateau.converged and 100 * scale <= plateau.converged_step <= 200 * scale
    assert plateau.gain < 0.01

    climb = CellProgress.resume(recipe(1000 * scale), None)
    walk(climb, lambda p: p.step ** 0.05)
    assert not climb.converged and climb.step == 1000 * scale
    assert climb.gain == pytest.approx(1 - 2 ** -0.05, rel=0.01)


def test_a_falling_curve_neither_triggers_the_cool_down_nor_converges():
    """Before memorization starts on data far past capacity, mem_bits is noise that falls as often as it
    rises (1,880 -> 986 -> 695 bits on a laptop cell): a fall is not a plateau, for the wsd trigger and
    for the rule alike; once the curve climbs and then flattens, both fire as usual."""
    cell = spec(schedule="wsd", max_steps=20_000, warmup_steps=10, eval_interval=100, checkpoint_interval=1000,
                trigger_tol=0.02, cooldown_fraction=0.25, converge_tol=0.01)

    def noise_then_saturation(p):
        if p.step <= 2000:
            return 2000.0 / (1 + p.step / 100)  # falling noise floor
        return 10_000.0 * (1 - math.exp(-(p.step - 2000) / 500))

    progress = CellProgress.resume(cell, None)
    walk(progress, noise_then_saturation)
    assert progress.decay[0] > 2000, "no cool-down while mem_bits was falling"
    assert progress.converged and progress.converged_step > progress.decay[1] - 1

    falling = CellProgress.resume(spec(schedule="constant", warmup_steps=0, max_steps=5000, eval_interval=100,
                                       checkpoint_interval=5000, converge_tol=0.01), None)
    walk(falling, lambda p: 2000.0 / (1 + p.step / 100))
    assert not falling.converged and falling.gain < -0.01


def test_cosine_is_measured_only_when_its_decay_is_over():
    flat = CellProgress.resume(spec(schedule="cosine", max_steps=60, converge_tol=0.01), None)
    seen = walk(flat, lambda p: 25.0)  # flat from the start: the rule would hold at once
    assert flat.converged_step == 60 and seen["evaluations"][-1] == 60


def test_wsd_holds_the_rate_cools_down_once_the_gain_is_small_then_stops_when_the_rule_holds():
    cell = spec(schedule="wsd", max_steps=10_000, warmup_steps=10, eval_interval=100, checkpoint_interval=1000,
                trigger_tol=0.02, cooldown_fraction=0.25, min_lr_ratio=0.1, converge_tol=0.01)
    progress = CellProgress.resume(cell, None)
    # Saturates with a time scale of 100 steps: the gain per doubling falls under 2% by step 600.
    seen = walk(progress, lambda p: 1000.0 * (1 - math.exp(-p.step / 100)))
    start, end = progress.decay
    assert start % 100 == 0 and 400 <= start <= 800 and end == start + round(0.25 * start)
    assert end in seen["evaluations"]  # measured right where the cool-down ends
    lr = seen["lr"]  # lr[s]: the rate of the step taken from s
    assert lr[9] == 1e-2 and all(rate == 1e-2 for rate in lr[10:start])  # warm-up done, then stable
    assert lr[start] == 1e-2 and lr[start + 1] < 1e-2 and lr[end - 1] > 1e-3
    assert all(a > b for a, b in zip(lr[start:end], lr[start + 1:end]))  # a linear decay ...
    assert all(rate == pytest.approx(1e-3) for rate in lr[end:])  # ... to the floor, kept
    assert progress.converged_step == end  # this curve is flat by then
    assert progress.result(model=None).decay_start_step == start


def test_wsd_starts_its_cool_down_in_time_to_end_at_the_cap():
    cell = spec(schedule="wsd", max_steps=1200, warmup_steps=10, eval_interval=100, checkpoint_interval=1000,
                trigger_tol=0.02, cooldown_fraction=0.2, converge_tol=0.01)
    progress = CellProgress.resume(cell, None)
    walk(progress, lambda p: float(p.step))  # doubles with the steps: never triggers by itself
    assert forced_decay_start(cell.train) == 1000 and progress.decay == (1000, 1200)
    assert progress.step == 1200 and not progress.converged  # the cap: unconverged
    assert progress.learning_rate() == pytest.approx(cell.train.min_lr_ratio * cell.train.lr)


def test_a_checkpoint_mid_cool_down_round_trips_and_goes_on_as_the_straight_run(tmp_path):
    cell = spec(schedule="wsd", max_steps=400, warmup_steps=5, eval_interval=10, checkpoint_interval=7,
                trigger_tol=0.5, cooldown_fraction=1.0, converge_tol=1e-12)

    def curve(p):
        return 100.0 + p.step

    progress = CellProgress.resume(cell, None)
    while progress.decay is None or progress.step < progress.decay[0] + 3:
        progress.advance()
        if progress.evaluation_due:
            progress.record_evaluation({"mem_bits": curve(progress)})
    progress.prior_wall_s = 5.0
    store = CheckpointStore(str(tmp_path), cell.cell_id)
    store.save(progress.step, {"weights": {}, "optimizer": {}, **progress.checkpoint_state()})

    saved = store.load_latest()
    assert set(saved) == {"weights", "optimizer", "rng", "step", "wall_s", "mem_history", "schedule", "cell_id"}
    assert torch.equal(saved["rng"]["torch"], torch.get_rng_state())
    resumed = CellProgress.resume(cell, saved)
    assert (resumed.step, resumed.resumed_from_step, resumed.decay) == (progress.step,) * 2 + (progress.decay,)
    assert resumed.mem_history == progress.mem_history and resumed.prior_wall_s >= 5.0

    straight = CellProgress.resume(cell, None)
    straight_seen, resumed_seen = walk(straight, curve), walk(resumed, curve)
    assert resumed_seen["lr"] == straight_seen["lr"][-len(resumed_seen["lr"]):]
    assert (resumed.mem_history, resumed.decay, resumed.step) == (straight.mem_history, straight.decay, straight.step)


def test_a_converged_checkpoint_resumes_done_with_nothing_to_save():
    cell = spec(max_steps=100, converge_tol=0.01, schedule="wsd")
    saved = {"weights": {}, "optimizer": {}, "rng": {"torch": torch.get_rng_state()}, "step": 60,
             "wall_s": 2.0, "mem_history": [[30, 25.0], [60, 25.0]], "cell_id": cell.cell_id,
             "schedule": {"decay": [48, 60], "converged_step": 60}}
    progress = CellProgress.resume(cell, saved)
    assert progress.converged and progress.done and not progress.checkpoint_due
    assert progress.decay == (48, 60)


def test_a_checkpoint_from_before_schedules_had_state_resumes_unconverged_in_the_first_phase():
    cell = spec(max_steps=100, converge_tol=0.01, schedule="wsd")
    saved = {"weights": {}, "optimizer": {}, "rng": {"torch": torch.get_rng_state()}, "step": 15,
             "wall_s": 2.0, "mem_history": [[9, 25.0], [12, 25.0], [15, 25.0]], "cell_id": cell.cell_id}
    progress = CellProgress.resume(cell, saved)
    assert not progress.converged and not progress.done and progress.decay is None
    assert progress.mem_history == [(9, 25.0), (12, 25.0), (15, 25.0)]


def test_the_result_counts_this_sessions_steps_and_time():
    cell = spec()
    saved = {"step": 4, "wall_s": 3.0, "mem_history": [[3, 10.0]]}
    progress = CellProgress.resume(cell, saved)
    walk(progress)
    progress.stop_clock()
    result = progress.result(model=None)
    assert (result.steps, result.resumed_from_step, result.converged) == (10, 4, False)
    assert result.wall_s == 3.0 + progress.session_s and progress.session_s > 0
    assert result.tokens_per_s == 6 * 4 * 8 / progress.session_s  # steps * batch_size * seq_len / s
    assert result.mem_history == [(3, 10.0), (6, 20.0), (9, 25.0), (10, 25.0)]
    assert result.gain_last_doubling == pytest.approx((25.0 - 10.0) / 25.0)  # step 10 against step 3 (<= 5)


# -- the branches schedule: a constant-rate trunk with annealed branches ----------------------------------
def branches_spec(**train) -> CellSpec:
    recipe = dict(schedule="branches", max_steps=1600, first_branch=100, warmup_steps=10, eval_interval=50,
                  checkpoint_interval=1000, cooldown_fraction=0.2, min_lr_ratio=0.1, converge_tol=0.01)
    return spec(**{**recipe, **train})


def annealed(trunk, jump: float = 0.15):
    """A curve whose cool-downs add `jump` (relative) to what the trunk holds at the horizon, as they
    do on the tiny shapes (10-20%): trunk evaluations read trunk(step), a branch's end trunk(T) * (1 + jump)."""
    def curve(p):
        return trunk(p.branch[0]) * (1 + jump) if p.branch is not None else trunk(p.step)
    return curve


def test_horizons_double_from_the_first_branch_up_to_the_cap():
    train = branches_spec().train
    assert train.horizons == (100, 200, 400, 800, 1600)
    assert branches_spec(max_steps=1000).train.horizons == (100, 200, 400, 800)
    assert branches_spec(max_steps=60, first_branch=100, warmup_steps=0).train.horizons == (60,)  # one, at the cap
    assert train.steps_through(400) == 400 + 20 + 40 + 80  # the trunk and its branches
    assert train.steps_at_cap == 1600 + 20 + 40 + 80 + 160 + 320
    assert train.steps_to_horizon_at_least(250) == train.steps_through(400)
    assert branches_spec(schedule="cosine").train.steps_at_cap == 1600


def test_each_branch_cools_a_copy_of_the_trunk_down_and_the_trunk_goes_on_at_the_peak_rate():
    cell = branches_spec(converge_tol=1e-12)  # never converges: every horizon is branched
    progress = CellProgress.resume(cell, None)
    seen = walk(progress, annealed(lambda s: 1000.0 * s / (s + 100)))
    steps, lr = seen["steps"], seen["lr"]
    # The steps: the trunk to 100, its branch 100 -> 120, back to the trunk at 100, on to 200, ...
    assert steps[:125] == list(range(0, 120)) + list(range(100, 105))
    branch = [r for s, r in zip(steps[100:120], lr[100:120])]
    assert branch[0] == 1e-2 and all(a > b for a, b in zip(branch, branch[1:])) and branch[-1] > 1e-3
    assert lr[120:220] == [1e-2] * 100  # the trunk again, at the peak rate
    assert [(t, e) for t, e, _ in progress.branches] == [(100, 120), (200, 240), (400, 480), (800, 960),
                                                           (1600, 1920)]
    # a(T) is logged at the horizon T as annealed_mem_bits, with its exposures (steps * batch / N = 16)
    assert ({"annealed_mem_bits": pytest.approx(1.15 * 500.0), "annealed_exposures": 120 * 4 / 16}, 100) \
        in seen["logged"]
    # Checkpoints: at each horizon before its branch and after it (a(T) kept), at 1000, at the end; none in a branch.
    assert seen["checkpoints"] == [100, 100, 200, 200, 400, 400, 800, 800, 1000, 1600, 1920]
    assert progress.done and not progress.converged and progress.step == 1920  # the last branch is the model
    assert progress.steps_trained == cell.train.steps_at_cap
    result = progress.result(model=None)
    assert result.steps == 1920 and result.steps_trained == 1600 + 20 + 40 + 80 + 160 + 320


@pytest.mark.parametrize("scale", [1, 10, 100])
def test_the_annealed_rule_fires_on_a_plateau_at_any_step_scale_and_never_across_a_cool_down_jump(scale):
    """The trunk saturates; every branch adds 15%. The rule compares a(T) with a(T/2), both annealed, so
    it fires where the annealed curve flattens, at every step scale; a rule that compared a(T) with the
    trunk's m(T/2) would see the 15% jump at every horizon and never fire."""
    cell = branches_spec(max_steps=1600 * scale, first_branch=100 * scale, eval_interval=50 * scale,
                         checkpoint_interval=1000 * scale)
    plateau = CellProgress.resume(cell, None)
    walk(plateau, annealed(lambda s: 1000.0 * (1 - math.exp(-s / (40 * scale)))))
    assert plateau.converged and plateau.converged_step == 400 * scale + 80 * scale  # a(400) vs a(200): < 1%
    assert plateau.step == plateau.converged_step  # its model is that branch
    assert abs(plateau.gain) < 0.01 and plateau.mem_history[-1][0] == 400 * scale  # trunk curve to the horizon
    # The same plateau seen through a rule on the trunk's value half way back: the jump is never < 1%.
    jumps = [(1.15 * 1000.0 * (1 - math.exp(-t / 40)) - 1000.0 * (1 - math.exp(-t / 80))) for t in (400, 800, 1600)]
    assert all(j / 1150.0 > 0.1 for j in jumps)

    climb = CellProgress.resume(cell, None)
    walk(climb, annealed(lambda s: float(s) ** 0.05))  # gains 3.4% per doubling at every scale
    assert not climb.converged and climb.done and len(climb.branches) == 5
    assert climb.gain == pytest.approx(1 - 2 ** -0.05, rel=0.01)


def test_annealed_gain_needs_two_branches_and_positive_memorization():
    assert annealed_gain([]) is None and annealed_gain([(100, 120, 5.0)]) is None
    assert annealed_gain([(100, 120, 4.0), (200, 240, 5.0)]) == pytest.approx(0.2)
    assert annealed_gain([(100, 120, 0.0), (200, 240, 0.0)]) is None


@pytest.mark.parametrize("stop_at", [100, 110, 150, 200, 230])
def test_resuming_from_any_checkpoint_of_a_branched_cell_goes_on_as_the_straight_run(stop_at):
    """Checkpoints at a horizon (before its branch), after a branch, and periodic ones: a run stopped
    anywhere (inside a branch too: it resumes from the trunk's last checkpoint) ends as the straight run."""
    cell = branches_spec(max_steps=800, checkpoint_interval=30, converge_tol=1e-12)
    curve = annealed(lambda s: 1000.0 * s / (s + 300))
    straight = CellProgress.resume(cell, None)
    walk(straight, curve)

    progress, saved = CellProgress.resume(cell, None), None
    while progress.steps_trained < stop_at:
        if progress.branch_due:
            progress.start_branch()
        progress.advance()
        if progress.evaluation_due:
            progress.record_evaluation({"mem_bits": curve(progress)})
        if progress.branch_over:
            progress.end_branch()
        if progress.checkpoint_due:
            saved = {"weights": {}, "optimizer": {}, **progress.checkpoint_state()}
    resumed = CellProgress.resume(cell, saved)
    walk(resumed, curve)
    assert resumed.branches == straight.branches and resumed.step == straight.step
    assert resumed.steps_trained >= straight.steps_trained  # a branch cut short is run again
    assert resumed.mem_history == straight.mem_history


def test_a_short_run_below_the_first_branch_ends_with_one_branch_at_the_cap():
    progress = CellProgress.resume(branches_spec(max_steps=60, warmup_steps=5), None)
    walk(progress, annealed(lambda s: 10.0))
    assert progress.branches == [(60, 72, pytest.approx(11.5))] and progress.done and progress.step == 72
