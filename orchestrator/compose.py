"""Hydra's home: compose configs, expand sweep grids, and turn DictConfigs into frozen specs.

Nothing below this module sees a DictConfig. A sweep file (conf/sweep/NAME.yaml) holds a `grid` in
Hydra's own override grammar, exactly what a user would pass to `--multirun`:

    grid:
      model: l1_d16,l2_d16              # or glob(l*_d32)
      data.num_sequences: range(20,200,40)
      seed: 0,1,2

Expansion follows Hydra's basic sweeper (the product of the axes, in the order written), then each cell
is composed by Hydra from conf/config.yaml plus `sweep=NAME`, the command line's fixed overrides and the
cell's own overrides. Command-line overrides of a grid key replace that axis, so
`memsweep launch sweep=smoke seed=0,1,2,3` grows the seeds without editing the file.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.spec import (
    Cell,
    CellSpec,
    DataSpec,
    ModelSpec,
    ReferenceOptions,
    RunOptions,
    SpecError,
    TextDataSpec,
    TrainSpec,
)
from models.storage import unknown_scheme

OmegaConf.register_new_resolver("abspath", lambda path: os.path.abspath(path), replace=True)


class ConfigError(ValueError):
    """A configuration cannot be composed or validated; the message names the cell and the field."""


def config_dir() -> Path:
    """conf/: $MEMSWEEP_CONF, else beside the packages (a checkout or editable install), else the
    copy installed as package data."""
    if os.environ.get("MEMSWEEP_CONF"):
        return Path(os.environ["MEMSWEEP_CONF"]).resolve()
    beside = Path(__file__).resolve().parents[1] / "conf"
    if (beside / "config.yaml").exists():
        return beside
    import importlib.resources

    return Path(str(importlib.resources.files("conf")))


@contextmanager
def hydra_context():
    """Initialise Hydra's global state on conf/ (re-entrant: an existing initialisation is kept)."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield


