"""The GPT of docs/science.md: GPT-2 blocks, a start token, a tied output head, no dropout.

Every one of the S tokens is predicted: the model reads the start token (id V, an extra embedding row)
followed by x_1..x_{S-1} and predicts x_1..x_S. The head is tied to the first V rows of the token
embedding (the start token is never a prediction). `forward` returns logits; losses are computed where
they are used.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.spec import CellSpec


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm GPT-2 block: 12 d^2 + 13 d parameters."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.start_token = vocab_size  # id of the extra embedding row
        self.wte = nn.Embedding(vocab_size + 1, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @classmethod
    def from_spec(cls, spec: CellSpec) -> "GPT":
        m, d = spec.model, spec.data
        return cls(d.vocab_size, d.seq_len, m.n_layer, m.n_head, m.n_embd)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def num_params(self) -> int:
        """Every trainable parameter, the start-token row included (docs/science.md's `params`)."""
        return sum(p.numel() for p in self.parameters())

    def inputs_for(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) targets -> (B, S) inputs: the start token followed by x_1..x_{S-1}."""
        start = torch.full_like(tokens[:, :1], self.start_token)
        return torch.cat([start, tokens[:, :-1]], dim=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T) input ids -> (B, T, V) logits over the real vocabulary (never the start token)."""
        T = inputs.shape[1]
        positions = torch.arange(T, device=inputs.device)
        x = self.wte(inputs) + self.wpe(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return F.linear(x, self.wte.weight[: self.vocab_size])  # tied head, (B, T, V)
