"""The published tables of Morris et al. 2025 ("How much do language models memorize?", arXiv
2505.24832, v3), shipped with the package as measure/reference/*.csv and read here, so that tests and
reports compare against the paper wherever memsweep is installed.

The three tables:

- capacity_by_precision.csv: the paper's capacity table. 16 GPT-2-style shapes (1, 2, 4, 8 layers x
  d_model 32, 64, 128, 256) trained on uniform random tokens (V = 2048, S = 64): the parameter count,
  the capacity in bits trained in fp32 and in bf16, and bits per parameter (column means 3.83 fp32,
  3.51 bf16). paper_alpha() computes from it both alpha statistics a sweep reports, by the same
  functions: the slope through the origin (3.875 fp32, 3.602 bf16) and the mean of capacity / params
  (3.828, 3.517; the printed column's mean differs in the third decimal because it is rounded).
- seq_len_vocab_sweep.csv: the appendix check that memorization is min(capacity, dataset entropy)
  when the sequence length or the vocabulary varies (4,096 sequences, 2 layers, d_model 128): measured
  and expected bits and their error in percent.
- mia_validation.csv: the check of the membership-inference law on GPT-2 small and XL trained on text:
  training-set size in sequences, predicted and observed F1 (fractions).

What the printed numbers say that the text does not (each checked by arithmetic on the tables, and by
tests/measure/test_reference_tables.py):

- Every parameter count is V*d + S*d + L*(12*d^2 + 13*d) + 2*d: GPT-2 blocks with biases, learned
  positions for exactly S positions, a final LayerNorm, the output head tied to the token embedding.
- At S = 4 the paper measures 96% of the data's bits as memorized, impossible if a sequence's first
  token were charged at full cost with nothing to predict it from: every token is predicted (memsweep
  uses a start token), so a sequence holds S * log2(V) bits.
- The "expected" column of the appendix sweep is min(alpha * params, N * S * log2 V) with alpha 3.54.
- The MIA law as printed, F1 = 1/2 * (1 + c1 * sigmoid(c2 * (Capacity/|D| + c3))) with c1 = 1.34,
  c2 = -0.034, c3 = -33.14, tends to about 1, not 0.5, as the dataset grows, against the paper's own
  text. The predicted F1 of mia_validation.csv are all reproduced by
  F1 = 1/2 * (1 + 1.34 * sigmoid(-33.14 * (|D|/P - 0.0337))): c2 and c3 swapped and |D|/P (training
  sequences per parameter) in place of Capacity/|D|, for 64-token sequences. measure/capacity.py has
  both forms; a report shows both beside the law it fits on text cells.
- Not published: learning rate, schedule, warm-up, Adam betas, weight decay, clipping, dropout, head
  count, the dataset-size grids, and how the MIA threshold was chosen.

Cite the paper when showing these figures.
"""

from __future__ import annotations

import csv
import importlib.resources
import io

from measure.capacity import ALPHA_STATISTICS

# Each shipped table and its columns, in file order; the text columns stay strings, the rest are
# numbers (the tables print most of them to 3 significant figures, "8.04e4").
REFERENCE_COLUMNS = {
    "capacity_by_precision.csv": ("n_layer", "d_model", "params", "capacity_bits_fp32", "capacity_bits_bf16",
                                  "bits_per_param_fp32", "bits_per_param_bf16"),
    "seq_len_vocab_sweep.csv": ("sweep", "seq_len", "vocab_size", "n_samples", "n_layer", "d_model", "params",
                                "measured_bits", "expected_bits", "error_pct"),
    "mia_validation.csv": ("model", "d_model", "n_layer", "params", "n_train_sequences", "predicted_f1",
                           "observed_f1", "observed_f1_std"),
}
REFERENCE_TABLES = tuple(REFERENCE_COLUMNS)
TEXT_COLUMNS = {"sweep", "model"}  # seq_len_vocab_sweep's axis ("seq_len" or "vocab"); a GPT-2 size


def reference_text(name: str) -> str:
    """The CSV text of one shipped table, by file name (one of REFERENCE_TABLES)."""
    if name not in REFERENCE_COLUMNS:
        raise ValueError(f"{name!r}: not a reference table ({', '.join(REFERENCE_TABLES)})")
    return (importlib.resources.files("measure") / "reference" / name).read_text(encoding="utf-8")


def reference_rows(name: str) -> list[dict[str, float | str]]:
    """The rows of one shipped table, in file order: numbers as floats, text columns as strings.

    Raises ValueError for an unknown table, a header other than REFERENCE_COLUMNS[name], or a
    number that does not parse."""
    reader = csv.DictReader(io.StringIO(reference_text(name)))
    if tuple(reader.fieldnames or ()) != REFERENCE_COLUMNS[name]:
        raise ValueError(f"{name}: columns {reader.fieldnames}, expected {list(REFERENCE_COLUMNS[name])}")
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            rows.append({key: value if key in TEXT_COLUMNS else float(value) for key, value in row.items()})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}, line {line}: {err}") from err
    return rows


# The paper's capacity column for each precision: the dtype the weights are kept in (amp_bf16 keeps
# float32 weights; the paper has no autocast run).
PAPER_CAPACITY_COLUMN = {"fp32": "fp32", "bf16": "bf16", "amp_bf16": "fp32"}


def paper_alpha(precision: str) -> dict[str, float] | None:
    """The paper's alpha (bits per parameter) for `precision`'s weight dtype by each statistic of
    measure.capacity.ALPHA_STATISTICS, computed from capacity_by_precision.csv exactly as a sweep's
    own: {"slope": 3.875, "mean_ratio": 3.828} for fp32 and amp_bf16, {"slope": 3.602,
    "mean_ratio": 3.517} for bf16. None for a precision the table cannot stand for."""
    column = PAPER_CAPACITY_COLUMN.get(precision)
    if column is None:
        return None
    rows = reference_rows("capacity_by_precision.csv")
    params = [r["params"] for r in rows]
    capacities = [r[f"capacity_bits_{column}"] for r in rows]
    return {name: float(statistic(params, capacities)) for name, statistic in ALPHA_STATISTICS.items()}
