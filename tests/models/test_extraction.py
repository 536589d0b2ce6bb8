"""Extraction (docs/science.md, "Text"): greedy continuation from a prefix, checked against real decoding."""

import numpy as np
import torch

from models.gpt import GPT
from measure.cell import extraction_rates
from models.scoring import greedy_correct


@torch.no_grad()
def greedy_decode(model: GPT, tokens: np.ndarray, prefix: int) -> np.ndarray:
    """Plain greedy decoding: feed the start token and the prefix, append the argmax, repeat."""
    model.eval()
    out = torch.as_tensor(tokens[:, :prefix]).clone()
    start = torch.full((len(tokens), 1), model.start_token)
    while out.shape[1] < tokens.shape[1]:
        logits = model(torch.cat([start, out], dim=1))[:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out.numpy()


def memorizing_model(tokens: np.ndarray, steps: int = 300) -> GPT:
    torch.manual_seed(0)
    model = GPT(vocab_size=12, seq_len=tokens.shape[1], n_layer=1, n_head=2, n_embd=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.as_tensor(tokens)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(model.inputs_for(data)).flatten(0, 1), data.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def test_one_pass_extraction_equals_greedy_decoding():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 12, size=(24, 20))
    model = memorizing_model(train[:12])  # half memorized, half never seen
    correct = greedy_correct(model, train, batch_size=7)
    for prefix in (2, 8, 16):
        decoded = greedy_decode(model, train, prefix)
        exact = (decoded == train).all(axis=1)
        assert np.array_equal(correct[:, prefix:].all(axis=1), exact), prefix
        assert extraction_rates(correct, (prefix,))[prefix] == exact.mean()
    rates = extraction_rates(correct, (8,))
    assert rates[8] >= 0.4, "the memorized half is extracted"  # fails if scoring is off by a position
    assert not correct[12:, 8:].all(axis=1).any(), "unseen random sequences are not"


def test_prefixes_as_long_as_the_sequence_are_left_out():
    correct = np.ones((3, 16), dtype=bool)
    assert set(extraction_rates(correct, (8, 16, 32))) == {8}
