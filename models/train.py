"""Train one cell's GPT on its members, evaluating memorization as it goes.

`train()` reads top to bottom: build the model and optimizer, resume from the latest complete checkpoint
if there is one, then step until `max_steps` or until mem_bits has converged, evaluating every
`eval_interval` steps and checkpointing every `checkpoint_interval` steps and at the end. It knows
nothing of MLflow or Ray: metrics leave through the `log` callback and evaluation comes in through
`evaluate`, so the same loop serves `memsweep run`, Ray workers and the benchmarks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, CheckpointStore
from models.data import BatchOrder
from models.gpt import GPT
from models.precision import WeightPrecision
from models.spec import CellSpec, TrainSpec

LogFn = Callable[[dict[str, float], int], None]
EvaluateFn = Callable[[GPT], dict[str, float]]  # must return at least {"mem_bits": ...}
ProgressFn = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    model: GPT
    steps: int  # optimizer steps taken in total, across resumes
    converged: bool
    resumed_from_step: int  # 0 for a fresh start
    wall_s: float  # training wall time, summed across resumes
    tokens_per_s: float  # training throughput of this process
    mem_history: list[tuple[int, float]] = field(default_factory=list)  # (step, mem_bits)


def learning_rate(train: TrainSpec, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` (or constant)."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    floor = train.min_lr_ratio * train.lr
    return floor + 0.5 * (train.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def has_converged(history: list[tuple[int, float]], train: TrainSpec) -> bool:
    """mem_bits moved by less than `converge_tol` (relative) across the last `converge_window` evals."""
    if len(history) < train.converge_window:
        return False
    recent = [value for _, value in history[-train.converge_window :]]
    top = max(recent)
    return top > 0 and (top - min(recent)) / top < train.converge_tol


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    optimizer = torch.optim.AdamW(
        weights.optimizer_params(),
        lr=hp.lr,
        betas=(hp.beta1, hp.beta2),
        weight_decay=hp.weight_decay,
        foreach=True,
    )
    order = BatchOrder(spec.data, spec.seed, hp.batch_size)
    data = torch.as_tensor(members, device=device)

    step, history, prior_wall_s = 0, [], 0.0
    saved = checkpoints.load_latest(map_location=device) if checkpoints else None
    if saved is not None:
        weights.load_state_dict(saved["weights"])
        optimizer.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"])
        step, prior_wall_s = saved["step"], saved["wall_s"]
        history = [(int(s), float(v)) for s, v in saved["mem_history"]]
    resumed_from_step = step
    converged = has_converged(history, hp)

    start = time.perf_counter()  # wall time of this session, added to the checkpointed total

    def save() -> None:
        if checkpoints is not None:
            checkpoints.save(step, {
                "weights": weights.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(),
                "wall_s": prior_wall_s + time.perf_counter() - start,
                "mem_history": [[s, v] for s, v in history],
            })

    model.train()
    while step < hp.max_steps and not converged:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(hp, step)
        targets = data[torch.as_tensor(order.indices(step), device=device)]  # (B, S)
        with weights.autocast():
            logits = model(model.inputs_for(targets))  # (B, S, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # nats per token
        loss.backward()
        if weights.master:
            weights.grads_to_master()
        if hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(weights.optimizer_params(), hp.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if weights.master:
            weights.master_to_model()
        step += 1

        metrics = {"train_loss_bits_per_token": loss.item() / math.log(2)}
        if step % hp.eval_interval == 0 or step == hp.max_steps:
            metrics.update(evaluate(model))
            history.append((step, metrics["mem_bits"]))
            converged = has_converged(history, hp)
            log(metrics, step)
        progress(step, metrics)
        if step % hp.checkpoint_interval == 0 and not converged and step < hp.max_steps:
            save()

    session_s = time.perf_counter() - start
    if step > resumed_from_step:
        save()  # the final state, so a retry after a tracking failure does not retrain
    tokens = (step - resumed_from_step) * hp.batch_size * spec.data.seq_len
    return TrainResult(
        model=model,
        steps=step,
        converged=converged,
        resumed_from_step=resumed_from_step,
        wall_s=prior_wall_s + session_s,
        tokens_per_s=tokens / session_s if session_s > 0 else 0.0,
        mem_history=history,
    )
