"""Frozen, validated specifications of one grid cell.

A cell is one (model shape, dataset, precision, training recipe, seed). These dataclasses are what the
orchestrator hands down after composing Hydra configs, and what a Ray worker receives: plain Python
values, picklable, immutable, validated on construction. This module imports no torch, so the driver can
plan a whole sweep (ids, sizes, FLOPs, memory) without loading it.

Only fields that change a cell's numbers live in a `CellSpec`. Runtime options (where checkpoints go,
the tracking URI, the device, GPU fractions) live in `RunOptions` beside the spec and never enter the cell
id; a `Cell` carries both, and a text cell the `ReferenceOptions` its reference is planned from.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field

PRECISIONS = ("fp32", "bf16", "amp_bf16")
SCHEDULES = ("branches", "wsd", "cosine", "constant")
FORMATS = ("text", "jsonl", "parquet")  # corpus file formats models/text.py reads
TOKENIZERS = ("bytes", "bpe")
BYTE_VOCAB_SIZE = 257  # the byte tokenizer's ids: 256 bytes, then the end of a document


class SpecError(ValueError):
    """A cell's configuration is invalid; the message names the field and the value."""


def _require_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise SpecError(f"{owner}.{name}={value!r} must be positive")


@dataclass(frozen=True)
class ModelSpec:
    """GPT shape (nanoGPT's field names). The vocabulary and context come from the data."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int

    def __post_init__(self) -> None:
        _require_positive("model", n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)
        if self.n_embd % self.n_head:
            raise SpecError(f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}")


@dataclass(frozen=True)
class DataSpec:
    """Synthetic data: N member sequences of S tokens, uniform over V tokens, plus fresh non-members."""

    vocab_size: int
    seq_len: int
    num_sequences: int
    num_nonmembers: int
    kind: str = "synthetic"

    def __post_init__(self) -> None:
        _require_positive(
            "data",
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            num_sequences=self.num_sequences,
            num_nonmembers=self.num_nonmembers,
        )
        if self.vocab_size < 2:
            raise SpecError(f"data.vocab_size={self.vocab_size} must be at least 2")
        if self.kind != "synthetic":
            raise SpecError(f"data.kind={self.kind!r} is not one of ('synthetic', 'text')")

    @property
    def sequence_bits(self) -> float:
        """Information in one uniform random sequence: S * log2(V) bits."""
        return self.seq_len * math.log2(self.vocab_size)

    @property
    def entropy_bits(self) -> float:
        """H(X) = N * S * log2(V) bits."""
        return self.num_sequences * self.sequence_bits


@dataclass(frozen=True)
class TextDataSpec:
    """A text corpus, its tokenizer and the three disjoint sets of S-token sequences drawn from it.

    Field names follow DataSpec where they mean the same (`vocab_size`, `seq_len`, `num_sequences` =
    the training pool, `num_nonmembers`), so model shapes and budgets derive alike."""

    corpus_uri: str
    seq_len: int
    num_sequences: int  # the training pool
    num_nonmembers: int
    num_test: int
    tokenizer: str = "bytes"  # "bytes" | "bpe"
    vocab_size: int = 257  # ids including EOS: 257 for bytes; the BPE's size for "bpe"
    format: str | None = None  # None: from each file's extension
    split_seed: int = 0
    dedupe_documents: bool = True
    max_sequences: int | None = None  # read only the corpus's first unique sequences (huge corpora)
    tokenizer_train_documents: int | None = None  # BPE trained on the first documents (None: all)
    # sha256 of the tokenizer's JSON, set when the sweep's tokenizer is built (orchestrator/corpus.py):
    # part of the cell id, and how a worker finds the stored tokenizer (tokenizer_uri).
    tokenizer_hash: str | None = None
    kind: str = "text"

    def __post_init__(self) -> None:
        if not isinstance(self.corpus_uri, str) or not self.corpus_uri.strip():
            raise SpecError(f"data.corpus_uri={self.corpus_uri!r} must name a corpus (a path or URI)")
        if self.kind != "text":
            raise SpecError(f"data.kind={self.kind!r} must be 'text' for a TextDataSpec")
        if self.format is not None and self.format not in FORMATS:
            raise SpecError(f"data.format={self.format!r} is not one of {FORMATS} (or None)")
        if self.tokenizer not in TOKENIZERS:
            raise SpecError(f"data.tokenizer={self.tokenizer!r} is not one of {TOKENIZERS}")
        if self.tokenizer == "bytes" and self.vocab_size != BYTE_VOCAB_SIZE:
            raise SpecError(f"data.vocab_size={self.vocab_size} must be 257 (256 bytes + EOS) "
                            "for data.tokenizer='bytes'")
        if self.tokenizer == "bpe" and self.vocab_size < 258:
            raise SpecError(f"data.vocab_size={self.vocab_size} must be at least 258 for "
                            "data.tokenizer='bpe' (EOS + 256 bytes + merges)")
        for name in ("seq_len", "num_sequences", "num_nonmembers", "num_test", "split_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"data.{name}={value!r} must be an integer")
        if self.seq_len < 2:
            raise SpecError(f"data.seq_len={self.seq_len} must be at least 2")
        if self.num_sequences < 1 or self.num_nonmembers < 1:
            raise SpecError(f"data.num_sequences={self.num_sequences} and data.num_nonmembers="
                            f"{self.num_nonmembers} must be positive")
        if self.num_test < 0 or self.split_seed < 0:
            raise SpecError(f"data.num_test={self.num_test} and data.split_seed={self.split_seed} "
                            "must be >= 0")
        if self.max_sequences is not None and self.max_sequences < self.num_required:
            raise SpecError(f"data.max_sequences={self.max_sequences} is below the {self.num_required} "
                            "sequences the splits need (num_sequences + num_nonmembers + num_test)")
        if self.tokenizer_train_documents is not None and self.tokenizer_train_documents < 1:
            raise SpecError(f"data.tokenizer_train_documents={self.tokenizer_train_documents} "
                            "must be positive (or None for all)")

    @property
    def num_required(self) -> int:
        return self.num_sequences + self.num_nonmembers + self.num_test


@dataclass(frozen=True)
class ReferenceOptions:
    """How a text cell's reference model is made (config `data.reference`): the same shape as the cell
    unless all of n_layer, n_head, n_embd are given (a larger "oracle"), trained with the cell's recipe
    and precision on `num_sequences` pool sequences (None: the whole pool, every sequence of the corpus
    outside the non-member and test sets) with its own `seed`, shared by all seeds of the sweep."""

    enabled: bool = True
    num_sequences: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        shape = (self.n_layer, self.n_head, self.n_embd)
        if any(v is not None for v in shape) and any(v is None for v in shape):
            raise SpecError("data.reference: give all of n_layer, n_head and n_embd for an oracle shape, "
                            "or none for the cell's own shape")
        if self.num_sequences is not None and self.num_sequences < 1:
            raise SpecError(f"data.reference.num_sequences={self.num_sequences} must be positive "
                            "(or null for the whole pool)")
        if self.seed < 0:
            raise SpecError(f"data.reference.seed={self.seed} must be >= 0")


@dataclass(frozen=True)
class TrainSpec:
    """The training recipe: AdamW with a linear warm-up, then one of four schedules
    (models/progress.py has the rules, docs/science.md the definitions):

    - `branches` (the default): a constant-rate trunk with annealed branches. At each horizon T
      (`first_branch`, then each doubling up to `max_steps`) a copy of the trunk cools its rate down
      linearly to `min_lr_ratio * lr` over `cooldown_fraction * T` steps and is measured at its end,
      a(T); the trunk goes on. The cell has converged at T when |a(T) - a(T/2)| < converge_tol * a(T),
      and its model is then, or at the last horizon, its last branch. Its asymptote is fitted to the
      branches of horizons >= `asymptote_from` (earlier ones follow the fast early phase of training,
      not the saturating curve: bench.convergence's validation).
    - `wsd` (warmup-stable-decay): the constant rate `lr` until mem_bits moves by less than
      `trigger_tol` (relative, up or down) over the last doubling of the steps, then a linear cool-down
      over `cooldown_fraction` of the steps taken so far to `min_lr_ratio * lr`, which it keeps. The cool-down starts in time
      to end at `max_steps` at the latest.
    - `cosine`: a cosine decay from `lr` to `min_lr_ratio * lr` over `max_steps`.
    - `constant`: `lr` throughout (no decay).

    Under the other schedules a cell has converged when, at an evaluation after the schedule's final
    decay, mem_bits moved by less than `converge_tol` (relative) over the last doubling of its steps:
    |m(t) - m(t/2)| < tol * m(t). It then stops; `max_steps` is a cap, and a cell that reaches it
    without converging is unconverged."""

    max_steps: int
    batch_size: int
    lr: float
    schedule: str = "branches"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    eval_interval: int = 250
    converge_tol: float = 0.01
    trigger_tol: float = 0.02  # wsd: the stable phase ends when the gain per doubling falls below it
    cooldown_fraction: float = 0.2  # a cool-down lasts this fraction of its horizon (wsd: of the steps so far)
    checkpoint_interval: int = 1000
    first_branch: int = 500  # branches: the first horizon, in optimizer steps
    asymptote_from: int = 2000  # branches: the asymptote is fitted to the branches of horizons >= this

    def __post_init__(self) -> None:
        _require_positive(
            "train",
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            eval_interval=self.eval_interval,
            converge_tol=self.converge_tol,
            trigger_tol=self.trigger_tol,
            cooldown_fraction=self.cooldown_fraction,
            checkpoint_interval=self.checkpoint_interval,
            first_branch=self.first_branch,
            asymptote_from=self.asymptote_from,
        )
        if self.schedule not in SCHEDULES:
            raise SpecError(f"train.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.warmup_steps < 0:
            raise SpecError(f"train.warmup_steps={self.warmup_steps} must be >= 0")
        if self.schedule == "branches" and self.warmup_steps > self.first_branch <= self.max_steps:
            raise SpecError(f"train.first_branch={self.first_branch} is shorter than train.warmup_steps="
                            f"{self.warmup_steps}: a branch must start after the warm-up")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SpecError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.weight_decay < 0:
            raise SpecError(f"train.weight_decay={self.weight_decay} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise SpecError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        if self.grad_clip < 0:
            raise SpecError(f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")

    # -- the branches schedule's arithmetic (models/progress.py follows it; the dry run costs it) ----------
    @functools.cached_property  # asked at every step (models/progress.py): computed once per spec
    def horizons(self) -> tuple[int, ...]:
        """branches: first_branch, then each doubling up to max_steps (max_steps alone when it is below
        first_branch: a short run still ends with one annealed branch)."""
        out, horizon = [], self.first_branch
        while horizon <= self.max_steps:
            out.append(horizon)
            horizon *= 2
        return tuple(out) or (self.max_steps,)

    def branch_length(self, horizon: int) -> int:
        """Steps of the cool-down branch at `horizon`: cooldown_fraction of it, at least one."""
        return max(1, round(self.cooldown_fraction * horizon))

    def steps_through(self, last_horizon: int) -> int:
        """branches: the optimizer steps a cell takes in all when it stops at `last_horizon`: the trunk to
        it and every branch up to and including its own."""
        return last_horizon + sum(self.branch_length(h) for h in self.horizons if h <= last_horizon)

    def steps_to_horizon_at_least(self, steps: int) -> int:
        """branches: the steps taken in all by a cell that stops at the first horizon of at least `steps`
        (the last horizon if none is)."""
        reached = [h for h in self.horizons if h >= steps]
        return self.steps_through(reached[0] if reached else self.horizons[-1])

    @property
    def steps_at_cap(self) -> int:
        """Optimizer steps of a cell that never stops early: max_steps, or for branches the trunk to the
        last horizon and every branch."""
        return self.steps_through(self.horizons[-1]) if self.schedule == "branches" else self.max_steps


@dataclass(frozen=True)
class CellSpec:
    """Everything that determines one cell's numbers.

    `data` is a DataSpec (synthetic) or a TextDataSpec (a corpus). A text cell may name a
    `reference`: the cell whose model its unintended memorization is measured against (docs/science.md). The
    reference is a whole CellSpec, so it is part of this cell's id, and it is itself a cell (without a
    reference) that trains once and serves every cell naming it."""

    model: ModelSpec
    data: DataSpec | TextDataSpec
    train: TrainSpec
    precision: str
    seed: int
    reference: CellSpec | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SpecError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        if self.seed < 0:
            raise SpecError(f"seed={self.seed} must be >= 0")
        if self.reference is not None:
            ref = self.reference
            if self.data.kind != "text":
                raise SpecError("reference: only text cells are measured against a reference model")
            if ref.reference is not None:
                raise SpecError("reference: a reference cell cannot itself have a reference")
            same = ("corpus_uri", "seq_len", "vocab_size", "tokenizer", "tokenizer_hash", "split_seed",
                    "num_nonmembers", "num_test")
            for name in same:
                if getattr(ref.data, name, None) != getattr(self.data, name):
                    raise SpecError(f"reference.data.{name}={getattr(ref.data, name, None)!r} differs from "
                                    f"data.{name}={getattr(self.data, name)!r}: a reference must score the "
                                    "same sequences with the same tokenizer")

    @property
    def is_text(self) -> bool:
        return self.data.kind == "text"

    # -- sizes, all derivable without torch (computed once per spec: planning a sweep asks often) ----
    @functools.cached_property
    def params_paper(self) -> int:
        """The paper's count: V*d + S*d + L*(12 d^2 + 13 d) + 2d (tied head, learned positions)."""
        v, s, d, n = self.data.vocab_size, self.data.seq_len, self.model.n_embd, self.model.n_layer
        return v * d + s * d + n * (12 * d * d + 13 * d) + 2 * d

    @functools.cached_property
    def params(self) -> int:
        """Every trainable parameter: the paper's count plus the start token's embedding row."""
        return self.params_paper + self.model.n_embd

    @functools.cached_property
    def train_flops_per_step(self) -> float:
        """Approximate training FLOPs per optimizer step: 6 * params * tokens + attention."""
        tokens = self.train.batch_size * self.data.seq_len
        attention = 12 * self.model.n_layer * self.model.n_embd * self.data.seq_len * tokens
        return 6.0 * self.params * tokens + attention

    # -- identity ---------------------------------------------------------------------------------
    @property
    def slug(self) -> str:
        """A readable prefix of the cell id: shape, data size, precision, seed."""
        d = self.data
        kind = "" if d.kind == "synthetic" else f"-{d.kind}"
        return (
            f"{self.model.name}{kind}-v{d.vocab_size}-s{d.seq_len}-n{d.num_sequences}"
            f"-{self.precision}-seed{self.seed}"
        )

    @property
    def shape_slug(self) -> str:
        """The model's actual shape, `l2_d24` (layers, width): what a reader should see where the
        config group's name (`model.name`, part of `slug`) may not match an overridden shape."""
        return f"l{self.model.n_layer}_d{self.model.n_embd}"

    @property
    def readable_slug(self) -> str:
        """`slug` with the actual shape in place of the model's name: for run names and display."""
        return self.shape_slug + self.slug[len(self.model.name):]

    @functools.cached_property
    def cell_id(self) -> str:
        """`slug` plus 10 hex digits of a hash of every typed value in the spec.

        The hash is over canonical JSON of the typed fields, so `lr=1e-3` and `lr=0.001` (both the float
        0.001) give one id. The model's name is part of the slug but not of the hash: two names for one
        shape are one experiment. Computed once per spec (a sweep asks for it many times; the spec is
        frozen, so it cannot go stale).
        """
        payload = _identity(to_dict(self))
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return f"{self.slug}-{hashlib.sha256(canonical.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class RunOptions:
    """Where and how a cell runs: never part of its id."""

    storage: str  # root of checkpoints: a local folder or a URI pyarrow's filesystems open
    tracking_uri: str
    experiment: str
    artifact_root: str | None = None  # where a new experiment keeps artifacts (None: the server decides)
    sweep: str = "adhoc"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    eval_batch_size: int = 1024
    progress: bool = True
    tags: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.eval_batch_size <= 0:
            raise SpecError(f"eval_batch_size={self.eval_batch_size} must be positive")


