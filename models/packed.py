"""Packed training: K cells of one shape trained as one model whose every weight has a leading cell
dimension, so one forward/backward (batched matrix products) trains K models at once.

Cells of a pack share shape, precision, training recipe, vocabulary and sequence length; they differ in
dataset size and seed. Each cell keeps what `models.train.train` gives it alone: its own data and batch
order, its mean loss (the pack minimises the sum, so each cell's gradient is its separate gradient), its
gradient clip (a per-cell global norm), its AdamW state, its callbacks, and its `CellProgress`
(models/progress.py: the learning rate per step, when to evaluate, checkpoint and stop, exactly train()'s
rules), with checkpoints in `train()`'s format, so a packed cell resumes alone and vice versa. A cell that stops (converged, or at `max_steps`) is dropped from the pack, so it is
frozen exactly and costs nothing more.

All weights of the pack live in one (K, P) buffer, row k holding cell k's parameters flattened in
`GPT.named_parameters()` order; each weight is a (K, ...) view into it. Gradients land in a second
(K, P) buffer, so per-cell clipping and AdamW are a handful of ops on two (K, P) tensors.

`torch.func.vmap` over the stock GPT is not used: its CPU attention falls back to a per-sample loop.
Here attention is one `scaled_dot_product_attention` over (K*B, heads, S, head_dim).

Precisions: fp32, bf16 (bfloat16 weights, float32 master copy and AdamW state) and amp_bf16 (autocast).

Two ways to sum per cell (`exact`): on a CPU (the default there) the LayerNorm backward and the clipping
norms run cell by cell in the order a lone cell sums them, so a packed cell equals the separately trained
one bit for bit; that costs a few percent on a CPU but one kernel launch per cell and layer on a GPU,
where cuBLAS picks other algorithms for batched products anyway and bit-equality cannot hold. So on a
GPU (the default there) those reductions are batched over the cells too, equal up to float rounding
(32 cells of l1_d32 on an H200: 18.6x faster than one after another batched, 7.1x exact).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoint import CheckpointStore
from models.data import BatchOrder
from models.gpt import GPT
from models.spec import CellSpec, SpecError, pack_key
from models.progress import CellProgress, TrainResult
from models.train import EvaluateFn, LogFn, ProgressFn, StepMetrics, StepOptions, to_device

ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which train() uses
# Weights and gradients are strided views into (K, P) buffers on purpose; autograd accumulates into
# them in place and warns that such views are not its preferred layout.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


def check_packable(specs: list[CellSpec]) -> None:
    if not specs:
        raise SpecError("a pack needs at least one cell")
    first = pack_key(specs[0])
    for spec in specs[1:]:
        if pack_key(spec) != first:
            raise SpecError(f"cell {spec.cell_id} cannot share a pack with {specs[0].cell_id}: shape, "
                            "vocabulary, sequence length, precision and recipe must be equal")


@dataclass(frozen=True)
class _Slot:
    name: str  # GPT parameter name
    shape: torch.Size
    offset: int  # into a row of the (K, P) buffer
    numel: int


class _CellLayerNorm(torch.autograd.Function):
    """Per-cell LayerNorm of (K, R, C) with each cell's own (K, C) scale and shift, bit for bit what
    nn.LayerNorm computes on each cell alone. The forward and the input gradient are batched over the
    cells; the backward runs LayerNorm's own kernel per cell, because any other order of its sums
    differs in the last bit, and Adam amplifies such differences into visibly different weights
    within a hundred steps."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, 1e-5)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return torch.addcmul(bias.unsqueeze(1), y, weight.unsqueeze(1))

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        shape = (x.shape[-1],)
        dx, dw, db = zip(*(torch.ops.aten.native_layer_norm_backward(
            dy[k], x[k], shape, mean[k], rstd[k], weight[k], bias[k], [True, True, True])
            for k in range(x.shape[0])))
        return torch.stack(dx), torch.stack(dw), torch.stack(db)


