"""One cell's training rules (models/progress.py), without training: when to evaluate, checkpoint and
stop, the learning rate of each step, and the bookkeeping a checkpoint keeps and a resume restores."""

import torch

from models.checkpoint import CheckpointStore
from models.progress import CellProgress, learning_rate
from models.spec import CellSpec, DataSpec, ModelSpec, TrainSpec

MEM_BITS = [10.0, 20.0, 25.0, 25.0, 25.0, 25.0]  # a curve that flattens after the third evaluation


def spec(**train) -> CellSpec:
    recipe = dict(max_steps=10, batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=3, checkpoint_interval=4,
                  converge_window=3, converge_tol=1e-12)
    return CellSpec(ModelSpec("l1_d16", 1, 2, 16), DataSpec(64, 8, 16, 16), TrainSpec(**{**recipe, **train}),
                    "fp32", 0)


def walk(progress: CellProgress) -> dict[str, list]:
    """Run the loop's bookkeeping to the end, as train() does; what was due at which step."""
    seen = {"lr": [], "evaluations": [], "checkpoints": []}
    while not progress.done:
        seen["lr"].append(progress.learning_rate())
        progress.advance()
        if progress.evaluation_due:
            progress.record_evaluation(MEM_BITS[len(progress.mem_history) % len(MEM_BITS)])
            seen["evaluations"].append(progress.step)
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


def test_a_converged_cell_stops_and_saves_its_final_state_off_the_checkpoint_interval():
    progress = CellProgress.resume(spec(max_steps=100, converge_tol=0.01), None)
    seen = walk(progress)
    # mem_bits 25, 25, 25 at steps 9, 12, 15: the third flat evaluation converges the cell.
    assert progress.converged and progress.step == 15
    assert seen["evaluations"] == [3, 6, 9, 12, 15]
    assert seen["checkpoints"] == [4, 8, 12, 15]


def test_a_checkpoint_round_trips_the_bookkeeping(tmp_path):
    cell = spec(max_steps=100, converge_tol=0.01)
    progress = CellProgress.resume(cell, None)
    for _ in range(8):
        progress.advance()
        if progress.evaluation_due:
            progress.record_evaluation(MEM_BITS[len(progress.mem_history)])
    progress.prior_wall_s = 5.0
    store = CheckpointStore(str(tmp_path), cell.cell_id)
    store.save(progress.step, {"weights": {}, "optimizer": {}, **progress.checkpoint_state()})

    saved = store.load_latest()
    assert set(saved) == {"weights", "optimizer", "rng", "step", "wall_s", "mem_history", "cell_id"}
    assert torch.equal(saved["rng"]["torch"], torch.get_rng_state())
    resumed = CellProgress.resume(cell, saved)
    assert (resumed.step, resumed.resumed_from_step) == (8, 8)
    assert resumed.mem_history == [(3, 10.0), (6, 20.0)] == progress.mem_history
    assert resumed.prior_wall_s == saved["wall_s"] >= 5.0 and not resumed.converged

    # It goes on exactly as the straight run does.
    straight, later = CellProgress.resume(cell, None), resumed
    walk(straight)
    walk(later)
    assert later.mem_history == straight.mem_history and later.step == straight.step


def test_a_converged_checkpoint_resumes_done_with_nothing_to_save():
    cell = spec(max_steps=100, converge_tol=0.01)
    # A checkpoint in the format train() has always written (these keys, histories as lists).
    saved = {"weights": {}, "optimizer": {}, "rng": {"torch": torch.get_rng_state()}, "step": 15,
             "wall_s": 2.0, "mem_history": [[9, 25.0], [12, 25.0], [15, 25.0]], "cell_id": cell.cell_id}
    progress = CellProgress.resume(cell, saved)
    assert progress.converged and progress.done and not progress.checkpoint_due
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
