"""Every number a cell reports, declared once: its name, unit and definition.

Cell logging (orchestrator/cell.py through measure/cell.py), the columns of `cells.parquet`
(orchestrator/aggregate.py), the report's tables and the metric table of docs/science.md all read these
declarations; none of them writes a metric name out by hand.

    python -m measure.metrics                          # the markdown tables of every metric
    python -m measure.metrics --write docs/science.md  # refresh them between the file's markers

tests/test_docs.py keeps docs/science.md's tables equal to these declarations.

Names carry their unit (STYLE.md): `_bits`, `_bits_per_token`, `_s`; fractions and counts are plain.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

SYNTHETIC, TEXT = "synthetic", "text"  # the values of data.kind
BOTH = (SYNTHETIC, TEXT)
EXTRACTION_PREFIXES = (8, 16, 32)  # tokens of a sequence given before greedy decoding
EXTRACTION_SPLITS = ("train", "test")
MIA_STATISTICS = (  # (suffix, short label, definition) of each membership-inference statistic, fractions
    ("auc", "AUC", "ROC AUC of the attack's scores, members positive, ties counting one half"),
    ("tpr_at_1pct_fpr", "TPR at 1% FPR",
     "largest true-positive rate at a threshold whose false-positive rate is at most 1%"),
    ("tpr_at_0p1pct_fpr", "TPR at 0.1% FPR", "the same at a false-positive rate of at most 0.1%"),
    ("f1", "F1", "balanced F1: exactly as many sequences labelled members as there are members (chance = 0.5)"),
)
ATTACKS = {  # attack -> (data kinds, its score)
    "loss": (BOTH, "-nll_bits(x)"),
    "reference": ((TEXT,), "nll_bits_reference(x) - nll_bits(x)"),
}


@dataclass(frozen=True)
class Metric:
    """One final metric of a cell: logged once, at the cell's last step, in `unit`."""

    name: str
    unit: str
    definition: str
    kinds: tuple[str, ...] = BOTH  # the data kinds whose cells log it
    label: str = ""  # a short column header for the report's tables (default: the name)

    @property
    def header(self) -> str:
        return self.label or self.name


def _attack(attack: str) -> tuple[Metric, ...]:
    kinds, score = ATTACKS[attack]
    return tuple(Metric(f"{attack}_{suffix}", "fraction", f"{definition}; score {score}", kinds, f"{attack}-attack {label}")
                 for suffix, label, definition in MIA_STATISTICS)


def extraction_name(split: str, prefix: int) -> str:
    return f"extract_{split}_p{prefix}"


_EXTRACTION = tuple(
    Metric(extraction_name(split, prefix), "fraction",
           f"fraction of {split} sequences whose greedy continuation from their first {prefix} tokens "
           "reproduces the rest exactly (not logged when the prefix is the whole sequence)",
           (TEXT,), f"extract {split}, {prefix}-token prefix")
    for split in EXTRACTION_SPLITS for prefix in EXTRACTION_PREFIXES)