class PackedGPT(nn.Module):
    """K GPTs of one shape; `forward` maps (K, B, T) input ids to (K, B, T, V) logits."""

    def __init__(self, template: GPT, num_cells: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", exact: bool = True):
        super().__init__()
        self.exact = exact  # per-cell LayerNorm backward, bit-equal to a lone cell (see the module doc)
        self.vocab_size, self.seq_len = template.vocab_size, template.seq_len
        self.start_token = template.start_token
        self.n_layer = len(template.blocks)
        self.n_head = template.blocks[0].attn.n_head if self.n_layer else 1
        self.n_embd = template.wte.weight.shape[1]
        slots, offset = [], 0
        for name, p in template.named_parameters():
            slots.append(_Slot(name, p.shape, offset, p.numel()))
            offset += p.numel()
        self.slots, self.row_size = slots, offset
        self.flat = torch.zeros(num_cells, offset, dtype=dtype, device=device)  # (K, P) weights
        self.grad = torch.zeros_like(self.flat)  # (K, P) gradients, accumulated in place
        self._rebind()

    @property
    def num_cells(self) -> int:
        return self.flat.shape[0]

    def _rebind(self) -> None:
        """Point every weight (and its .grad) at its columns of the (K, P) buffers."""
        K = self.flat.shape[0]
        # Fresh leaves each time: autograd caches a leaf's shape, so resizing `.data` in place breaks it.
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(0, dtype=self.flat.dtype)) for _ in self.slots)
        for slot, p in zip(self.slots, self.weights):
            cols = slice(slot.offset, slot.offset + slot.numel)
            p.data = self.flat[:, cols].view(K, *slot.shape)
            p.grad = self.grad[:, cols].view(K, *slot.shape)
        self.w = {slot.name: p for slot, p in zip(self.slots, self.weights)}

    @torch.no_grad()
    def keep(self, rows: list[int]) -> None:
        """Keep only the cells at `rows` (in that order)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.flat.device)
        self.flat = self.flat.index_select(0, index)
        self.grad = torch.zeros_like(self.flat)
        self._rebind()

    # -- conversions between a row and a stock GPT ---------------------------------------------------
    @staticmethod
    def flatten_state(state: dict[str, torch.Tensor], slots: list[_Slot]) -> torch.Tensor:
        return torch.cat([state[s.name].reshape(-1) for s in slots])

    def row_state(self, row: int) -> dict[str, torch.Tensor]:
        """Cell `row`'s weights as a GPT state dict (copies)."""
        return {s.name: self.flat[row, s.offset : s.offset + s.numel].view(s.shape).clone() for s in self.slots}

    @torch.no_grad()
    def load_row(self, row: int, state: dict[str, torch.Tensor]) -> None:
        self.flat[row].copy_(self.flatten_state(state, self.slots))

    @torch.no_grad()
    def to_gpt(self, row: int, into: GPT | None = None) -> GPT:
        """A stock GPT holding cell `row`'s weights (in the pack's dtype); `into` is reused if given."""
        if into is None:
            with torch.random.fork_rng(devices=[]):  # GPT's init must not move the global RNG
                into = GPT(self.vocab_size, self.seq_len, self.n_layer, self.n_head, self.n_embd)
            into.to(device=self.flat.device, dtype=self.flat.dtype)
        for name, p in into.named_parameters():
            slot = next(s for s in self.slots if s.name == name)
            p.copy_(self.flat[row, slot.offset : slot.offset + slot.numel].view(slot.shape))
        return into

    # -- forward -------------------------------------------------------------------------------------
    def inputs_for(self, tokens: torch.Tensor) -> torch.Tensor:
        """(K, B, S) targets -> (K, B, S) inputs: the start token followed by x_1..x_{S-1}."""
        start = torch.full_like(tokens[..., :1], self.start_token)
        return torch.cat([start, tokens[..., :-1]], dim=-1)

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(K, R, in) @ (K, out, in)^T + (K, out) -> (K, R, out)."""
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    def _layer_norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        weight, bias = self.w[f"{prefix}.weight"], self.w[f"{prefix}.bias"]
        if self.exact:
            return _CellLayerNorm.apply(x, weight, bias)
        return torch.addcmul(bias.unsqueeze(1), F.layer_norm(x, (x.shape[-1],)), weight.unsqueeze(1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(K, B, T) input ids -> (K, B, T, V) logits over the real vocabulary."""
        K, B, T = inputs.shape
        C, H, w = self.n_embd, self.n_head, self.w
        rows = w["wte.weight"].shape[1]  # V + 1
        # Each cell reads its own embedding table: offset the ids into the (K*(V+1), C) stack.
        ids = inputs + (torch.arange(K, device=inputs.device) * rows).view(K, 1, 1)
        x = F.embedding(ids.view(K, B * T), w["wte.weight"].reshape(K * rows, C))  # (K, B*T, C)
        x = (x.view(K, B, T, C) + w["wpe.weight"][:, :T].unsqueeze(1)).view(K, B * T, C)
        for i in range(self.n_layer):
            p = f"blocks.{i}"
            h = self._layer_norm(x, f"{p}.ln_1")
            qkv = self._linear(h, w[f"{p}.attn.c_attn.weight"], w[f"{p}.attn.c_attn.bias"])  # (K, B*T, 3C)
            q, k, v = (t.reshape(K * B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (K*B, H, T, hd)
            y = y.transpose(1, 2).reshape(K, B * T, C)
            x = x + self._linear(y, w[f"{p}.attn.c_proj.weight"], w[f"{p}.attn.c_proj.bias"])
            h = self._layer_norm(x, f"{p}.ln_2")
            h = F.gelu(self._linear(h, w[f"{p}.mlp.c_fc.weight"], w[f"{p}.mlp.c_fc.bias"]))
            x = x + self._linear(h, w[f"{p}.mlp.c_proj.weight"], w[f"{p}.mlp.c_proj.bias"])
        x = self._layer_norm(x, "ln_f")
        logits = torch.bmm(x, w["wte.weight"][:, : self.vocab_size].transpose(1, 2))  # tied head
        return logits.view(K, B, T, self.vocab_size)

    @classmethod
    def from_specs(cls, specs: list[CellSpec], device: torch.device | str = "cpu",
                   exact: bool = True) -> "PackedGPT":
        """Row k initialised exactly as `train()` initialises cell k alone: seed, then GPT's init."""
        check_packable(specs)
        rows = []
        for spec in specs:
            torch.manual_seed(spec.seed)
            rows.append(GPT.from_spec(spec))
        packed = cls(rows[0], len(specs), device=device, exact=exact)
        for k, model in enumerate(rows):
            packed.load_row(k, dict(model.named_parameters()))
        return packed


class PackedAdamW:
    """K AdamWs over the (K, P) buffers, each with its own step count and learning rate; the same
    arithmetic as torch.optim.AdamW(foreach=True), so a row's trajectory is the separate cell's."""

    def __init__(self, num_cells: int, row_size: int, betas: tuple[float, float], weight_decay: float,
                 device: torch.device | str = "cpu"):
        self.beta1, self.beta2 = betas
        self.weight_decay = weight_decay
        self.exp_avg = torch.zeros(num_cells, row_size, device=device)
        self.exp_avg_sq = torch.zeros(num_cells, row_size, device=device)
        self.steps = [0] * num_cells

    def keep(self, rows: list[int]) -> None:
        index = torch.as_tensor(rows, dtype=torch.long, device=self.exp_avg.device)
        self.exp_avg = self.exp_avg.index_select(0, index)
        self.exp_avg_sq = self.exp_avg_sq.index_select(0, index)
        self.steps = [self.steps[r] for r in rows]

    @torch.no_grad()
    def step(self, params: torch.Tensor, grads: torch.Tensor, lrs: list[float], blocking: bool = False) -> None:
        """params, grads: (K, P) float32; lrs: each cell's learning rate for this step. The per-cell
        coefficients go to the device in one copy (`blocking`: one that waits for it, as before issue 19)."""
        self.steps = [s + 1 for s in self.steps]
        decay = [1 - lr * self.weight_decay for lr in lrs]
        step_size = [(lr / (1 - self.beta1**s)) * -1 for lr, s in zip(lrs, self.steps)]
        bias_correction2_sqrt = [(1 - self.beta2**s) ** 0.5 for s in self.steps]
        coefficients = torch.tensor([decay, step_size, bias_correction2_sqrt], dtype=torch.float32)
        decay, step_size, bias_correction2_sqrt = to_device(coefficients, params.device, blocking).unsqueeze(2)
        if self.weight_decay != 0:
            params.mul_(decay)
        self.exp_avg.lerp_(grads, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grads, grads, value=1 - self.beta2)
        denom = self.exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(ADAM_EPS)
        params.add_(self.exp_avg.mul(step_size).div_(denom))  # addcdiv's order: (s * m) / d

    # -- one row in torch.optim.AdamW's state_dict format -------------------------------------------
    def row_state(self, row: int, slots: list[_Slot], template: dict) -> dict:
        state = {}
        if self.steps[row] > 0:
            for i, s in enumerate(slots):
                cols = slice(s.offset, s.offset + s.numel)
                state[i] = {"step": torch.tensor(float(self.steps[row])),
                            "exp_avg": self.exp_avg[row, cols].view(s.shape).clone(),
                            "exp_avg_sq": self.exp_avg_sq[row, cols].view(s.shape).clone()}
        return {"state": state, "param_groups": template["param_groups"]}

    @torch.no_grad()
    def load_row(self, row: int, saved: dict, slots: list[_Slot]) -> None:
        state = saved["state"]
        if not state:
            self.exp_avg[row].zero_()
            self.exp_avg_sq[row].zero_()
            self.steps[row] = 0
            return
        self.exp_avg[row].copy_(torch.cat([state[i]["exp_avg"].reshape(-1).float() for i in range(len(slots))]))
        self.exp_avg_sq[row].copy_(torch.cat([state[i]["exp_avg_sq"].reshape(-1).float() for i in range(len(slots))]))
        self.steps[row] = int(float(state[0]["step"]))


def _optimizer_template(spec: CellSpec, model: GPT) -> dict:
    """The param_groups entry train()'s torch.optim.AdamW writes, so packed checkpoints match."""
    hp = spec.train
    params = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=hp.lr, betas=(hp.beta1, hp.beta2), weight_decay=hp.weight_decay,
                            foreach=True)
    return opt.state_dict()


def _clip_norms(grads: torch.Tensor, slots: list[_Slot], exact: bool = True) -> torch.Tensor:
    """(K, P) gradients -> (K, 1) global norms. `exact`: summed in clip_grad_norm_'s order (each
    weight's norm over its contiguous gradient, then the norm of those): a batched row reduction sums
    in another order, and one flipped last bit once clipping starts is enough to part the trajectories.
    Otherwise one batched reduction over the rows (equal up to float rounding)."""
    if not exact:
        return torch.linalg.vector_norm(grads, dim=1, keepdim=True)
    pieces = [grads[k, s.offset : s.offset + s.numel] for k in range(grads.shape[0]) for s in slots]
    per_weight = torch.stack(torch._foreach_norm(pieces)).view(grads.shape[0], len(slots))  # (K, W)
    return torch.stack([torch.linalg.vector_norm(row) for row in per_weight]).unsqueeze(1)


class _Pack:
    """The tensors of a pack: its K GPTs as one PackedGPT, their AdamWs, and the weights AdamW updates
    (the model's own in fp32 and amp_bf16; a float32 master copy of its bfloat16 ones in bf16). Row r
    of each is the r-th cell still training."""

    def __init__(self, specs: list[CellSpec], device: torch.device, exact: bool):
        hp, precision = specs[0].train, specs[0].precision
        self.model = PackedGPT.from_specs(specs, device=device, exact=exact)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.template = _optimizer_template(specs[0], self.model.to_gpt(0))
        self.optimizer = PackedAdamW(len(specs), self.model.row_size, (hp.beta1, hp.beta2), hp.weight_decay,
                                     device=device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "amp_bf16"
                         else contextlib.nullcontext())
        self.grad_clip, self.exact = hp.grad_clip, exact
        self.master = self.model.flat  # (K, P) float32: what AdamW updates
        self.saved_masters: dict[int, torch.Tensor] = {}  # bf16: resumed rows' float32 masters, (P,)
        self.scratch: GPT | None = None  # set by `start`: the stock GPT evaluation callbacks receive

    def load(self, row: int, saved: dict) -> None:
        """Row `row` from a checkpoint in train()'s format (before `start`)."""
        self.model.load_row(row, saved["weights"]["model"])
        if saved["weights"]["master"]:  # bf16: the float32 master is what AdamW updates
            self.saved_masters[row] = torch.cat([m.reshape(-1).float() for m in saved["weights"]["master"]])
        self.optimizer.load_row(row, saved["optimizer"], self.model.slots)

    def start(self) -> None:
        """Set the precision once every row is loaded. bf16: the weights become bfloat16 and `master`
        their float32 copy."""
        model = self.model
        if self.dtype != torch.float32:
            model.flat = model.flat.to(self.dtype)
            self.master = model.flat.float()  # a fresh cell's master starts from its rounded weights ...
            for row, saved_master in self.saved_masters.items():
                self.master[row].copy_(saved_master)  # ... a resumed cell's from its saved master
            model.grad = torch.zeros_like(model.flat)
            model._rebind()
        self.scratch = model.to_gpt(0)  # in the pack's dtype, refilled with each cell's row

    def step(self, targets: torch.Tensor, lrs: list[float], blocking: bool = False) -> torch.Tensor:
        """One AdamW step of every row on its (B, S) batch of `targets` ((K, B, S) tokens), row k at
        learning rate `lrs[k]`; returns each row's mean loss in nats per token, (K,) on the device."""
        model = self.model
        with self.autocast:
            logits = model(model.inputs_for(targets))  # (K, B, S, V)
        losses = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), reduction="none")
        losses = losses.view(len(targets), -1).mean(dim=1)  # (K,) nats per token, each cell's mean
        losses.sum().backward()  # cells share no weights: each row's gradient is its own
        grads = model.grad if self.dtype == torch.float32 else model.grad.float()
        if self.grad_clip > 0:  # clip_grad_norm_ per cell: each row's global norm
            norms = _clip_norms(grads, model.slots, self.exact)  # (K, 1)
            grads.mul_(torch.clamp(self.grad_clip / (norms + 1e-6), max=1.0))
        self.optimizer.step(self.master, grads, lrs, blocking)
        model.grad.zero_()
        if self.dtype != torch.float32:
            model.flat.copy_(self.master)  # rounds float32 -> bfloat16
        return losses.detach()

    def snapshot(self, row: int) -> tuple:
        """Row `row`'s weights, float32 master and AdamW state (copies): a trunk kept while its branch
        runs."""
        optimizer = self.optimizer
        master = None if self.master is self.model.flat else self.master[row].clone()
        return (self.model.flat[row].clone(), master, optimizer.exp_avg[row].clone(),
                optimizer.exp_avg_sq[row].clone(), optimizer.steps[row])

    @torch.no_grad()
    def restore(self, row: int, saved: tuple) -> None:
        """Row `row` back to what `snapshot` kept."""
        weights, master, exp_avg, exp_avg_sq, steps = saved
        self.model.flat[row].copy_(weights)
        if master is not None:
            self.master[row].copy_(master)
        self.optimizer.exp_avg[row].copy_(exp_avg)
        self.optimizer.exp_avg_sq[row].copy_(exp_avg_sq)
        self.optimizer.steps[row] = steps

    def checkpoint(self, row: int) -> dict:
        """Row `row`'s weights and AdamW state, in train()'s checkpoint format."""
        slots = self.model.slots
        master = ([] if self.dtype == torch.float32 else
                  [self.master[row, s.offset : s.offset + s.numel].view(s.shape).clone() for s in slots])
        return {"weights": {"model": self.model.row_state(row), "master": master},
                "optimizer": self.optimizer.row_state(row, slots, self.template)}

    def drop_finished(self, cells: list[_PackedCell]) -> list[_PackedCell]:
        """The cells (one per row) that go on training; the others leave the pack, a stopped cell
        with its final weights."""
        keep = []
        for row, cell in enumerate(cells):
            if cell.error is None and not cell.progress.done:
                keep.append(row)
                continue
            if cell.error is None:
                cell.final = self.model.to_gpt(row)
            cell.progress.stop_clock()
        if len(keep) < len(cells):
            self.model.keep(keep)
            self.optimizer.keep(keep)
            self.master = self.model.flat if self.dtype == torch.float32 else self.master.index_select(
                0, torch.as_tensor(keep, dtype=torch.long, device=self.master.device))
        return [cells[row] for row in keep]


