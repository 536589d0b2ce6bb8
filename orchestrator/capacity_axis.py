"""Dataset sizes as multiples of each shape's predicted capacity: a grid axis
`data.num_sequences: capacity(0.25,0.5,1,2,4)`.

A fixed list of sizes serves one shape well and wastes cells on the others: capacities of the paper's
shapes span two orders of magnitude. A capacity axis places every shape's sizes around its own
capacity instead. Multiple m of a cell resolves to the number of uniform random sequences whose
information H(X) = N S log2 V is m times the predicted capacity alpha * params
(`measure.memorization.capacity_sequences`, the formula's one home), rounded to whole sequences, at
least one. alpha is a prior: `sweep.capacity_alpha` (bits per parameter, one number for every
precision or a mapping from precision to number), by default the paper's per precision
(`PAPER_ALPHA_BITS_PER_PARAM`).

The resolved size is a plain number: in the cell's spec (so its id is the content hash of the typed
values, the same as a cell given that N directly), its overrides (`data.num_sequences=N`) and its
config. The multiple and the alpha it was resolved with are recorded only in the config (the top-level
`capacity` node), which never enters an id. Capacity multiples are defined for synthetic data only,
where a sequence carries exactly S log2 V bits; a text corpus's information content is unknown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from measure.memorization import PAPER_ALPHA_BITS_PER_PARAM, capacity_sequences
from models.spec import PRECISIONS, CellSpec, SpecError

KEY = "data.num_sequences"  # the only grid key a capacity(...) value may size
ALPHA_KEY = "sweep.capacity_alpha"
_CALL = re.compile(r"\s*capacity\s*\((?P<args>.*)\)\s*")
_MENTION = re.compile(r"\bcapacity\s*\(")


@dataclass(frozen=True)
class CapacityAxis:
    """The multiples of a capacity axis, in the order written, and the prior alpha per precision."""

    multiples: tuple[float, ...]
    alpha: dict = field(default_factory=lambda: dict(PAPER_ALPHA_BITS_PER_PARAM))  # precision -> bits/param

    def sequences(self, spec: CellSpec, multiple: float) -> int:
        """N for `spec` at `multiple` times its predicted capacity."""
        if spec.is_text:
            raise SpecError(f"{KEY}=capacity(...): capacity multiples are defined for synthetic data, where a "
                              f"sequence carries S log2 V bits; cell {spec.slug} is a text cell: give sizes")
        return capacity_sequences(self.alpha[spec.precision], spec.params, spec.data.seq_len,
                                  spec.data.vocab_size, multiple)


def is_capacity_value(value: str) -> bool:
    """Whether a grid or command-line value asks for capacity multiples (`capacity(...)`)."""
    return bool(_MENTION.search(value))


def parse_multiples(key: str, value: str) -> tuple[float, ...] | None:
    """The multiples of a grid value `capacity(a,b,...)`; None for any other value. A one-line
    SpecError for a bad list, a multiple that is not positive, or capacity(...) on another key."""
    if not is_capacity_value(value):
        return None
    match = _CALL.fullmatch(value)
    if match is None:
        raise SpecError(f"{key}={value}: write capacity(...) alone, e.g. {KEY}: capacity(0.25,0.5,1,2,4)")
    if key != KEY:
        raise SpecError(f"{key}={value}: capacity(...) sizes {KEY} only")
    try:
        multiples = tuple(float(part) for part in match["args"].split(","))
    except ValueError:
        raise SpecError(f"{KEY}={value}: capacity(...) takes a comma-separated list of numbers, "
                          f"e.g. capacity(0.25,0.5,1,2,4)") from None
    bad = [m for m in multiples if not (m > 0 and math.isfinite(m))]
    if bad:
        raise SpecError(f"{KEY}={value}: a capacity multiple must be a positive number, not {bad[0]:g}")
    return multiples


def prior_alpha(value) -> dict:
    """alpha per precision from `sweep.capacity_alpha`: absent (None) the paper's; one positive number
    for every precision; or a mapping precision -> number (precisions it leaves out keep the paper's)."""
    given = {} if value is None else dict(value) if isinstance(value, Mapping) else {p: value for p in PRECISIONS}
    unknown = sorted(set(given) - set(PRECISIONS))
    if unknown:
        raise SpecError(f"{ALPHA_KEY}.{unknown[0]}: no such precision; choose from {', '.join(PRECISIONS)}")
    for precision, alpha in given.items():
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and math.isfinite(alpha)):
            where = ALPHA_KEY if not isinstance(value, Mapping) else f"{ALPHA_KEY}.{precision}"
            raise SpecError(f"{where}={alpha!r} must be a positive number of bits per parameter")
    return {**PAPER_ALPHA_BITS_PER_PARAM, **{p: float(a) for p, a in given.items()}}


def split_axes(grid: dict[str, str], alpha=None) -> tuple[dict[str, str], CapacityAxis | None]:
    """(the grid without its capacity axis, that axis or None). `alpha` is the sweep's
    `sweep.capacity_alpha` (None: the paper's)."""
    rest, axis = {}, None
    for key, value in grid.items():
        multiples = parse_multiples(key, str(value))
        if multiples is None:
            rest[key] = value
        else:
            axis = CapacityAxis(multiples, prior_alpha(alpha))
    return rest, axis
