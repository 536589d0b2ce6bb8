"""Hydra's home: compose configs, expand sweep grids, and turn resolved configs into frozen specs.

Nothing below this module sees a DictConfig. A sweep file (conf/sweep/NAME.yaml) holds a `grid` in
Hydra's own override grammar, exactly what a user would pass to `--multirun`:

    grid:
      model: l1_d16,l2_d16              # or glob(l*_d32)
      data.num_sequences: range(20,200,40)
      seed: 0,1,2

Expansion follows Hydra's basic sweeper (the product of the axes, in the order written), then each cell
is the configuration Hydra composes from conf/config.yaml plus `sweep=NAME`, the command line's fixed
overrides and the cell's own overrides: composed once per combination of config groups and derived per
cell by typed updates (GridComposer), exactly as a full compose of the cell gives it. Command-line
overrides of a grid key replace that axis, so `memsweep launch sweep=smoke seed=0,1,2,3` grows the
seeds without editing the file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
import re
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
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
from orchestrator.capacity_axis import KEY as CAPACITY_KEY, CapacityAxis, is_capacity_value, split_axes

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


PACKAGES = ("models", "orchestrator", "measure")  # memsweep's code that composing and typing a cell runs
ENV_READ = re.compile(r"oc\.env:([A-Za-z_][A-Za-z0-9_]*)")


def grid_fingerprint(overrides: list[str]) -> str:
    """A hash of everything composing `overrides` reads: the overrides, every file of conf/, memsweep's
    code (PACKAGES), the environment variables conf/ reads, and hydra-core's and omegaconf's versions.
    Two compositions with one fingerprint give the same cells, so `status` need not compose today's grid
    to know that it was recorded (launch.plan_drift). A change anywhere, even one that moves no id, gives
    another fingerprint: that only costs a composition. (Text cells also read their corpus: their plans
    are not fingerprinted.)"""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:  # importable without metadata: its code still counts, unversioned
            return "unknown"

    digest = hashlib.sha256()

    def add(*parts: str | bytes) -> None:
        for part in parts:
            digest.update(part if isinstance(part, bytes) else part.encode())
            digest.update(b"\x1f")

    add("overrides", *overrides, "versions", installed("hydra-core"), installed("omegaconf"))
    code = Path(__file__).resolve().parents[1]
    trees = [("conf", config_dir(), "*")] + [(name, code / name, "*.py") for name in PACKAGES]
    env: set[str] = set()
    for name, root, pattern in trees:
        for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
            content = path.read_bytes()
            add(name, path.relative_to(root).as_posix(), content)
            if name == "conf":
                env.update(ENV_READ.findall(content.decode(errors="replace")))
    for variable in sorted(env):
        add("env", variable, os.environ.get(variable, "\x00unset"))
    return digest.hexdigest()


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
    """Expand, compose and validate every cell of `sweep=NAME [overrides]` before anything runs. A
    `data.num_sequences: capacity(...)` axis (in the file or on the command line, which Hydra's grammar
    would refuse) sizes each composed cell by its shape's predicted capacity (orchestrator.capacity_axis)."""
    sized = [o for o in overrides if is_capacity_value(o.partition("=")[2])]
    sweep_axes, fixed = split_overrides([o for o in overrides if o not in sized])
    base = compose_config(sweep_level(fixed))  # the sweep file itself, with where-to-record overrides
    if base.get("sweep") is None:
        raise ConfigError("sweep: no sweep chosen; pass sweep=NAME (see conf/sweep/)")
    name = str(base.sweep.name)
    grid = {str(k): str(v) for k, v in (base.sweep.get("grid") or {}).items()}
    for line in sweep_axes + sized + [f for f in fixed if not f.startswith("sweep=")]:
        key = line.split("=", 1)[0]
        grid.pop(key, None)  # the command line replaces a grid axis of the same key
    grid.update(line.split("=", 1) for line in sized)
    try:
        grid, capacity = split_axes(grid, OmegaConf.to_container(base.sweep, resolve=True).get("capacity_alpha"))
    except SpecError as err:
        raise ConfigError(str(err)) from None
    axes = [f"{key}={values}" for key, values in grid.items()] + sweep_axes
    cells = GridComposer(fixed).cells(expand_grid(axes))
    if capacity is not None:
        cells = expand_capacity(cells, capacity)
    check_distinct(cells)
    if not cells:
        raise ConfigError(f"sweep={name}: the grid has no cells")
    cells = prepared(cells)
    record = {"sweep": OmegaConf.to_container(base.sweep, resolve=True), "overrides": list(overrides)}
    return Sweep(name=name, cells=cells, config=record, fixed_overrides=tuple(fixed))