@dataclass
class _PackedCell:
    """One cell of a pack: its place in the caller's lists and in the concatenated data, its callbacks,
    its progress (train()'s rules) and how it left the pack: with its final weights, or with the error
    that took it out (with `isolate_errors`; otherwise the error propagates)."""

    index: int  # position in the caller's lists
    spec: CellSpec
    order: BatchOrder
    offset: int  # first row of its members in the concatenated data
    evaluate: EvaluateFn
    log: LogFn
    report: ProgressFn
    store: CheckpointStore | None
    isolate_errors: bool
    progress: CellProgress = field(init=False)  # set when the pack resumes it
    trunk: tuple | None = None  # the trunk's row (`_Pack.snapshot`) while a branch runs
    final: GPT | None = None
    error: BaseException | None = None

    def call(self, fn, *args):
        """fn(*args). With `isolate_errors` an exception becomes the cell's `error` (it leaves the pack
        at the next `drop_finished`) and None is returned; otherwise it propagates."""
        try:
            return fn(*args)
        except Exception as err:
            if not self.isolate_errors:
                raise
            self.error = err
            return None

    def resume(self, pack: _Pack, device: torch.device) -> None:
        """Load this cell's row and progress from its latest checkpoint, if it has one."""
        saved = self.call(self.store.load_latest, device) if self.store is not None else None
        if saved is not None:
            pack.load(self.index, saved)
        self.progress = CellProgress.resume(self.spec, saved)

    def after_step(self, pack: _Pack, row: int, loss_nats: torch.Tensor | float, read: bool) -> None:
        """What train() does after each optimizer step, for this cell at row `row` of the pack; its
        loss (on the device, or `read` already) is read at evaluations, or when `read` asks."""
        progress = self.progress
        progress.advance()
        metrics = StepMetrics(loss_nats, read=read or progress.evaluation_due)
        if progress.evaluation_due:
            result = self.call(self.evaluate, pack.model.to_gpt(row, pack.scratch))
            if result is None:
                return
            metrics.update(result)
            self.call(self.log, *progress.record_evaluation(metrics))
        self.call(self.report, progress.step, metrics)
        if progress.branch_over:  # a(T) is measured: the trunk goes on from where the branch left it
            pack.restore(row, self.trunk)
            self.trunk = None
            progress.end_branch()
        if self.error is None and self.store is not None and progress.checkpoint_due:
            self.call(self.save, pack, row)

    def save(self, pack: _Pack, row: int) -> None:
        self.store.save(self.progress.step, {**pack.checkpoint(row), **self.progress.checkpoint_state()})

    def result(self) -> TrainResult | BaseException:
        if self.error is not None:
            return self.error
        self.final.train()
        return self.progress.result(self.final)