@dataclass(frozen=True)
class Cell:
    """One composed, validated cell: what a worker receives (plain values, picklable).

    Its id is its spec's: `options`, `overrides`, `config` and `reference_options` never enter it."""

    spec: CellSpec
    options: RunOptions
    overrides: tuple[str, ...] = ()  # what distinguishes it within its grid, for messages
    # The whole resolved configuration as composed: kept only to be recorded (the run's config.yaml and
    # the plan), never read back; everything a cell needs is typed in the fields beside it. The cells
    # of a grid share the sections they do not change (orchestrator.compose.GridComposer): copy, never
    # mutate.
    config: dict = field(default_factory=dict)
    # How a text cell's reference is made (config `data.reference`, typed by the driver, which turns it
    # into `spec.reference`); None for a synthetic cell. A text cell without it takes the defaults.
    reference_options: ReferenceOptions | None = None
    # The id a recorded plan gave this cell (orchestrator/plan.py); None for a cell composed now. The two
    # differ only when this code hashes the recorded spec otherwise: the cell is then `stale`.
    recorded_id: str | None = None

    @property
    def cell_id(self) -> str:
        return self.recorded_id or self.spec.cell_id

    @property
    def stale(self) -> bool:
        """Recorded under an id this code no longer gives its spec: it can be listed, not run."""
        return self.recorded_id is not None and self.recorded_id != self.spec.cell_id

    @property
    def run_name(self) -> str:
        """The name of the cell's MLflow run: unique in its experiment (the id's hash) and readable
        (the actual shape, data size, precision and seed)."""
        return f"{self.spec.readable_slug}-{self.cell_id.rsplit('-', 1)[-1]}"

    def recorded_params(self) -> dict:
        """The params recorded for this cell (MLflow params, 'a.b' keys, named as in the config):
        only the typed values that change its numbers (the spec: model.*, data.*, train.*,
        precision.name, seed) and, for a text cell, how its reference is made (data.reference.*:
        the options as typed, the pool size planning resolved, the reference's cell id). Where and
        how it runs (paths, tracking, cluster, packing, device, the sweep's grid) is in its
        config.yaml artifact, never in params, so runs compare by their science alone."""
        spec = self.spec
        values = {"model": plain_dict(spec.model), "data": plain_dict(spec.data),
                  "train": plain_dict(spec.train), "precision": {"name": spec.precision},
                  "seed": spec.seed}
        reference = self._reference_params()
        if reference is not None:
            values["data"]["reference"] = reference
        return flatten(values)

    def _reference_params(self) -> dict | None:
        """A text cell's data.reference.* (None for a synthetic cell and for a reference cell, which
        has none)."""
        if not self.spec.is_text or (self.reference_options is None and self.spec.reference is None):
            return None
        reference = plain_dict(self.reference_options or ReferenceOptions())
        if self.spec.reference is not None:
            reference.update(num_sequences=self.spec.reference.data.num_sequences,
                             cell_id=self.spec.reference.cell_id)
        return reference


