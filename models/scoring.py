"""Per-sequence code length in bits: the one function that turns model outputs into numbers for measure/.

nll_bits(x) = -sum_t log2 p(x_t | start, x_<t), from float32 log-softmax of the logits, summed in
float64: the arithmetic-coding length of x under the model (docs/science.md). Scoring runs in eval mode,
without gradient, in large batches, on the model's stored weights (bfloat16 weights for `bf16` cells).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from models.gpt import GPT

LN2 = math.log(2.0)


@torch.no_grad()
def nll_bits(model: GPT, tokens: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """(N, S) int tokens -> (N,) float64 code lengths in bits."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.empty(len(tokens), dtype=np.float64)
    try:
        for start in range(0, len(tokens), batch_size):
            targets = torch.as_tensor(tokens[start : start + batch_size], device=device)
            logits = model(model.inputs_for(targets)).float()  # (B, S, V)
            logp = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nats = -logp.double().sum(dim=1)  # (B,) float64 sum over the S predicted tokens
            out[start : start + len(targets)] = (nats / LN2).cpu().numpy()
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def greedy_correct(model: GPT, tokens: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """(N, S) tokens -> (N, S) bool: does the model's most likely next token, given the start token and
    the true x_<t, equal x_t?

    Greedy decoding from a prefix of k true tokens reproduces the rest of a sequence exactly if and only
    if every position t >= k is correct here: by induction, while the continuation matches, the model
    sees the true prefix. So `correct[:, k:].all(1)` is the exact-extraction test of docs/science.md, from one
    forward pass instead of S - k decoding steps (ties go to the lowest id, as torch.argmax does)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.empty(tokens.shape, dtype=bool)
    try:
        for start in range(0, len(tokens), batch_size):
            targets = torch.as_tensor(tokens[start : start + batch_size], device=device)
            predicted = model(model.inputs_for(targets)).float().argmax(dim=-1)  # (B, S)
            out[start : start + len(targets)] = (predicted == targets).cpu().numpy()
    finally:
        model.train(was_training)
    return out
