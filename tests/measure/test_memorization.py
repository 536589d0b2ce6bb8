"""Memorized bits, entropies and parameter counts against hand arithmetic."""

import numpy as np
import pytest

from measure.memorization import (
    dataset_entropy_bits,
    mem_bits_against_reference,
    mem_bits_floor,
    mem_bits_per_sequence,
    params_paper,
    predicted_mem_bits,
    sequence_entropy_bits,
    summarize_synthetic,
)


def test_entropy_is_seq_len_times_log2_vocab():
    assert sequence_entropy_bits(64, 2048) == 64 * 11
    assert dataset_entropy_bits(4096, 64, 2048) == 4096 * 64 * 11


def test_uniform_logits_memorize_nothing():
    # Equal logits give every token probability 1/V: nll = S * log2(V) exactly.
    seq_len, vocab_size = 16, 256
    nll_bits = np.full(10, seq_len * np.log2(vocab_size))
    np.testing.assert_array_equal(mem_bits_per_sequence(nll_bits, seq_len, vocab_size), 0.0)
    assert summarize_synthetic(nll_bits, seq_len, vocab_size).mem_bits == 0.0


def test_summarize_hand_example():
    # S=4, V=16: 16 bits per sequence. Code lengths 10, 16, 20 -> clipped mem 6, 0, 0.
    summary = summarize_synthetic(np.array([10.0, 16.0, 20.0]), seq_len=4, vocab_size=16)
    assert summary.entropy_bits == 48.0
    assert summary.mem_bits == 6.0
    assert summary.mem_bits_unclipped == 48.0 - 46.0
    assert summary.mem_fraction == pytest.approx(6.0 / 48.0)


def test_summarize_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        summarize_synthetic(np.array([1.0, np.nan]), seq_len=4, vocab_size=16)


def test_reference_form_clips_at_zero():
    got = mem_bits_against_reference(np.array([5.0, 9.0]), ref_nll_bits=np.array([8.0, 7.0]))
    np.testing.assert_array_equal(got, [3.0, 0.0])


def test_predicted_mem_is_min_of_capacity_and_entropy():
    got = predicted_mem_bits(3.6, np.array([100.0, 1000.0]), np.array([1000.0, 1000.0]))
    np.testing.assert_allclose(got, [360.0, 1000.0])
    assert predicted_mem_bits(2.0, 10, 5.0) == 5.0


def test_params_paper_hand_count():
    # V=16, S=4, one block of width 2: 32 + 8 + (48 + 26) + 4.
    assert params_paper(16, 4, 1, 2) == 118


def test_capacity_sequences_put_h_x_at_the_multiple_of_the_capacity():
    from measure.memorization import capacity_sequences, params_paper

    for v, s, layers, width in [(64, 32, 1, 16), (2048, 64, 1, 32), (2048, 64, 8, 256), (50257, 128, 2, 64)]:
        params = params_paper(v, s, layers, width)
        for multiple in (0.25, 1, 4):
            n = capacity_sequences(3.83, params, s, v, multiple)
            entropy = dataset_entropy_bits(n, s, v)
            # the nearest whole number of sequences: within half a sequence of the exact multiple
            assert abs(entropy - multiple * 3.83 * params) <= 0.5 * s * np.log2(v) + 1e-6
    assert capacity_sequences(3.6, 10, 64, 2048, 0.25) == 1  # never zero sequences
    with pytest.raises(ValueError):
        capacity_sequences(3.6, 1000, 64, 2048, 0)


def test_the_noise_floor_of_a_uniform_model_is_zero_and_scales_the_non_members_to_n():
    """A model that codes every sequence at exactly S log2 V (uniform) scores 0 on the non-members; one
    that codes them with noise around it keeps the half it happens to code shorter: the floor is that
    clipped sum scaled by N / M, and a trained model's mem_bits means something only above it."""
    seq_len, vocab = 32, 64
    uniform = np.full(256, seq_len * np.log2(vocab))
    assert mem_bits_floor(uniform, seq_len, vocab, num_members=1000) == 0.0
    noisy = uniform + np.tile([-2.0, +2.0], 128)  # half the non-members 2 bits shorter, half 2 longer
    assert mem_bits_floor(noisy, seq_len, vocab, num_members=1000) == pytest.approx(128 * 2.0 * 1000 / 256)
    with pytest.raises(ValueError, match="no non-members"):
        mem_bits_floor(np.array([]), seq_len, vocab, num_members=10)


def test_a_cell_reports_its_noise_floor_beside_mem_bits():
    from measure.cell import CellShape, Scores, measure_cell

    shape = CellShape("synthetic", 32, 64, params=100, params_paper=100, precision="fp32")
    rng = np.random.default_rng(0)
    members, nonmembers = 192.0 + rng.normal(0, 1, 64), 192.0 + rng.normal(0, 1, 128)
    metrics = measure_cell(shape, Scores(members, nonmembers, np.arange(64))).metrics
    expected = np.maximum(0.0, 192.0 - nonmembers).sum() * 64 / 128
    assert metrics["mem_bits_floor"] == pytest.approx(expected) and metrics["mem_bits_floor"] > 0