def check_distinct(cells: list[Cell]) -> None:
    """Two cells of a grid with one id would run once and be counted twice: refused, naming both."""
    seen: dict[str, str] = {}
    for cell in cells:
        label = " ".join(cell.overrides)
        if cell.cell_id in seen:
            raise ConfigError(
                f"cells [{seen[cell.cell_id]}] and [{label}] are the same cell "
                f"{cell.cell_id}: the grid lists a value twice or varies a runtime option (paths, "
                f"tracking, cluster, device, eval_batch_size), which never changes a cell's numbers"
            )
        seen[cell.cell_id] = label


def prepared(cells: list[Cell]) -> list[Cell]:
    """Cells with their text corpora checked, tokenizers stored and references attached
    (orchestrator.corpus); a corpus problem becomes a ConfigError naming the cell and the field."""
    from orchestrator.corpus import CorpusError, prepare_text_cells

    try:
        return prepare_text_cells(cells)
    except CorpusError as err:
        raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class _Base:
    """One combination of group choices (model=..., train=...) with the fixed overrides, as Hydra
    composed it, and resolved once."""

    cfg: DictConfig
    config: dict | None  # resolved; None where it does not resolve (its cells then resolve one by one)
    interpolated: frozenset[str]  # every name in the text of an interpolation (`root_dir`, `oc`, ...)


@dataclass(frozen=True)
class _Line:
    """One distinct override string of a grid, parsed once."""

    override: Override
    plain: bool  # a `key=value` on a config key (see GridComposer._is_plain_value)
    section: str | None  # the top-level key of CELL_KEYS it sets; None: a runtime key (or not plain)
    value: object = None  # a plain override's value, as Hydra parses it