def pack_key(spec: CellSpec) -> tuple | None:
    """Cells with equal keys can train as one pack (models/packed.py): same shape, vocabulary,
    sequence length, precision and recipe; they may differ in dataset size, non-members and seed.
    None for text cells, which train alone (packing covers the synthetic path only)."""
    m, d = spec.model, spec.data
    if d.kind != "synthetic":
        return None
    return (m.n_layer, m.n_head, m.n_embd, d.vocab_size, d.seq_len, d.kind, spec.precision, spec.train)


def to_dict(spec: CellSpec) -> dict:
    """Nested plain dict of a spec (for ids, params and Parquet columns). A synthetic cell's dict has
    no `reference` key, so its id is what it was before text cells existed."""
    out = plain_dict(spec)
    if spec.reference is None and not spec.is_text:
        out.pop("reference")
    return out


def plain_dict(value):
    """dataclasses.asdict for specs, whose fields hold scalars or specs: the same dict, without
    asdict's deep copy of every value (ids of a whole sweep are computed at planning)."""
    names = field_names(type(value))
    return {name: plain_dict(getattr(value, name)) for name in names} if names else value


@functools.cache
def field_names(cls) -> tuple[str, ...]:
    """A dataclass's field names; () for any other type."""
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()


def spec_from_dict(payload: dict, memo: dict | None = None) -> CellSpec:
    """The spec `to_dict` wrote (a recorded plan's row), validated as on construction. A recorded field
    this code no longer has, or one it requires that the record lacks, is a SpecError naming it. With
    a `memo` (a dict the caller keeps across calls) each distinct section is built once: the cells of
    a sweep share most of theirs (a section's recorded values are scalars: with their types, they key it)."""
    def build(cls, values: dict, section: str):
        key = memo is not None and (cls, *((k, type(v), v) for k, v in sorted(values.items())))
        if key and key in memo:
            return memo[key]
        unknown = sorted(set(values) - set(field_names(cls)))
        if unknown:
            raise SpecError(f"{section}.{unknown[0]}: recorded, but this memsweep has no such field")
        try:
            built = cls(**values)
        except TypeError as err:
            raise SpecError(f"{section}: {err}") from None
        if key:
            memo[key] = built
        return built

    data = dict(payload["data"])
    reference = payload.get("reference")
    return CellSpec(
        model=build(ModelSpec, payload["model"], "model"),
        data=build(TextDataSpec if data.get("kind") == "text" else DataSpec, data, "data"),
        train=build(TrainSpec, payload["train"], "train"),
        precision=payload["precision"],
        seed=payload["seed"],
        reference=spec_from_dict(reference, memo) if reference else None,
    )


def _identity(payload: dict) -> dict:
    """What a cell id hashes: the spec without model names (at any depth: a reference's too)."""
    payload = dict(payload, model={k: v for k, v in payload["model"].items() if k != "name"})
    if payload.get("reference"):
        payload["reference"] = _identity(payload["reference"])
    return payload


def flatten(nested: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form in which MLflow params and table columns are keyed."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
