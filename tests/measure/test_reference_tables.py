"""measure/ against the paper's published tables in ../shared/reference (see its README).

CI and every checkout have ../shared beside the repository; a missing table fails loudly.
"""

import csv
from pathlib import Path

import numpy as np
import pytest

from measure.capacity import (
    fit_mia_law,
    mem_prediction_error,
    published_mia_law_as_printed,
    published_mia_law_corrected,
)
from measure.memorization import dataset_entropy_bits, params_paper, predicted_mem_bits

REFERENCE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference"


def read_reference(name: str) -> list[dict[str, str]]:
    with (REFERENCE_DIR / name).open(newline="") as f:
        return list(csv.DictReader(f))


def round_3sf(value: float) -> float:
    """The tables print counts and bits to 3 significant figures."""
    return float(f"{value:.2e}")


def test_params_paper_matches_capacity_table():
    rows = read_reference("capacity_by_precision.csv")
    assert len(rows) == 16
    for row in rows:
        count = params_paper(2048, 64, int(row["n_layer"]), int(row["d_model"]))
        assert round_3sf(count) == float(row["params"]), row


def test_expected_bits_of_seq_len_vocab_sweep():
    # The appendix's "expected" column is min(alpha * params, N * S * log2 V) with alpha = 3.54.
    rows = read_reference("seq_len_vocab_sweep.csv")
    for row in rows:
        seq_len, vocab_size = int(row["seq_len"]), int(row["vocab_size"])
        params = params_paper(vocab_size, seq_len, int(row["n_layer"]), int(row["d_model"]))
        assert round_3sf(params) == float(row["params"]), row
        entropy_bits = dataset_entropy_bits(int(row["n_samples"]), seq_len, vocab_size)
        expected = predicted_mem_bits(3.54, params, entropy_bits)
        assert round_3sf(expected) == float(row["expected_bits"]), row


def mia_validation_columns():
    rows = read_reference("mia_validation.csv")
    num_sequences = np.array([float(r["n_train_sequences"]) for r in rows])
    params = np.array([float(r["params"]) for r in rows])
    predicted_f1 = np.array([float(r["predicted_f1"]) for r in rows])
    return num_sequences, params, predicted_f1


def test_corrected_published_law_reproduces_table_2():
    num_sequences, params, predicted_f1 = mia_validation_columns()
    assert len(predicted_f1) == 6
    got = published_mia_law_corrected(num_sequences, params)
    np.testing.assert_array_equal(np.round(got, 2), predicted_f1)


def test_fit_on_table_2_recovers_published_constants():
    num_sequences, params, predicted_f1 = mia_validation_columns()
    fit = fit_mia_law(num_sequences / params, predicted_f1)
    assert fit.c1 == pytest.approx(1.34, abs=0.01)
    assert fit.c2 == pytest.approx(-33.14, abs=0.05)
    assert fit.c3 == pytest.approx(33.14 * 0.0337, abs=0.01)


def test_printed_law_does_not_tend_to_half():
    # The published text says F1 -> 0.5 as the dataset grows; the law as printed tends to about 1.
    assert published_mia_law_as_printed(capacity_bits=1e6, num_sequences=1e12) > 0.99


def test_prediction_error_matches_appendix_column():
    # error_pct is 100 * |measured - expected| / expected, up to the tables' 3-figure rounding.
    rows = read_reference("seq_len_vocab_sweep.csv")
    measured = np.array([float(r["measured_bits"]) for r in rows])
    expected = np.array([float(r["expected_bits"]) for r in rows])
    error_pct = np.array([float(r["error_pct"]) for r in rows])
    got_pct = 100 * np.abs(mem_prediction_error(measured, expected))
    np.testing.assert_allclose(got_pct, error_pct, atol=0.5)