class GridComposer:
    """Composes the cells of one grid quickly and exactly as Hydra would.

    A full compose costs ~100 ms, so a grid of 100,000 cells would take hours to plan. Hydra composes a
    config from its group choices (model=..., train=...) and then applies each plain `key=value`
    override with OmegaConf.update. This composer asks Hydra once per distinct combination of group
    choices (a base) and resolves that base once; a cell is its base's resolved config with the cell's
    plain values set (a typed update: only the dicts on the key's path are copied), and each typed
    piece of it (PIECES: model, data, train, ..., options) is built by the full path's own code from the
    one section it reads, once per distinct set of overrides of that section. Where setting a value on
    the resolved config could differ from Hydra's update-then-resolve (a key that an interpolation
    mentions, such as `root_dir`; a value that is an interpolation, a list or a dict; a key that is
    absent or holds a section; a base that does not resolve) the cell takes the per-cell path: its
    base copied and updated as Hydra would, then resolved. Anything else (+key, ~key, a package
    override) is part of the base. tests/orchestrator/test_compose_fast.py and test_fast_planning.py
    check the equivalence with a full compose per cell.
    """

    def __init__(self, fixed: list[str]):
        self.fixed = list(fixed)
        self.groups = {p.name for p in config_dir().iterdir() if p.is_dir()}
        self.bases: dict[tuple[str, ...], _Base] = {}
        self.lines: dict[str, _Line] = {}
        self.exact: dict[tuple, bool] = {}  # (base, override) -> whether a typed update is exact
        self.pieces: dict[tuple, object] = {}  # (base, piece name, the section's overrides) -> piece

    def cells(self, grid: list[tuple[str, ...]]) -> list[Cell]:
        """Every cell of an expanded grid (expand_grid), in order; the distinct override strings are
        parsed in one pass."""
        self._parse(list(dict.fromkeys(line for overrides in grid for line in overrides)))
        return [compose_cell(list(overrides), label=" ".join(overrides), composer=self) for overrides in grid]

    def cell(self, overrides: list[str]) -> Cell:
        """One cell (`overrides` on top of the fixed ones), unlabelled: compose_cell names it in errors."""
        lines = self._parse(overrides)
        structural = tuple(line.override.input_line for line in lines if not line.plain)
        values = [line for line in lines if line.plain]
        base = self._base(structural)
        if not all(self._exactly(structural, base, line) for line in values):
            return _resolved_cell(self._updated(base.cfg, [line.override for line in values]), overrides)
        config = base.config
        by_section: dict[str | None, tuple[str, ...]] = {}
        for line in values:
            config = _with_value(config, line.override.key_or_group.split("."), line.value)
            by_section[line.section] = (*by_section.get(line.section, ()), line.override.input_line)

        def piece(name: str):
            key = (structural, name, by_section.get(PIECES[name][0], ()))
            if key not in self.pieces:
                self.pieces[key] = _build(name, config)
            return self.pieces[key]

        return _assemble(config, overrides, piece)

    def compose(self, overrides: list[str]) -> DictConfig:
        """The cell's DictConfig as Hydra composes it (the per-cell path)."""
        lines = self._parse(overrides)
        base = self._base(tuple(line.override.input_line for line in lines if not line.plain))
        return self._updated(base.cfg, [line.override for line in lines if line.plain])

    def _parse(self, overrides: list[str]) -> list[_Line]:
        new = [o for o in dict.fromkeys(overrides) if o not in self.lines]
        for line, override in zip(new, parse_overrides(new) if new else []):
            plain = self._is_plain_value(override)
            top = override.key_or_group.split(".")[0]
            self.lines[line] = _Line(override, plain, top if plain and top in CELL_KEYS else None,
                                     override.value() if plain else None)
        return [self.lines[o] for o in overrides]

    def _exactly(self, structural: tuple[str, ...], base: _Base, line: _Line) -> bool:
        key = (structural, line.override.input_line)
        if key not in self.exact:
            self.exact[key] = _updates_exactly(base, line.override.key_or_group, line.value)
        return self.exact[key]

    def _base(self, structural: tuple[str, ...]) -> _Base:
        if structural not in self.bases:
            cfg = compose_config(self.fixed + list(structural))
            try:
                config = OmegaConf.to_container(cfg, resolve=True)
            except OmegaConfBaseException:
                config = None
            raw = OmegaConf.to_container(cfg, resolve=False)
            self.bases[structural] = _Base(cfg, config, frozenset(_interpolated_names(raw)))
        return self.bases[structural]

    @staticmethod
    def _updated(base: DictConfig, values: list) -> DictConfig:
        """A copy of `base` with the plain overrides applied as Hydra applies them."""
        cfg = copy.deepcopy(base)
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
_NAME = re.compile(r"[A-Za-z_]\w*")


def _interpolated_names(node) -> set[str]:
    """Every name in the text of the interpolations of an unresolved config (conservatively: any word
    of a string that holds `${`), i.e. every key another value may depend on."""
    if isinstance(node, dict):
        return set().union(*(_interpolated_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_interpolated_names(v) for v in node))
    return set(_NAME.findall(node)) if isinstance(node, str) and "${" in node else set()


def _updates_exactly(base: _Base, key: str, value) -> bool:
    """Whether setting `key=value` on the base's resolved config gives exactly what Hydra's update of
    the base, then resolving, gives: a scalar that is no interpolation, on a scalar key that no
    interpolation mentions."""
    if base.config is None or not isinstance(value, (str, int, float, bool, type(None))):
        return False
    if isinstance(value, str) and "${" in value:
        return False
    if any(part in base.interpolated for part in key.split(".")):
        return False
    try:
        return not isinstance(_value(base.config, key), (dict, list))
    except SpecError:  # absent: the per-cell path refuses it as Hydra does
        return False


def _with_value(config: dict, path: list[str], value) -> dict:
    """`config` with the value at `path` replaced: the dicts on the path copied, the rest shared."""
    head, *rest = path
    return {**config, head: _with_value(config[head], rest, value) if rest else value}


