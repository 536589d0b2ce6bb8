"""Train one cell's GPT on its members, evaluating memorization as it goes.

`train()` reads top to bottom: build the model and optimizer, resume from the latest complete checkpoint
if there is one, then take optimizer steps until the cell is done. When to evaluate, checkpoint and stop,
and the learning rate of each step, are the rules of `models.progress.CellProgress`, which
`models.packed.train_packed` follows too. It knows nothing of MLflow or Ray: metrics leave through the
`log` callback and evaluation comes in through `evaluate`, so the same loop serves `memsweep run`, Ray
workers and the benchmarks.

How a step runs, as opposed to what it computes, is a `StepOptions` of this process, never part of a
cell's spec (nor of its id): the host never waits for the device within a step (the batch loss stays on
the device until an evaluation, or a `progress` callback, reads it), AdamW runs torch's fused kernel on
CUDA (its foreach kernel elsewhere), and `MEMSWEEP_COMPILE=<mode>` compiles the model with torch.compile
(`reduce-overhead`: CUDA graphs). On a CPU every choice but compiling gives the same numbers bit for bit;
on a GPU they agree up to float rounding.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, CheckpointStore, restore_rng
from models.data import BatchOrder
from models.gpt import GPT
from models.precision import WeightPrecision
from models.progress import CellProgress, TrainResult
from models.spec import CellSpec, SpecError, TrainSpec

LogFn = Callable[[dict[str, float], int], None]
EvaluateFn = Callable[[GPT], dict[str, float]]  # must return at least {"mem_bits": ...}
ProgressFn = Callable[[int, dict[str, float]], None]
LOSS_KEY = "train_loss_bits_per_token"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class StepOptions:
    """How training steps run (never what they compute): a choice of this process, not of the cell."""

    fused_adamw: bool = True  # torch's fused AdamW kernel on CUDA (the CPU keeps foreach: bit-exact)
    sync_every_step: bool = False  # read the loss on the host after every step, as before issue 19
    compile_mode: str | None = None  # torch.compile's mode for the model in train(); None: eager

    @classmethod
    def from_env(cls) -> StepOptions:
        """The default step, compiled when MEMSWEEP_COMPILE names a torch.compile mode ("1": default)."""
        mode = os.environ.get("MEMSWEEP_COMPILE", "").strip()
        if mode in ("", "0"):
            return cls()
        mode = "default" if mode == "1" else mode
        if mode not in COMPILE_MODES:
            raise SpecError(f"MEMSWEEP_COMPILE={mode!r}: expected 0, 1 or one of {', '.join(COMPILE_MODES)}")
        return cls(compile_mode=mode)


# The step as it ran before issue 19: a host synchronisation per step, foreach AdamW, eager. Kept for
# bench.gpu's before/after figures and the tests that pin today's step to it.
LEGACY_STEP = StepOptions(fused_adamw=False, sync_every_step=True)


class StepMetrics(dict):
    """One step's metrics for the `progress` callback. The batch loss stays on the device until it is
    read (`read`, or a callback's `metrics[LOSS_KEY]`): reading waits for the device, so a callback
    that never looks (a sweep's) never makes the host wait, and the console's progress bar still shows it."""

    def __init__(self, loss: torch.Tensor | float, read: bool):
        super().__init__()
        self._loss = loss  # nats per token: a 0-d tensor on the device, or a float already read
        if read:
            self.read()

    def read(self) -> float:
        """The loss in bits per token, read from the device once and kept under LOSS_KEY."""
        if LOSS_KEY not in self:
            self[LOSS_KEY] = float(self._loss) / math.log(2)
        return self[LOSS_KEY]

    def __missing__(self, key: str) -> float:
        if key != LOSS_KEY:
            raise KeyError(key)
        return self.read()


def to_device(values: torch.Tensor, device: torch.device, blocking: bool = False) -> torch.Tensor:
    """A host tensor on `device`. A plain copy into CUDA memory waits for every kernel queued before it
    (a host synchronisation); from pinned memory it is queued like a kernel instead."""
    if device.type != "cuda" or blocking:
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


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
    before every step, its kernel by `_use_kernel`."""
    return torch.optim.AdamW(
        weights.optimizer_params(),
        lr=hp.lr,
        betas=(hp.beta1, hp.beta2),
        weight_decay=hp.weight_decay,
        foreach=True,
    )


def _use_kernel(optimizer: torch.optim.AdamW, device: torch.device, options: StepOptions) -> None:
    """AdamW's fused kernel on CUDA when `options` ask for it, else foreach (the CPU's bit-exact path).
    Set after loading a checkpoint too: loading restores the kernel flags of the device that saved it."""
    fused = options.fused_adamw and device.type == "cuda"
    for group in optimizer.param_groups:  # (None, True): what AdamW(foreach=True) records
        group["fused"], group["foreach"] = (True, False) if fused else (None, True)
    for state in optimizer.state.values():  # the fused kernel reads its step counts on the device
        if "step" in state:
            state["step"] = state["step"].to(device if fused else "cpu", torch.float32)


def _compiled(model: GPT, options: StepOptions) -> torch.nn.Module:
    """What the training step calls: the model itself, or its torch.compile'd forward (which shares its
    weights; checkpoints and evaluations keep using `model`)."""
    return torch.compile(model, mode=options.compile_mode) if options.compile_mode else model


def _optimizer_step(model: GPT, forward: torch.nn.Module, weights: WeightPrecision,
                    optimizer: torch.optim.AdamW, targets: torch.Tensor, lr: float,
                    grad_clip: float) -> torch.Tensor:
    """One AdamW step at `lr` on `targets` ((B, S) member tokens) through `forward` (`model`, or its
    compiled form); returns the batch's mean loss in nats per token, on the device."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with weights.autocast():
        logits = forward(model.inputs_for(targets))  # (B, S, V)
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
    return loss.detach()


def train(
    spec: CellSpec,
    members: np.ndarray,
    *,
    device: torch.device,
    evaluate: EvaluateFn,
    checkpoints: CheckpointStore | None = None,
    log: LogFn = lambda metrics, step: None,
    progress: ProgressFn = lambda step, metrics: None,
    options: StepOptions | None = None,
) -> TrainResult:
    """Train `spec`'s model on `members` ((N, S) int64 tokens) and return it with its history; `options`
    (default: `StepOptions.from_env()`) choose how the steps run."""
    hp = spec.train
    options = options or StepOptions.from_env()
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
    _use_kernel(optimizer, device, options)
    cell = CellProgress.resume(spec, saved)
    forward = _compiled(model, options)

    model.train()
    trunk = None  # the trunk's weights and optimizer state while a branch runs
    while not cell.done:
        if cell.branch_due:
            trunk = copy.deepcopy((weights.state_dict(), optimizer.state_dict()))
            cell.start_branch()
        indices = to_device(torch.from_numpy(order.indices(cell.step)), device, options.sync_every_step)
        targets = data[indices]  # (B, S)
        loss = _optimizer_step(model, forward, weights, optimizer, targets, cell.learning_rate(), hp.grad_clip)
        cell.advance()
        metrics = StepMetrics(loss, read=options.sync_every_step or cell.evaluation_due)
        if cell.evaluation_due:
            metrics.update(evaluate(model))
            log(*cell.record_evaluation(metrics))
        progress(cell.step, metrics)
        if cell.branch_over:  # a(T) is measured: the trunk goes on from where the branch left it
            weights.load_state_dict(trunk[0])
            optimizer.load_state_dict(trunk[1])
            _use_kernel(optimizer, device, options)
            trunk = None
            cell.end_branch()
        if checkpoints is not None and cell.checkpoint_due:
            checkpoints.save(cell.step, {"weights": weights.state_dict(), "optimizer": optimizer.state_dict(),
                                         **cell.checkpoint_state()})
    cell.stop_clock()
    return cell.result(model)
