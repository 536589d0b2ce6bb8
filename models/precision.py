"""How weights are stored and updated for each precision of docs/science.md.

- fp32: float32 weights and arithmetic.
- bf16: the model's weights are bfloat16 and forward/backward run on them; AdamW updates a float32
  master copy (pure bf16 Adam rounds small updates away and stalls), which is rounded back into the
  model after every step. Measurement uses the bfloat16 weights.
- amp_bf16: float32 weights, bfloat16 autocast arithmetic; measured with the float32 weights.
"""

from __future__ import annotations

import contextlib

import torch

from models.spec import SpecError


class PrecisionUnsupported(SpecError):
    pass


def resolve_device(name: str) -> torch.device:
    """"auto" -> the first CUDA device when one exists, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device={name!r}: no CUDA device is available here")
    return device


def check_supported(precision: str, device: torch.device) -> None:
    """Refuse a bfloat16 precision on a device that lacks it (bf16 on a CPU is slow but legal)."""
    if precision in ("bf16", "amp_bf16") and device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            raise PrecisionUnsupported(f"precision={precision!r}: {name} has no bfloat16 support")


class WeightPrecision:
    """Owns the weights the optimizer updates and the autocast context of the forward pass."""

    def __init__(self, precision: str, model: torch.nn.Module, device: torch.device):
        self.precision, self.model, self.device = precision, model, device
        self.master: list[torch.Tensor] = []
        self.master_grads: list[torch.Tensor] = []  # bf16: the master copy's gradients, reused every step
        if precision == "bf16":
            model.to(torch.bfloat16)
            self.master = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
            self.master_grads = [torch.empty_like(m) for m in self.master]

    def optimizer_params(self) -> list[torch.Tensor]:
        return self.master if self.master else list(self.model.parameters())

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "amp_bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def grads_to_master(self) -> None:
        """The model's bfloat16 gradients, widened (exactly) into the master copy's gradients: one
        foreach copy rather than a cast kernel per weight."""
        params = list(self.model.parameters())
        torch._foreach_copy_(self.master_grads, [p.grad for p in params])
        for master, grad, p in zip(self.master, self.master_grads, params):
            master.grad = grad
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        torch._foreach_copy_(list(self.model.parameters()), self.master)  # rounds float32 -> bfloat16

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "master": [m.detach() for m in self.master]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for master, saved in zip(self.master, state["master"]):
            master.copy_(saved)