def _value(config: dict, key: str):
    """The resolved config's value at a dotted key; a SpecError naming the key where it is absent."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SpecError(f"{key} is missing")
        node = node[part]
    return node


def compose_cell(overrides: list[str], label: str | None = None, composer: GridComposer | None = None) -> Cell:
    """Compose and validate one cell; errors name the cell (`label`) and the field. With a
    `composer`, `overrides` come on top of the composer's fixed overrides."""
    prefix = f"cell [{label}]: " if label else ""
    try:
        return composer.cell(overrides) if composer else _resolved_cell(compose_config(overrides), overrides)
    except (ConfigError, SpecError) as err:
        raise ConfigError(f"{prefix}{err}") from None
    except OmegaConfBaseException as err:  # an interpolation that cannot resolve, e.g. ${oc.env:UNSET}
        raise ConfigError(f"{prefix}{_omegaconf_message(err)}") from None


def _resolved_cell(cfg: DictConfig, overrides: list[str]) -> Cell:
    """The cell of a composed DictConfig: resolved, then every typed piece built from it."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return _assemble(config, overrides, lambda name: _build(name, config))


def _assemble(config: dict, overrides: list[str], piece) -> Cell:
    """A Cell from its resolved config and `piece(name)`, each of PIECES built (or recalled), in order."""
    pieces = {name: piece(name) for name in PIECES}
    spec = CellSpec(model=pieces["model"], data=pieces["data"], train=pieces["train"],
                    precision=pieces["precision"], seed=pieces["seed"])
    return Cell(spec=spec, options=pieces["options"], overrides=tuple(overrides), config=config,
                reference_options=pieces["reference"])


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """One line naming the field: `data.num_sequences: Environment variable 'NOPE' not found`."""
    text = " ".join(str(err).split("\n")[0].split())
    key = getattr(err, "full_key", None)
    return f"{key}: {text}" if key else text


# -- resolved config -> frozen specs -------------------------------------------------------------------
def typed_options(cls, node, section: str):
    """Build dataclass `cls` from a config node, checking every field's type and unknown keys."""
    if node is None:
        raise SpecError(f"{section} is missing")
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    hints, fields = _fields(cls)
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


@functools.cache
def _fields(cls) -> tuple[dict, dict]:
    """A dataclass's field types and fields (resolving the annotations is the costly part)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


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


def precision_name(node: dict | None) -> str:
    """The `precision` section's name (the config group's choice)."""
    if not isinstance(node, dict) or "name" not in node:
        raise SpecError("precision: choose one of fp32, bf16, amp_bf16")
    return _coerce(node["name"], str, "precision")


def data_spec(node: dict | None) -> DataSpec | TextDataSpec:
    """The `data` section as a spec; a text section's `reference` is typed by `reference_options`."""
    if node is not None and _is_text(node):
        values = dict(node)
        values.pop("reference", None)
        if "tokenizer_hash" in values:
            raise SpecError("data.tokenizer_hash is set by memsweep from the tokenizer it builds; "
                            "do not set it")
        _check_scheme("data.corpus_uri", str(values.get("corpus_uri") or ""))
        return typed_options(TextDataSpec, values, "data")
    return typed_options(DataSpec, node, "data")


def reference_options(node: dict | None) -> ReferenceOptions | None:
    """A text `data` section's `reference` (how the cell's reference model is made), typed; None for
    synthetic data, which is measured without a reference."""
    if node is None or not _is_text(node):
        return None
    return typed_options(ReferenceOptions, node.get("reference") or {}, "data.reference")


