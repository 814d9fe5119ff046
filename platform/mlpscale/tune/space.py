"""Search-space files: parse and validate a YAML space against the pretrain config, turn it into Tune domains.

A space file maps pretrain config fields to distributions:

    lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}
    batch_size: {distribution: choice, values: [256, 512, 1024]}
    epochs: {distribution: int, low: 1, high: 4}
    label_smoothing: {distribution: uniform, low: 0.0, high: 0.3}
    mixup_alpha: {distribution: grid, values: [0.0, 0.8]}

Everything is checked before any trial starts; errors name the entry and the fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlpscale import config_fields
from mlpscale.config import CHOICES, PretrainConfig, apply, validate
from mlpscale.config_fields import base_type
from mlpscale.errors import MlpscaleError

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice", "grid")
VALUE_DISTRIBUTIONS = ("choice", "grid")
# Fields a sweep must not vary: they say where results go or how the job runs, not what is trained.
NOT_SEARCHABLE = frozenset(
    {
        "experiment",
        "run_name",
        "tracking_uri",
        "register",
        "data_dir",
        "num_workers",
        "checkpoint_every",
        "keep_checkpoints",
        "storage_path",
        "max_failures",
        "use_gpu",
        "log_model",
    }
)


@dataclass(frozen=True)
class ParamSpec:
    """One searched field: its distribution and either a range (low, high) or a list of values."""

    field: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple | None = None
    log: bool = False

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"distribution": self.distribution}
        if self.values is not None:
            entry["values"] = list(self.values)
        else:
            entry["low"], entry["high"] = self.low, self.high
            if self.log:
                entry["log"] = True
        return {self.field: entry}


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space and the file it came from."""

    params: tuple[ParamSpec, ...]
    source: str = "<inline>"

    @property
    def fields(self) -> list[str]:
        return [p.field for p in self.params]

    @property
    def has_grid(self) -> bool:
        return any(p.distribution == "grid" for p in self.params)

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params if p.distribution == "grid")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.params:
            out.update(p.to_dict())
        return out


def pretrain_field_types() -> dict[str, Any]:
    """Each PretrainConfig field and its (resolved) type annotation."""
    return config_fields.field_types(PretrainConfig)


