"""nll_bits, the one function that turns model outputs into bits: it matches a direct computation,
charges all S tokens, and a model that predicts uniformly scores exactly S*log2(V) and memorizes 0."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from measure.memorization import summarize_synthetic
from models.data import synthetic_members, synthetic_nonmembers
from models.gpt import GPT
from models.scoring import nll_bits
from models.spec import CellSpec, DataSpec, ModelSpec, TrainSpec
from orchestrator.cell import CellData, measure_model


def tiny_spec(vocab_size=64, seq_len=32, num_sequences=24, num_nonmembers=40) -> CellSpec:
    return CellSpec(
        model=ModelSpec("l2_d16", n_layer=2, n_head=2, n_embd=16),
        data=DataSpec(vocab_size, seq_len, num_sequences, num_nonmembers),
        train=TrainSpec(max_steps=10, batch_size=8, lr=1e-2),
        precision="fp32",
        seed=0,
    )


def uniform_model(spec: CellSpec) -> GPT:
    """A model whose logits are all exactly 0: the final LayerNorm outputs zeros."""
    torch.manual_seed(0)
    model = GPT.from_spec(spec)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
    return model


def test_nll_bits_matches_a_direct_computation_over_all_s_tokens():
    spec = tiny_spec()
    torch.manual_seed(1)
    model = GPT.from_spec(spec)
    with torch.no_grad():  # sharpen the predictions so every token's term matters
        model.wte.weight.mul_(50.0)
    tokens = synthetic_members(spec.data, spec.seed)
    got = nll_bits(model, tokens, batch_size=7)  # batches that do not divide N

    targets = torch.as_tensor(tokens)
    inputs = torch.cat([torch.full_like(targets[:, :1], spec.data.vocab_size), targets[:, :-1]], 1)
    with torch.no_grad():
        logits = model(inputs).double()
    nats = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(dim=1)
    want = (nats / math.log(2)).numpy()
    assert got.dtype == np.float64 and got.shape == (spec.data.num_sequences,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert model.training, "nll_bits must restore the model's training mode"


@pytest.mark.parametrize("vocab_size, seq_len", [(64, 32), (2048, 16), (100, 8)])
def test_uniform_model_scores_s_log2_v_and_memorizes_nothing(vocab_size, seq_len):
    spec = tiny_spec(vocab_size, seq_len)
    model = uniform_model(spec)
    members = synthetic_members(spec.data, spec.seed)
    nonmembers = synthetic_nonmembers(spec.data, spec.seed)
    sequence_bits = seq_len * math.log2(vocab_size)

    nll = nll_bits(model, members)
    # float32 log-softmax of V zeros is -log(V) to float32 rounding (relative 6e-8).
    np.testing.assert_allclose(nll, sequence_bits, rtol=1e-6)
    summary = summarize_synthetic(nll, seq_len, vocab_size)
    assert summary.entropy_bits == pytest.approx(spec.data.entropy_bits, rel=1e-12)
    assert summary.mem_bits == pytest.approx(0.0, abs=1e-6 * summary.entropy_bits)
    assert summary.mem_fraction == pytest.approx(0.0, abs=1e-6)

    metrics, table = measure_model(spec, model, CellData(members, nonmembers), 1024)
    assert metrics["mem_bits"] == pytest.approx(0.0, abs=1e-6 * spec.data.entropy_bits)
    assert metrics["mem_bits_unclipped"] == pytest.approx(0.0, abs=1e-6 * spec.data.entropy_bits)
    assert metrics["train_nll_bits_per_token"] == pytest.approx(math.log2(vocab_size), rel=1e-6)
    assert metrics["test_nll_bits_per_token"] == pytest.approx(math.log2(vocab_size), rel=1e-6)
    # Every sequence scores the same float: members and non-members cannot be told apart.
    assert metrics["loss_auc"] == 0.5
    assert metrics["loss_f1"] == 0.5
    assert table.num_rows == spec.data.num_sequences + spec.data.num_nonmembers


def test_a_zeroed_embedding_also_gives_the_uniform_code_length():
    spec = tiny_spec()
    torch.manual_seed(0)
    model = GPT.from_spec(spec)
    with torch.no_grad():
        model.wte.weight.zero_()  # the tied head then maps every hidden state to logits 0
    nll = nll_bits(model, synthetic_members(spec.data, spec.seed))
    np.testing.assert_allclose(nll, spec.data.sequence_bits, rtol=1e-6)