CELL_METRICS: tuple[Metric, ...] = (
    Metric("params", "parameters", "every trainable parameter, the start token's embedding row included"),
    Metric("params_paper", "parameters", "the paper's count V*d + S*d + L*(12d^2 + 13d) + 2d"),
    Metric("entropy_bits", "bits",
           "H(X): N*S*log2(V) for synthetic data; for text, the training set's code length under the "
           "reference model (under the uniform code without one)"),
    Metric("mem_bits", "bits",
           "dataset memorization: sum over training sequences of max(0, S*log2(V) - nll_bits) (synthetic) "
           "or max(0, nll_bits_reference - nll_bits) (text, unintended memorization)", label="mem (bits)"),
    Metric("mem_bits_unclipped", "bits", "H(X) - sum of the training sequences' nll_bits (may be negative)",
           (SYNTHETIC,)),
    Metric("mem_fraction", "fraction", "mem_bits / H(X)", (SYNTHETIC,)),
    Metric("bits_per_param", "bits/parameter", "mem_bits / params"),
    Metric("predicted_mem_bits", "bits", "min(alpha * params, H(X)) with the paper's alpha of the cell's precision",
           (SYNTHETIC,)),
    Metric("sequences_per_param", "sequences/parameter", "N / params, the MIA law's x"),
    Metric("train_nll_bits_per_token", "bits/token", "mean nll_bits of the training sequences over S"),
    Metric("test_nll_bits_per_token", "bits/token",
           "mean nll_bits over S of held-out sequences: the non-members (synthetic) or the test split (text)",
           label="test loss (bits/token)"),
    *_attack("loss"),
    Metric("mem_bits_floor", "bits",
           "the noise floor of mem_bits: the same clipped sum over the non-members, sum of max(0, S*log2(V) - "
           "nll_bits), scaled by N / M: what a model that memorized nothing would still score", (SYNTHETIC,),
           "floor (bits)"),
    Metric("steps", "steps",
           "optimizer steps of the reported model: its trunk's steps plus its own cool-down (branches); the "
           "steps taken (other schedules)"),
    Metric("steps_trained", "steps", "every optimizer step the cell took, trunk and all its branches, across resumes"),
    Metric("exposures", "passes", "how many times the reported model saw each training sequence: steps * batch / N",
           label="exposures"),
    Metric("num_branches", "branches", "annealed branches measured (branches schedule)"),
    Metric("last_horizon_steps", "steps", "the horizon T of the last branch, the reported model (branches schedule)"),
    Metric("converged", "0 or 1",
           "branches: 1 when the annealed memorization of the last two branches, a(T) and a(T/2), differ by "
           "less than converge_tol * a(T) (the cell then stopped with that branch as its model); other "
           "schedules: 1 when, after the final decay, mem_bits moved by less than converge_tol over the last "
           "doubling of the steps; 0 when the cap came first"),
    Metric("converged_step", "steps", "the evaluation step at which the convergence rule held (absent when "
           "unconverged)"),
    Metric("mem_gain_last_doubling", "fraction",
           "branches: (a(T) - a(T/2)) / a(T) of the last two branches, annealed memorization's relative gain "
           "over the last doubling; other schedules: (m(t) - m(t/2)) / m(t) at the last evaluation t, m(t/2) "
           "read at the last evaluation at or before t/2"),
    Metric("asymptote_extrapolable", "0 or 1",
           "1 when a(T) = A - B T^-c fitted to the cell's annealed branches of horizons >= train.asymptote_from "
           "(at least 4) gives an asymptote; 0 when too few branches, or c at a bound of its range"),
    Metric("mem_bits_asymptote", "bits",
           "A of that fit: the annealed memorization the cell's training tends to (an extrapolation; absent "
           "when not extrapolable)", label="asymptote (bits)"),
    Metric("mem_bits_asymptote_ci_low", "bits", "the low end of A's 95% interval (profile likelihood)"),
    Metric("mem_bits_asymptote_ci_high", "bits", "the high end of A's 95% interval (profile likelihood)"),
    Metric("asymptote_exponent", "", "c of that fit (absent for a flat curve, whose c is not identified)"),
    Metric("fraction_of_asymptote", "fraction", "mem_bits / mem_bits_asymptote: how close the cell came",
           label="fraction of asymptote"),
    Metric("decay_start_step", "steps", "wsd: the step the cool-down started (absent for other schedules)"),
    Metric("resumed_from_step", "steps", "the step this process resumed from (0 for a fresh start)"),
    Metric("wall_s", "s", "training wall time, summed across resumes"),
    Metric("tokens_per_s", "tokens/s", "training throughput of the last process that trained the cell"),
    # Text cells only.
    Metric("mem_bits_per_sequence", "bits/sequence", "mem_bits / N", (TEXT,), "unintended mem (bits/seq)"),
    Metric("capacity_ratio", "ratio", "H(X) / (alpha * params) with the paper's alpha of the cell's precision",
           (TEXT,), "H(X)/(alpha params)"),
    Metric("nonmember_nll_bits_per_token", "bits/token", "mean nll_bits of the non-members over S", (TEXT,)),
    Metric("reference_train_nll_bits_per_token", "bits/token",
           "the reference model's mean nll_bits of the training pool over S", (TEXT,)),
    Metric("reference_test_nll_bits_per_token", "bits/token",
           "the reference model's mean nll_bits of the test split over S", (TEXT,)),
    *_attack("reference"),
    *_EXTRACTION,
)
METRICS = {m.name: m for m in CELL_METRICS}


