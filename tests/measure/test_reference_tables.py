"""measure/ against the paper's published tables, as the package ships them (measure/reference/, read
through measure.paper, whose docstring says what each table holds)."""

import numpy as np
import pytest

from measure.capacity import (
    fit_mia_law,
    mem_prediction_error,
    published_mia_law_as_printed,
    published_mia_law_corrected,
)
from measure.memorization import dataset_entropy_bits, params_paper, predicted_mem_bits
from measure.paper import REFERENCE_COLUMNS, REFERENCE_TABLES, reference_rows, reference_text


def test_the_three_tables_ship_with_their_columns_and_rows():
    sizes = {"capacity_by_precision.csv": 16, "seq_len_vocab_sweep.csv": 12, "mia_validation.csv": 6}
    assert set(REFERENCE_TABLES) == set(sizes)
    for name, size in sizes.items():
        rows = reference_rows(name)
        assert len(rows) == size and all(tuple(row) == REFERENCE_COLUMNS[name] for row in rows), name
    assert {row["sweep"] for row in reference_rows("seq_len_vocab_sweep.csv")} == {"seq_len", "vocab"}
    assert reference_rows("capacity_by_precision.csv")[0]["params"] == 8.04e4  # "8.04e4" read as a float


def test_capacity_table_column_means_are_the_papers():
    rows = reference_rows("capacity_by_precision.csv")
    assert round(np.mean([r["bits_per_param_fp32"] for r in rows]), 2) == 3.83
    assert round(np.mean([r["bits_per_param_bf16"] for r in rows]), 2) == 3.51


def test_an_unknown_table_is_refused_by_name():
    with pytest.raises(ValueError, match="not a reference table.*mia_validation.csv"):
        reference_rows("capacity_by_precision")  # the file name, with .csv, names a table
    with pytest.raises(ValueError, match="not a reference table"):
        reference_text("../../pyproject.toml")


def round_3sf(value: float) -> float:
    """The tables print counts and bits to 3 significant figures."""
    return float(f"{value:.2e}")


def test_params_paper_matches_capacity_table():
    rows = reference_rows("capacity_by_precision.csv")
    assert len(rows) == 16
    for row in rows:
        count = params_paper(2048, 64, int(row["n_layer"]), int(row["d_model"]))
        assert round_3sf(count) == row["params"], row


def test_expected_bits_of_seq_len_vocab_sweep():
    # The appendix's "expected" column is min(alpha * params, N * S * log2 V) with alpha = 3.54.
    rows = reference_rows("seq_len_vocab_sweep.csv")
    for row in rows:
        seq_len, vocab_size = int(row["seq_len"]), int(row["vocab_size"])
        params = params_paper(vocab_size, seq_len, int(row["n_layer"]), int(row["d_model"]))
        assert round_3sf(params) == row["params"], row
        entropy_bits = dataset_entropy_bits(int(row["n_samples"]), seq_len, vocab_size)
        expected = predicted_mem_bits(3.54, params, entropy_bits)
        assert round_3sf(expected) == row["expected_bits"], row


def mia_validation_columns():
    rows = reference_rows("mia_validation.csv")
    num_sequences = np.array([r["n_train_sequences"] for r in rows])
    params = np.array([r["params"] for r in rows])
    predicted_f1 = np.array([r["predicted_f1"] for r in rows])
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
    rows = reference_rows("seq_len_vocab_sweep.csv")
    measured = np.array([r["measured_bits"] for r in rows])
    expected = np.array([r["expected_bits"] for r in rows])
    error_pct = np.array([r["error_pct"] for r in rows])
    got_pct = 100 * np.abs(mem_prediction_error(measured, expected))
    np.testing.assert_allclose(got_pct, error_pct, atol=0.5)
