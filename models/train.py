"""Train one cell's GPT on its members, evaluating memorization as it goes.

`train()` reads top to bottom: build the model and optimizer, resume from the latest complete checkpoint
if there is one, then take optimizer steps until the cell is done. When to evaluate, checkpoint and stop,
and the learning rate of each step, are the rules of `models.progress.CellProgress`, which
`models.packed.train_packed` follows too. It knows nothing of MLflow or Ray: metrics leave through the
`log` callback and evaluation comes in through `evaluate`, so the same loop serves `memsweep run`, Ray
workers and the benchmarks.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, CheckpointStore, restore_rng
from models.data import BatchOrder
from models.gpt import GPT
from models.precision import WeightPrecision
from models.progress import CellProgress, TrainResult
from models.spec import CellSpec, TrainSpec

LogFn = Callable[[dict[str, float], int], None]
EvaluateFn = Callable[[GPT], dict[str, float]]  # must return at least {"mem_bits": ...}
ProgressFn = Callable[[int, dict[str, float]], None]


def load_trained(spec: CellSpec, checkpoints: CheckpointStore, device: torch.device) -> GPT:
    """A trained cell's model from its latest complete checkpoint (its final state once it finished),
    in eval mode and in the cell's precision; used to score with a reference model."""
    saved = checkpoints.load_latest(map_location=device)
    if saved is None:
        raise CheckpointError(f"cell {spec.cell_id} has no checkpoint under {checkpoints.dir}: "
                              "it has not been trained with this storage")
    model = GPT.from_spec(spec).to(device)
    WeightPrecision(spec.precision, model, device).load_state_dict(saved["weights"])
    return model.eval()


def _adamw(weights: WeightPrecision, hp: TrainSpec) -> torch.optim.AdamW:
    """AdamW over the weights it updates (the float32 master copy in bf16); the learning rate is set
    before every step."""
    return torch.optim.AdamW(
        weights.optimizer_params(),
        lr=hp.lr,
        betas=(hp.beta1, hp.beta2),
        weight_decay=hp.weight_decay,
        foreach=True,
    )


def _optimizer_step(model: GPT, weights: WeightPrecision, optimizer: torch.optim.AdamW,
                    targets: torch.Tensor, lr: float, grad_clip: float) -> float:
    """One AdamW step at `lr` on `targets` ((B, S) member tokens); returns the batch's mean loss in
    nats per token."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with weights.autocast():
        logits = model(model.inputs_for(targets))  # (B, S, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # nats per token
    loss.backward()
    if weights.master:
        weights.grads_to_master()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(weights.optimizer_params(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if weights.master:
        weights.master_to_model()
    return loss.item()


def train(
    spec: CellSpec,
    members: np.ndarray,
    *,
    device: torch.device,
    evaluate: EvaluateFn,
    checkpoints: CheckpointStore | None = None,
    log: LogFn = lambda metrics, step: None,
    progress: ProgressFn = lambda step, metrics: None,
) -> TrainResult:
    """Train `spec`'s model on `members` ((N, S) int64 tokens) and return it with its history."""
    hp = spec.train
    torch.manual_seed(spec.seed)
    model = GPT.from_spec(spec).to(device)
    weights = WeightPrecision(spec.precision, model, device)
    optimizer = _adamw(weights, hp)
    order = BatchOrder(spec.data, spec.seed, hp.batch_size)
    data = torch.as_tensor(members, device=device)

    saved = checkpoints.load_latest(map_location=device) if checkpoints else None
    if saved is not None:
        weights.load_state_dict(saved["weights"])
        optimizer.load_state_dict(saved["optimizer"])
        restore_rng(saved["rng"])
    cell = CellProgress.resume(spec, saved)

    model.train()
    while not cell.done:
        targets = data[torch.as_tensor(order.indices(cell.step), device=device)]  # (B, S)
        loss = _optimizer_step(model, weights, optimizer, targets, cell.learning_rate(), hp.grad_clip)
        cell.advance()
        metrics = {"train_loss_bits_per_token": loss / math.log(2)}
        if cell.evaluation_due:
            metrics.update(evaluate(model))
            cell.record_evaluation(metrics["mem_bits"])
            log(metrics, cell.step)
        progress(cell.step, metrics)
        if checkpoints is not None and cell.checkpoint_due:
            checkpoints.save(cell.step, {"weights": weights.state_dict(), "optimizer": optimizer.state_dict(),
                                         **cell.checkpoint_state()})
    cell.stop_clock()
    return cell.result(model)
