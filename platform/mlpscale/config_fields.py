"""The machinery every run config shares, written once and generic over the config dataclass.

A run config is a dataclass deriving from RunConfig whose fields are declared with
`setting(default, help, choices=...)` (PretrainConfig in config.py, TransferConfig in
transfer/config.py). From the fields alone come: coercion of YAML/CLI values (`apply`), the
choice and range checks, YAML files, one `--field-name` option per field whose help says what the
field means, the overrides a user gave (`user_overrides`), and the Markdown field tables of the
docs. A doc keeps each table between `<!-- fields-table MODULE ... -->` and
`<!-- end fields-table -->`; `python -m mlpscale.config_fields` rewrites them from MODULE's
`fields_table()` (`--check` only reports the stale ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mlpscale.errors import MlpscaleError

ARG_PREFIX = "cfg__"  # the argparse dest of field f's option is cfg__f
REGENERATE_COMMAND = "python -m mlpscale.config_fields"
DefaultText = Callable[[str, Any], str]  # (field, dataclass default) -> the default as --help and the tables say it


class RunConfig:
    """Base of the run-config dataclasses: `to_dict()`, and `label`, the config's name in error messages."""

    label: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-friendly values (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()
        }


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its one-line description (for --help and the docs' tables) and its allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def field_names(config_class: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(config_class))


def field_types(config_class: type) -> dict[str, Any]:
    """Each field and its resolved type annotation."""
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def field_choices(config_class: type) -> dict[str, tuple[str, ...]]:
    """The allowed values of the enumerated fields (optimizer, schedule, ...)."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(config_class) if f.metadata.get("choices")}


def field_help(config_class: type) -> dict[str, str]:
    """Each field's one-line description."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config_class)}


def base_type(hint) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of a field's annotation: `int | None` -> (int, True)."""
    args = typing.get_args(hint)
    if args and type(None) in args and typing.get_origin(hint) is not tuple:
        inner = [a for a in args if a is not type(None)][0]
        return base_type(inner)[0], True
    origin = typing.get_origin(hint)
    return (origin or hint), False


def type_name(kind: type, optional: bool) -> str:
    name = {
        bool: "boolean (true/false)",
        int: "integer",
        float: "number",
        str: "string",
        tuple: "pair of numbers (e.g. 0.08 1.0)",
    }.get(kind, str(kind))
    return name + (" or none" if optional else "")


def describe_type(config_class: type, name: str) -> str:
    """The field's type as --help and the tables say it; an enumerated field lists its values instead."""
    kind, optional = base_type(field_types(config_class)[name])
    allowed = field_choices(config_class).get(name)
    if allowed:
        return "one of " + ", ".join(allowed) + (", or none" if optional else "")
    return type_name(kind, optional)


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise MlpscaleError(f"{key}={value!r} is not a boolean; use true or false")


def coerce_field(config_class: type, key: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the type of `config_class`'s field `key`; MlpscaleError naming the key."""
    names = field_names(config_class)
    if key not in names:
        raise MlpscaleError(f"unknown {config_class.label} key {key!r}; known keys: {', '.join(names)}")
    kind, optional = base_type(field_types(config_class)[key])
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise MlpscaleError(f"{key} must not be empty")
    try:
        if kind is bool:
            return _parse_bool(key, value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is tuple:
            items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
            if len(items) != 2:
                raise ValueError
            return (float(items[0]), float(items[1]))
        if kind is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise MlpscaleError(f"{key}={value!r} is not a valid {type_name(kind, optional)}") from None
    return value


def apply(cfg, values: Mapping[str, Any]):
    """A copy of the config `cfg` with `values` (keys may use - or _) coerced and set; unknown keys rejected."""
    changes = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        changes[key] = coerce_field(type(cfg), key, value)
    return dataclasses.replace(cfg, **changes)


def check_choices(cfg) -> None:
    """Every enumerated field holds one of its values; MlpscaleError naming the key, the value and the choices."""
    for key, allowed in field_choices(type(cfg)).items():
        if getattr(cfg, key) not in allowed:
            raise MlpscaleError(f"{key}={getattr(cfg, key)!r} is not allowed; choose one of: {', '.join(allowed)}")


# rule -> (what a valid value passes, what the message says otherwise); NaN fails only "positive" and the ranges
_RANGE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "must be positive"),
    "non_negative": (lambda v: not v < 0, "must be >= 0"),
    "positive_or_none": (lambda v: v is None or not v <= 0, "must be positive (or none for the default)"),
    "fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "scale_range": (lambda v: 0 < v[0] <= v[1] <= 1, "must satisfy 0 < low <= high <= 1"),
    "ratio_range": (lambda v: 0 < v[0] <= v[1], "must satisfy 0 < low <= high"),
}


def check_range(cfg, rule: str, *keys: str) -> None:
    """Each of the fields `keys` follows `rule` (a _RANGE_RULES key); MlpscaleError naming the key and value."""
    passes, message = _RANGE_RULES[rule]
    for key in keys:
        value = getattr(cfg, key)
        if not passes(value):
            shown = list(value) if isinstance(value, tuple) else value
            raise MlpscaleError(f"{key}={shown!r} {message}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from a file; MlpscaleError when missing or not a mapping."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MlpscaleError(f"config file {str(file)!r} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise MlpscaleError(f"config file {str(file)!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise MlpscaleError(f"config file {str(file)!r} must hold a mapping of key: value")
    return data


def save_yaml(obj: Any, path: str | os.PathLike) -> Path:
    """Write a config (dataclass or mapping) as YAML that the config's loader reads back."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def _plain_default(name: str, value: Any) -> str:
    return repr(value)


def add_field_arguments(
    parser: argparse.ArgumentParser, config_class: type, *, title: str, default_text: DefaultText = _plain_default
) -> None:
    """One `--field-name` (and `--field_name`) option per field, unset by default, its help the field's
    description, type, default and choices."""
    group = parser.add_argument_group(title)
    defaults = config_class()
    descriptions = field_help(config_class)
    for name in field_names(config_class):
        kind, _ = base_type(field_types(config_class)[name])
        details = f"{describe_type(config_class, name)}; default {default_text(name, getattr(defaults, name))}"
        flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
        group.add_argument(
            *flags,
            dest=ARG_PREFIX + name,
            nargs=2 if kind is tuple else None,
            default=None,
            metavar=name.upper(),
            help=f"{descriptions[name]} [{details}]".replace("%", "%%"),
        )


def user_overrides(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The fields a user set: the `--config` YAML file's values, then the `--field` options' (which win),
    coerced to the fields' types; unknown keys rejected."""
    values = {
        str(key).replace("-", "_"): value
        for key, value in (read_yaml(args.config) if getattr(args, "config", None) else {}).items()
    }
    values.update(
        {
            key[len(ARG_PREFIX) :]: value
            for key, value in vars(args).items()
            if key.startswith(ARG_PREFIX) and value is not None
        }
    )
    return {key: coerce_field(config_class, key, value) for key, value in values.items()}


def fields_table(config_class: type, default_text: DefaultText = _plain_default) -> str:
    """The Markdown table of the fields: name, type (or choices), default and description."""
    defaults = config_class()
    descriptions = field_help(config_class)
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name in field_names(config_class):
        cells = (
            f"`{name}`",
            describe_type(config_class, name),
            f"`{default_text(name, getattr(defaults, name))}`",
            descriptions[name],
        )
        rows.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(rows)


def _markdown_cell(text: str) -> str:
    """Text for a table cell: | would end the cell, and <word> would read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


_DOC_TABLE = re.compile(
    r"(?P<begin><!-- fields-table (?P<module>[\w.]+)\b[^\n]*-->\n)(?P<table>.*?)"
    r"(?P<end><!-- end fields-table -->)",
    re.S,
)


def doc_table_modules(text: str) -> list[str]:
    """The config modules whose tables a doc's text holds, in order."""
    return [match["module"] for match in _DOC_TABLE.finditer(text)]


def regenerate_doc_tables(text: str) -> str:
    """A doc's text with each marked table replaced by its module's `fields_table()`."""

    def generated(match: re.Match) -> str:
        table = importlib.import_module(match["module"]).fields_table()
        return f"{match['begin']}{table}\n{match['end']}"

    return _DOC_TABLE.sub(generated, text)


def default_docs() -> list[Path]:
    from mlpscale.paths import repo_root

    return sorted((repo_root() / "docs").glob("*.md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite the field tables marked in the docs from the configs.")
    parser.add_argument("docs", nargs="*", type=Path, help="Markdown files (default: docs/*.md of the repo)")
    parser.add_argument("--check", action="store_true", help="only list the stale tables; exit 1 when any is")
    args = parser.parse_args(argv)
    stale = []
    for doc in args.docs or default_docs():
        text = doc.read_text()
        updated = regenerate_doc_tables(text)
        if updated != text:
            stale.append(doc)
            if not args.check:
                doc.write_text(updated)
    for doc in stale:
        print(f"stale: {doc} (regenerate: {REGENERATE_COMMAND})" if args.check else f"rewrote: {doc}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