def compose_config(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Compose conf/config.yaml with overrides; a one-line ConfigError on an unknown name or key."""
    with hydra_context():
        try:
            return compose(config_name="config", overrides=list(overrides))
        except MissingConfigException as err:
            raise ConfigError(_missing_config_message(err, overrides)) from None
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(" ".join(str(err).split())) from None


def _missing_config_message(err: MissingConfigException, overrides) -> str:
    missing = err.missing_cfg_file or ""  # e.g. "model/l9"
    group = missing.rsplit("/", 1)[0] if "/" in missing else missing
    given = next((o for o in overrides if o.split("=")[0].lstrip("+~") == group), missing)
    choices = f"; choose one of {', '.join(sorted(err.options))}" if err.options else ""
    return f"{given}: no such {group} config{choices}"


# -- grids --------------------------------------------------------------------------------------------
def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list:
    """Hydra's parsed overrides. The parser sees the config loader, so `glob(...)` over config
    groups expands as it does with `--multirun`."""
    with hydra_context():
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        try:
            return parser.parse_overrides(list(overrides))
        except HydraException as err:
            raise ConfigError(" ".join(str(err).split())) from None


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(sweep overrides such as `seed=0,1`, fixed overrides such as `train.lr=1e-3`)."""
    parsed = parse_overrides(overrides)
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    return sweeps, fixed


def expand_grid(axes: list[str]) -> list[tuple[str, ...]]:
    """Override strings (sweep syntax allowed) -> one tuple of plain overrides per cell, in the basic
    sweeper's order."""
    choices = []
    with hydra_context():  # expanding glob(...) reads the config groups
        for override in parse_overrides(axes):
            key = override.get_key_element()
            if override.is_sweep_override():
                choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
            else:
                choices.append([f"{key}={override.get_value_element_as_str()}"])
    return list(itertools.product(*choices))


CELL_KEYS = ("model", "data", "precision", "train", "seed")  # what a cell's grid may choose


def sweep_level(fixed: list[str]) -> list[str]:
    """The fixed overrides that matter to the sweep as a whole (its file, tracking, storage, cluster),
    without those of the cells' own config (`data.corpus_uri=...`): a grid axis such as `data: text`
    may be what gives such a key its meaning, so they are applied per cell, after the grid's choices."""
    return [o for o in fixed if o.split("=", 1)[0].lstrip("+~").split(".")[0] not in CELL_KEYS]


@dataclass(frozen=True)
class Sweep:
    name: str
    cells: list[Cell]
    config: dict  # the sweep file's own node and the fixed overrides, for the record
    fixed_overrides: tuple[str, ...]


def load_sweep(overrides: list[str]) -> Sweep:
    """Expand, compose and validate every cell of `sweep=NAME [overrides]` before anything runs."""
    sweep_axes, fixed = split_overrides(overrides)
    base = compose_config(sweep_level(fixed))  # the sweep file itself, with where-to-record overrides
    if base.get("sweep") is None:
        raise ConfigError("sweep: no sweep chosen; pass sweep=NAME (see conf/sweep/)")
    name = str(base.sweep.name)
    grid = {str(k): str(v) for k, v in (base.sweep.get("grid") or {}).items()}
    for line in sweep_axes + [f for f in fixed if not f.startswith("sweep=")]:
        key = line.split("=", 1)[0]
        grid.pop(key, None)  # the command line replaces a grid axis of the same key
    axes = [f"{key}={values}" for key, values in grid.items()] + sweep_axes
    cells, seen, composer = [], {}, GridComposer(fixed)
    for cell_overrides in expand_grid(axes):
        cell = compose_cell(list(cell_overrides), label=" ".join(cell_overrides), composer=composer)
        if cell.cell_id in seen:
            raise ConfigError(
                f"cells [{seen[cell.cell_id]}] and [{' '.join(cell_overrides)}] are the same cell "
                f"{cell.cell_id}: the grid lists a value twice or varies a runtime option (paths, "
                f"tracking, cluster, device, eval_batch_size), which never changes a cell's numbers"
            )
        seen[cell.cell_id] = " ".join(cell_overrides)
        cells.append(dataclasses.replace(cell, overrides=tuple(cell_overrides)))
    if not cells:
        raise ConfigError(f"sweep={name}: the grid has no cells")
    cells = prepared(cells)
    record = {"sweep": OmegaConf.to_container(base.sweep, resolve=True), "overrides": list(overrides)}
    return Sweep(name=name, cells=cells, config=record, fixed_overrides=tuple(fixed))


def prepared(cells: list[Cell]) -> list[Cell]:
    """Cells with their text corpora checked, tokenizers stored and references attached
    (orchestrator.corpus); a corpus problem becomes a ConfigError naming the cell and the field."""
    from orchestrator.corpus import CorpusError, prepare_text_cells

    try:
        return prepare_text_cells(cells)
    except CorpusError as err:
        raise ConfigError(str(err)) from None


class GridComposer:
    """Composes the cells of one grid quickly and exactly as Hydra would.

    A full compose costs ~85 ms, so a 1,760-cell grid would take minutes to plan. Hydra composes a
    config from its group choices (model=..., train=...) and then applies each plain `key=value`
    override with OmegaConf.update; this composer does the first once per distinct combination of
    group choices and the second on a copy, per cell. Anything else (+key, ~key, a package
    override) takes the full compose. tests/orchestrator/test_compose_fast.py checks the equivalence.
    """

    def __init__(self, fixed: list[str]):
        self.fixed = list(fixed)
        self.groups = {p.name for p in config_dir().iterdir() if p.is_dir()}
        self.bases: dict[tuple[str, ...], DictConfig] = {}

    def compose(self, overrides: list[str]) -> DictConfig:
        parsed = parse_overrides(overrides)
        values = [o for o in parsed if self._is_plain_value(o)]
        structural = tuple(o.input_line for o in parsed if not self._is_plain_value(o))
        if structural not in self.bases:
            self.bases[structural] = compose_config(self.fixed + list(structural))
        cfg = copy.deepcopy(self.bases[structural])
        for override in values:
            key = override.key_or_group
            if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
                raise ConfigError(f"Could not override '{key}'. To append to your config use +{override.input_line}")
            try:
                OmegaConf.update(cfg, key, override.value(), merge=True)
            except OmegaConfBaseException as err:
                raise ConfigError(f"{override.input_line}: {' '.join(str(err).split())}") from None
        return cfg

    def _is_plain_value(self, override) -> bool:
        """`key=value` on a config key: not a group choice (`model=l1_d16`), append, delete or package."""
        key = override.key_or_group
        return not (override.is_add() or override.is_force_add() or override.is_delete()
                    or override.is_sweep_override() or override.is_hydra_override()
                    or override.package is not None or key in self.groups)


_ABSENT = object()


def compose_cell(overrides: list[str], label: str | None = None, composer: GridComposer | None = None) -> Cell:
    """Compose and validate one cell; errors name the cell (`label`) and the field. With a
    `composer`, `overrides` come on top of the composer's fixed overrides."""
    prefix = f"cell [{label}]: " if label else ""
    try:
        cfg = composer.compose(overrides) if composer else compose_config(overrides)
        spec = spec_from_config(cfg)
        reference = reference_options(cfg.data)
        options = options_from_config(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
    except (ConfigError, SpecError) as err:
        raise ConfigError(f"{prefix}{err}") from None
    except OmegaConfBaseException as err:  # an interpolation that cannot resolve, e.g. ${oc.env:UNSET}
        raise ConfigError(f"{prefix}{_omegaconf_message(err)}") from None
    return Cell(spec=spec, options=options, overrides=tuple(overrides), config=config,
                reference_options=reference)


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """One line naming the field: `data.num_sequences: Environment variable 'NOPE' not found`."""
    text = " ".join(str(err).split("\n")[0].split())
    key = getattr(err, "full_key", None)
    return f"{key}: {text}" if key else text


# -- DictConfig -> frozen specs ------------------------------------------------------------------------
def typed_options(cls, node, section: str):
    """Build dataclass `cls` from a config node, checking every field's type and unknown keys."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SpecError(f"{section}.{unknown[0]}: unknown field; {section} has {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name not in values:
            if field.default is dataclasses.MISSING:
                raise SpecError(f"{section}.{name} is missing")
            continue
        kwargs[name] = _coerce(values[name], hints[name], f"{section}.{name}")
    return cls(**kwargs)


def _coerce(value, kind, where: str):
    """Check (and losslessly convert) a config value against a field's type: int, float, str, bool,
    `X | None`, or a union of these (`bool | str`: the first that takes the value)."""
    if typing.get_origin(kind) not in (typing.Union, types.UnionType):
        args = (kind,)
    else:
        args = typing.get_args(kind)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        args = tuple(a for a in args if a is not type(None))
    if len(args) > 1:
        for option in args:
            try:
                return _coerce(value, option, where)
            except SpecError:
                pass
        raise SpecError(f"{where}={value!r} must be {' or '.join(a.__name__ for a in args)}")
    kind = args[0]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise SpecError(f"{where}={value!r} must be {getattr(kind, '__name__', kind)}")


def spec_from_config(cfg: DictConfig) -> CellSpec:
    """The cell's frozen spec. A text cell's tokenizer hash and reference are attached afterwards by
    orchestrator.corpus.prepare_text_cells, which reads the corpus, the reference from the cell's
    `reference_options`."""
    if "precision" not in cfg or "name" not in cfg.precision:
        raise SpecError("precision: choose one of fp32, bf16, amp_bf16")
    return CellSpec(
        model=typed_options(ModelSpec, cfg.model, "model"),
        data=data_spec(cfg.data),
        train=typed_options(TrainSpec, cfg.train, "train"),
        precision=_coerce(cfg.precision.name, str, "precision"),
        seed=_coerce(cfg.seed, int, "seed"),
    )


def data_spec(node: DictConfig) -> DataSpec | TextDataSpec:
    """The `data` section as a spec; a text section's `reference` is typed by `reference_options`."""
    if _is_text(node):
        values = OmegaConf.to_container(node, resolve=True)
        values.pop("reference", None)
        if "tokenizer_hash" in values:
            raise SpecError("data.tokenizer_hash is set by memsweep from the tokenizer it builds; "
                            "do not set it")
        return typed_options(TextDataSpec, values, "data")
    return typed_options(DataSpec, node, "data")


def reference_options(node: DictConfig) -> ReferenceOptions | None:
    """A text `data` section's `reference` (how the cell's reference model is made), typed; None for
    synthetic data, which is measured without a reference."""
    if not _is_text(node):
        return None
    return typed_options(ReferenceOptions, node.get("reference") or {}, "data.reference")


def _is_text(node: DictConfig) -> bool:
    return node.get("kind", "synthetic") == "text"


def sweep_config(sweep: str, overrides: list[str]) -> DictConfig:
    """The configuration `sweep=NAME` plus the command line's fixed overrides compose to: where a
    sweep that already ran is recorded (status, resume, aggregate, report read it from here)."""
    _, fixed = split_overrides(list(overrides))
    cfg = compose_config([f"sweep={sweep}", *sweep_level(fixed)])
    if experiment_name(cfg) != sweep:
        raise ConfigError(f"sweep={sweep}: the sweep file names itself {experiment_name(cfg)!r}")
    return cfg


def sweep_runtime(sweep: str, overrides: list[str]) -> tuple[RunOptions, dict]:
    """Where and how the cells of `sweep=NAME` run under `overrides` (tracking, storage, device, ...)
    and the resolved sweep-level config (its `cluster` and `pack` sections), without composing a cell."""
    try:
        cfg = sweep_config(sweep, [o for o in overrides if not o.startswith("sweep=")])
        return options_from_config(cfg), OmegaConf.to_container(cfg, resolve=True)
    except SpecError as err:
        raise ConfigError(str(err)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None


def experiment_name(cfg: DictConfig) -> str:
    """One MLflow experiment per sweep; single `memsweep run` cells go to "adhoc"."""
    return str(cfg.sweep.name) if cfg.get("sweep") is not None else "adhoc"


def options_from_config(cfg: DictConfig) -> RunOptions:
    name = experiment_name(cfg)
    uris = {"storage": str(cfg.storage), "data.corpus_uri": str(cfg.data.get("corpus_uri") or "")}
    for field_name, uri in uris.items():
        scheme = unknown_scheme(uri)
        if scheme:
            raise ConfigError(f"{field_name}={uri!r}: no filesystem opens {scheme}:// URIs; give a local path "
                              "or a file://, s3://, gs://, hdfs:// or abfs:// URI")
    return RunOptions(
        storage=str(cfg.storage),
        tracking_uri=str(cfg.tracking.uri),
        experiment=name,
        artifact_root=None if cfg.tracking.artifact_root is None else str(cfg.tracking.artifact_root),
        sweep=name,
        device=str(cfg.device),
        eval_batch_size=_coerce(cfg.eval_batch_size, int, "eval_batch_size"),
    )