def load_space(path: str | Path, field_types: dict[str, Any] | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in (Path(__file__).resolve().parents[3] / "search_spaces").glob("*.yaml"))
        raise MlpscaleError(
            f"search space file {str(path)!r} does not exist; pass an existing YAML file "
            f"(shipped: {', '.join('search_spaces/' + s for s in shipped) or 'none'})"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MlpscaleError(f"search space file {str(path)!r} is not valid YAML: {error}") from error
    return parse_space(raw, field_types=field_types, source=str(path))


def parse_space(
    raw: Any,
    field_types: dict[str, Any] | None = None,
    source: str = "<inline>",
    choices: dict[str, tuple] | None = None,
) -> SearchSpace:
    """Validate a space given as a mapping {field: {distribution: ..., ...}}.

    `field_types` and `choices` default to the pretrain config's fields and enumerations.
    """
    where = f"search space {source}"
    if not isinstance(raw, dict) or not raw:
        raise MlpscaleError(
            f"{where} must be a non-empty mapping of pretrain config fields to "
            f"{{distribution: ..., low/high or values}}; got {type(raw).__name__}"
        )
    types = field_types if field_types is not None else pretrain_field_types()
    if choices is None:
        choices = dict(CHOICES) if field_types is None else {}
    params = tuple(_parse_entry(str(name), entry, types, where) for name, entry in raw.items())
    for p in params:
        allowed = choices.get(p.field)
        if allowed is not None:
            bad = [v for v in (p.values or ()) if v not in allowed]
            if p.values is None or bad:
                raise MlpscaleError(
                    f"{where}: entry {p.field!r} may only take {', '.join(map(str, allowed))}; "
                    f"got {bad or p.distribution!r}; use choice or grid with those values"
                )
    return SearchSpace(params=params, source=source)


def _parse_entry(name: str, entry: Any, types: dict[str, Any], where: str) -> ParamSpec:
    label = f"{where}: entry {name!r}"
    if name not in types:
        raise MlpscaleError(
            f"{label} is not a pretrain config field; searchable fields: "
            f"{', '.join(sorted(f for f in types if f not in NOT_SEARCHABLE))}"
        )
    if name in NOT_SEARCHABLE:
        raise MlpscaleError(
            f"{label} cannot be searched (it says where results go or how the job runs); "
            f"set it as a pretrain option instead"
        )
    if not isinstance(entry, dict):
        raise MlpscaleError(
            f"{label} must be a mapping like {{distribution: loguniform, low: 1e-5, high: 1e-3}}; got {entry!r}"
        )
    allowed_keys = {"distribution", "low", "high", "values", "log"}
    unknown = sorted(set(entry) - allowed_keys)
    if unknown:
        raise MlpscaleError(
            f"{label} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed_keys))}"
        )
    distribution = entry.get("distribution")
    if distribution not in DISTRIBUTIONS:
        raise MlpscaleError(f"{label} has unknown distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")
    kind = base_type(types[name])[0]
    if distribution in VALUE_DISTRIBUTIONS:
        return _parse_values(name, entry, distribution, kind, label)
    return _parse_range(name, entry, distribution, kind, label)


def _parse_values(name: str, entry: dict, distribution: str, kind: Any, label: str) -> ParamSpec:
    if "low" in entry or "high" in entry or "log" in entry:
        raise MlpscaleError(
            f"{label}: distribution {distribution!r} takes 'values', not low/high/log; "
            f"use loguniform/uniform/int for a range"
        )
    values = entry.get("values")
    if not isinstance(values, list) or not values:
        raise MlpscaleError(f"{label}: distribution {distribution!r} needs a non-empty list 'values'; got {values!r}")
    checked = tuple(_coerce(v, kind, label) for v in values)
    if len(set(map(repr, checked))) != len(checked):
        raise MlpscaleError(f"{label}: 'values' has duplicates {values!r}; list each value once")
    return ParamSpec(field=name, distribution=distribution, values=checked)


def _parse_range(name: str, entry: dict, distribution: str, kind: Any, label: str) -> ParamSpec:
    if "values" in entry:
        raise MlpscaleError(
            f"{label}: 'values' is only for choice or grid; distribution {distribution!r} takes low and high"
        )
    if kind not in (int, float):
        raise MlpscaleError(
            f"{label}: field {name!r} is of type {getattr(kind, '__name__', kind)}, "
            f"not numeric; use distribution choice with a list of values"
        )
    if distribution == "int" and kind is not int:
        raise MlpscaleError(
            f"{label}: distribution 'int' needs an integer field but {name!r} is a float; use uniform or loguniform"
        )
    if distribution != "int" and kind is int:
        raise MlpscaleError(
            f"{label}: field {name!r} is an integer; use distribution 'int' (with log: true "
            f"for a log scale) or 'choice'"
        )
    low, high = entry.get("low"), entry.get("high")
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MlpscaleError(f"{label}: {bound} must be a finite number; got {value!r}")
        if distribution == "int" and float(value) != int(value):
            raise MlpscaleError(f"{label}: {bound} must be a whole number for distribution 'int'; got {value!r}")
    if not low < high:
        raise MlpscaleError(f"{label}: low ({low}) must be smaller than high ({high})")
    log = entry.get("log", distribution == "loguniform")
    if not isinstance(log, bool):
        raise MlpscaleError(f"{label}: log must be true or false; got {log!r}")
    if distribution == "uniform" and log:
        raise MlpscaleError(f"{label}: log: true with uniform; use distribution loguniform instead")
    if distribution == "loguniform" and not log:
        raise MlpscaleError(f"{label}: loguniform is always on a log scale; use uniform for a linear range")
    if log and low <= 0:
        raise MlpscaleError(f"{label}: a log-scale range needs low > 0; got low={low}")
    if distribution == "int":
        return ParamSpec(field=name, distribution=distribution, low=int(low), high=int(high), log=log)
    return ParamSpec(field=name, distribution=distribution, low=float(low), high=float(high), log=log)


def _coerce(value: Any, kind: Any, label: str) -> Any:
    """A value checked against the field's type (ints accepted for float fields)."""
    name = getattr(kind, "__name__", str(kind))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif kind in (tuple, list):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = True
    if not ok:
        raise MlpscaleError(f"{label}: value {value!r} is not of the field's type {name}")
    return value


def to_tune_space(space: SearchSpace) -> dict[str, Any]:
    """Tune domains for each entry (grid entries become tune.grid_search)."""
    from ray import tune

    out: dict[str, Any] = {}
    for p in space.params:
        if p.distribution == "grid":
            out[p.field] = tune.grid_search([tune_value(v) for v in p.values])
        elif p.distribution == "choice":
            out[p.field] = tune.choice([tune_value(v) for v in p.values])
        elif p.distribution == "loguniform":
            out[p.field] = tune.loguniform(p.low, p.high)
        elif p.distribution == "uniform":
            out[p.field] = tune.uniform(p.low, p.high)
        else:  # int: high is inclusive in the space file
            out[p.field] = (tune.lograndint if p.log else tune.randint)(p.low, p.high + 1)
    return out


def tune_value(value: Any) -> Any:
    # Optuna's categorical choices must be None/bool/int/float/str: sequences travel as JSON strings.
    return json.dumps(list(value)) if isinstance(value, tuple) else value


def from_tune_value(value: Any, field: str | Any) -> Any:
    """A sampled value back in the config's type (JSON strings of sequence fields become tuples).

    `field` is a PretrainConfig field name, whose type the config's hints give, or a type annotation.
    """
    annotation = pretrain_field_types().get(field, Any) if isinstance(field, str) else field
    if base_type(annotation)[0] in (tuple, list) and isinstance(value, str):
        return tuple(json.loads(value))
    return value


def check_against_config(space: SearchSpace, base) -> None:
    """Every value a range can reach (its ends) and every listed value must make a valid config from `base`."""
    for p in space.params:
        candidates = p.values if p.values is not None else (p.low, p.high)
        for value in candidates:
            try:
                validate(apply(base, {p.field: value}))
            except MlpscaleError as error:
                raise MlpscaleError(
                    f"search space {space.source}: entry {p.field!r} reaches {value!r}, "
                    f"which the pretrain config rejects: {error}"
                ) from None