def metric_names(kind: str | None = None) -> tuple[str, ...]:
    """The final metrics a cell of data `kind` logs (all of them for None), in declaration order."""
    return tuple(m.name for m in CELL_METRICS if kind is None or kind in m.kinds)


def attack_names(names) -> list[str]:
    """The attacks that have an F1 column among `names` (e.g. a table's columns), sorted."""
    return sorted({n[: -len("_f1")] for n in names if n.endswith("_f1") and n != "_f1"})


@dataclass(frozen=True)
class Column:
    """A column of a cell's per-sequence artifact, `per_sequence.parquet`."""

    name: str
    unit: str
    definition: str
    kinds: tuple[str, ...] = BOTH


PER_SEQUENCE_COLUMNS: tuple[Column, ...] = (
    Column("split", "", "member, nonmember or test (text only)"),
    Column("index", "", "the sequence's position in its split"),
    Column("nll_bits", "bits", "the sequence's code length under the model"),
    Column("reference_nll_bits", "bits", "its code length under the reference model (null without one)", (TEXT,)),
    Column("mem_bits", "bits", "memorized bits of the sequence as in mem_bits (text: members only)"),
    Column("in_mia", "", "whether membership inference scored the sequence"),
    Column("correct_tail", "tokens",
           "how many final tokens greedy decoding predicts correctly (-1 where not measured): a prefix of k "
           "tokens extracts the sequence exactly when S - correct_tail <= k", (TEXT,)),
)
STEP_METRICS = (  # logged at each evaluation step (the curves)
    Metric("mem_bits", "bits", "mem_bits of the training set at that step (of the trunk, under branches)"),
    Metric("train_loss_bits_per_token", "bits/token", "the training batch's mean loss at that step"),
    Metric("annealed_mem_bits", "bits", "branches: a(T), mem_bits at the end of the cool-down branch of horizon "
           "T, logged at step T"),
    Metric("annealed_exposures", "passes", "branches: the exposures of that branch's model, (T + its cool-down) "
           "* batch / N, logged at step T"),
)


def markdown_table() -> str:
    """The metric tables of docs/science.md."""
    lines = ["| metric | unit | kinds | definition |", "| --- | --- | --- | --- |"]
    lines += [f"| `{m.name}` | {m.unit} | {', '.join(m.kinds)} | {m.definition} |" for m in CELL_METRICS]
    lines += ["", "Step metrics (logged at every evaluation, the curves):", "",
              "| metric | unit | definition |", "| --- | --- | --- |"]
    lines += [f"| `{m.name}` | {m.unit} | {m.definition} |" for m in STEP_METRICS]
    lines += ["", "Columns of `per_sequence.parquet`:", "", "| column | unit | kinds | definition |",
              "| --- | --- | --- | --- |"]
    lines += [f"| `{c.name}` | {c.unit or '-'} | {', '.join(c.kinds)} | {c.definition} |" for c in PER_SEQUENCE_COLUMNS]
    return "\n".join(lines)


MARKERS = ("<!-- metrics:start -->", "<!-- metrics:end -->")  # around the generated tables in a markdown file


def with_tables(markdown: str) -> str:
    """`markdown` with the text between MARKERS replaced by the current tables."""
    start, end = markdown.index(MARKERS[0]) + len(MARKERS[0]), markdown.index(MARKERS[1])
    return f"{markdown[:start]}\n{markdown_table()}\n{markdown[end:]}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        from pathlib import Path

        path = Path(sys.argv[2])
        path.write_text(with_tables(path.read_text()))
    else:
        sys.stdout.write(markdown_table() + "\n")