def train_packed(
    specs: list[CellSpec],
    members_list: list[np.ndarray],
    *,
    device: torch.device,
    evaluates: list[EvaluateFn],
    checkpoints: list[CheckpointStore] | None = None,
    logs: list[LogFn] | None = None,
    progresses: list[ProgressFn] | None = None,
    isolate_errors: bool = False,
    exact: bool | None = None,
    options: StepOptions | None = None,
) -> list[TrainResult | BaseException]:
    """Train the cells of `specs` together; result k equals `train(specs[k], members_list[k], ...)` up
    to float rounding (bit for bit with `exact`, the default on a CPU; see the module doc). With
    `isolate_errors`, a cell whose checkpoint, evaluation or callback raises leaves the pack and its
    entry is the exception; the others go on. Otherwise the error propagates. Of `options` (default
    `StepOptions.from_env()`) a pack follows `sync_every_step`; its AdamW is its own and it is not
    compiled."""
    check_packable(specs)
    sync = (options or StepOptions.from_env()).sync_every_step
    exact = device.type == "cpu" if exact is None else exact
    K, hp = len(specs), specs[0].train
    logs = logs or [lambda metrics, step: None] * K
    progresses = progresses or [lambda step, metrics: None] * K
    stores = checkpoints or [None] * K

    pack = _Pack(specs, device, exact)
    offsets = np.cumsum([0] + [len(m) for m in members_list[:-1]])
    data = torch.as_tensor(np.concatenate(members_list), device=device)  # (sum N, S)
    cells = [_PackedCell(k, spec, BatchOrder(spec.data, spec.seed, hp.batch_size), int(offsets[k]), evaluates[k],
                         logs[k], progresses[k], stores[k], isolate_errors) for k, spec in enumerate(specs)]
    for cell in cells:  # each from its own latest checkpoint
        cell.resume(pack, device)
    pack.start()

    active = pack.drop_finished(cells)
    pack.model.train()
    while active:
        for row, cell in enumerate(active):
            if cell.progress.branch_due:  # keep the trunk's row; a cool-down branch starts from it
                cell.trunk = pack.snapshot(row)
                cell.progress.start_branch()
        lrs = [cell.progress.learning_rate() for cell in active]
        index = np.concatenate([cell.order.indices(cell.progress.step) + cell.offset for cell in active])
        rows = to_device(torch.from_numpy(index), device, sync)
        targets = data[rows].view(len(active), hp.batch_size, -1)  # (K, B, S)
        losses = pack.step(targets, lrs, sync)
        for row, (cell, loss) in enumerate(zip(active, losses.tolist() if sync else losses)):
            cell.after_step(pack, row, loss, read=sync)
        active = pack.drop_finished(active)
    return [cell.result() for cell in cells]