def _is_text(node: dict) -> bool:
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
        config = OmegaConf.to_container(cfg, resolve=True)
        return options_from_config(config), config
    except SpecError as err:
        raise ConfigError(str(err)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None


def experiment_name(cfg: DictConfig | dict) -> str:
    """One MLflow experiment per sweep; single `memsweep run` cells go to "adhoc"."""
    return str(cfg["sweep"]["name"]) if cfg.get("sweep") is not None else "adhoc"


def options_from_config(config: dict) -> RunOptions:
    """Where and how a cell runs, from the resolved config's keys outside CELL_KEYS."""
    storage, tracking = str(_value(config, "storage")), _value(config, "tracking")
    _check_scheme("storage", storage)
    name = experiment_name(config)
    return RunOptions(
        storage=storage,
        tracking_uri=str(_value(tracking, "uri")),
        experiment=name,
        artifact_root=None if tracking.get("artifact_root") is None else str(tracking["artifact_root"]),
        sweep=name,
        device=str(_value(config, "device")),
        eval_batch_size=_coerce(_value(config, "eval_batch_size"), int, "eval_batch_size"),
    )


def _check_scheme(field_name: str, uri: str) -> None:
    """A URI no filesystem opens is refused at planning, naming the field."""
    scheme = unknown_scheme(uri)
    if scheme:
        raise ConfigError(f"{field_name}={uri!r}: no filesystem opens {scheme}:// URIs; give a local path "
                          "or a file://, s3://, gs://, hdfs:// or abfs:// URI")


# A cell's typed pieces, in the order they are checked: (the section of the resolved config each is
# built from, alone: a key of CELL_KEYS, or None for the rest of the config, the runtime options; the
# builder). GridComposer builds a piece once per distinct set of overrides of its section.
PIECES = {
    "model": ("model", lambda node: typed_options(ModelSpec, node, "model")),
    "data": ("data", data_spec),
    "train": ("train", lambda node: typed_options(TrainSpec, node, "train")),
    "precision": ("precision", precision_name),
    "seed": ("seed", lambda node: _coerce(node, int, "seed")),
    "reference": ("data", reference_options),
    "options": (None, options_from_config),
}


def _build(name: str, config: dict):
    """The piece `name` of a cell (PIECES) from its resolved config."""
    section, builder = PIECES[name]
    if section is None:
        return builder({key: value for key, value in config.items() if key not in CELL_KEYS})
    return builder(config.get(section))


# -- typed updates of composed cells ------------------------------------------------------------------
UPDATABLE_SECTIONS = ("model", "data", "train")  # with_updates' `section.field` keys; `seed` besides


def expand_capacity(cells: list[Cell], axis: CapacityAxis) -> list[Cell]:
    """One cell per (cell, multiple), in that order, sized by a capacity axis (orchestrator.capacity_axis).
    Two multiples that round to the same N for a cell make one cell: the later is dropped (a tiny
    shape's 0.25 and 0.3 may both give N = 2)."""
    expanded = []
    for cell in cells:
        seen = set()
        for multiple in axis.multiples:
            try:
                n = axis.sequences(cell.spec, multiple)
            except SpecError as err:
                raise ConfigError(str(err)) from None
            if n in seen:
                continue
            seen.add(n)
            sized = with_updates(cell, {CAPACITY_KEY: n})
            capacity = {"multiple": multiple, "alpha_bits_per_param": axis.alpha[cell.spec.precision]}
            expanded.append(dataclasses.replace(sized, config={**sized.config, "capacity": capacity}))
    return expanded


def with_updates(cell: Cell, updates: dict[str, object]) -> Cell:
    """`cell` with plain values changed (`data.num_sequences`, `seed`, `train.max_steps`, ...): the spec
    rebuilt and validated (its id follows), each `key=value` override replacing any earlier one for
    that key, the recorded config updated on a copy of the dicts along each key (the rest stays shared,
    as between the cells of a grid). A one-line ConfigError names a bad key or value."""
    spec, config = cell.spec, cell.config
    for key, value in updates.items():
        spec = _updated_spec(spec, key, value)
        config = _with_value(config, key.split("."), value)
    changed = [f"{key}={value}" for key, value in updates.items()]
    kept = [o for o in cell.overrides if o.split("=", 1)[0] not in updates]
    return dataclasses.replace(cell, spec=spec, overrides=(*kept, *changed), config=config, recorded_id=None)


def _updated_spec(spec: CellSpec, key: str, value) -> CellSpec:
    """`spec` with one `section.field` (or `seed`) replaced, type-checked and validated."""
    try:
        if key == "seed":
            return dataclasses.replace(spec, seed=_coerce(value, int, "seed"))
        section, _, name = key.partition(".")
        if section not in UPDATABLE_SECTIONS or name not in {f.name for f in dataclasses.fields(getattr(spec, section))}:
            raise ConfigError(f"{key}: not a field of the cell's spec (seed, or model.*, data.*, train.*)")
        current = getattr(spec, section)
        replaced = typed_options(type(current), {**dataclasses.asdict(current), name: value}, section)
        return dataclasses.replace(spec, **{section: replaced})
    except SpecError as err:
        raise ConfigError(str(err)) from None
