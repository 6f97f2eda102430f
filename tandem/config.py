"""The config layer every tandem command shares: one loader, one coercion, one error format.

Every component is configured by a frozen dataclass (`ModelConfig`, `TrainConfig`,
`ExportConfig`, `ServeConfig`) built from a preset name or a YAML/JSON file plus
`key=value` overrides (dotted keys reach nested configs: `model.d_model=512`). A bad value
raises ValueError as `field=value is invalid: allowed ...`, before anything compiles.

A field's allowed values are its type: a `Literal[...]` field is checked against its
arguments (`check_choices`, called from each config's `__post_init__`, so a config built
in code is held to the same rule as one loaded from a file). A renamed key keeps working
in files, `key=value` and flags when the config lists it in `KEY_ALIASES` (old -> key).
This module imports nothing from tandem, so every package can use it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raises the one error format: `field=value is invalid: allowed ...`."""
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: allowed {allowed}")


def choices(literal: Any) -> tuple:
    """The allowed values of a `Literal[...]` type alias, e.g. for argparse `choices`."""
    if get_origin(literal) is not Literal:
        raise TypeError(f"{literal!r} is not a Literal type")
    return get_args(literal)


def check_choices(config: Any) -> None:
    """Checks every `Literal` field of a dataclass instance (optional ones may be None)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        tp, value = hints[f.name], getattr(config, f.name)
        options = get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        literals = [o for o in options if get_origin(o) is Literal]
        if not literals or (value is None and type(None) in options):
            continue
        allowed = tuple(v for lit in literals for v in get_args(lit))
        require(value in allowed, f.name, value, f"one of {allowed}")


def fingerprint(data: Mapping[str, Any]) -> str:
    """sha256 of a config dict's canonical JSON: identifies 'the same settings'."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class _Raw:
    """An override's text as typed; parsed once the target field's type is known, so
    `out=2024` stays the string "2024" for a str field and becomes 2024 for an int
    (YAML quoting still works: `out=''` is the empty string)."""

    text: str


def load_config(
    cls: type[T], source: str | Path | Mapping | None = None, overrides: Sequence[str] = ()
) -> T:
    """Builds `cls` from a preset name, a YAML/JSON file or a mapping, then applies
    `key=value` overrides (dotted keys reach nested dataclasses: `model.d_model=512`).

    Override values are read as YAML scalars (`true`, `1e-3`, `null`) unless the field
    is a string; an unknown key raises ValueError listing the allowed keys.
    """
    if source is None:
        data: dict[str, Any] = {}
        base = None
    elif isinstance(source, Mapping):
        data, base = dict(source), None
    elif Path(source).suffix in (".yaml", ".yml", ".json"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, Mapping):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at top level")
        data, base = dict(loaded), None
    else:
        preset = getattr(cls, "preset", None)
        if preset is None:
            raise ValueError(f"{cls.__name__} has no presets; give a .yaml/.json file")
        data, base = {}, preset(str(source))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        _set_dotted(data, _canonical_keys(cls, key.strip().split(".")), _Raw(raw))
    if base is not None:
        return _build(cls, _merge(_to_plain(base), data), prefix="")
    return _build(cls, data, prefix="")


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag that is another spelling of `key=value` (`--port 1` = `port=1`).
    A switch takes no value and sets `key=value` (`--overwrite` = `overwrite=true`)."""

    name: str
    key: str
    help: str = ""
    switch: str | None = None  # the value a valueless flag sets, e.g. "true"


def parse_command_line(
    cls: type[T],
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    flags: Sequence[Flag] = (),
    default_source: str | None = None,
) -> T:
    """`prog [CONFIG] [key=value ...] [--flag value ...]` -> `cls`.

    CONFIG is a preset name or a YAML/JSON file (default `default_source`; also
    `--config CONFIG`); the `key=value` items apply first, then the flags in the order
    given, a later one winning (`--set key=value` is one more spelling of an item). `-h`
    prints the usage with every config key and exits (argparse's SystemExit, as any
    malformed flag does).
    """
    source, overrides = split_command_line(
        cls, argv, prog=prog, description=description, flags=flags, default_source=default_source
    )
    return load_config(cls, source, overrides)


def split_command_line(
    cls: type,
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    flags: Sequence[Flag] = (),
    default_source: str | None = None,
) -> tuple[str | None, list[str]]:
    """`parse_command_line` up to (CONFIG, overrides as `key=value`), for a command that
    needs to know which keys were given."""
    keys = ", ".join(f.name for f in dataclasses.fields(cls) if f.init)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"config keys: {keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a misspelt flag is an error, not a guess
    )
    parser.add_argument("items", nargs="*", metavar="[CONFIG] key=value")
    parser.add_argument("--config", help="preset name or YAML/JSON file (= CONFIG)")
    parser.add_argument(
        "--set", dest="overrides", action="append", metavar="KEY=VALUE", help="= key=value"
    )
    for flag in flags:
        if flag.switch is not None:
            parser.add_argument(
                flag.name,
                dest="overrides",
                action="append_const",
                const=f"{flag.key}={flag.switch}",
                help=flag.help or f"= {flag.key}={flag.switch}",
            )
        else:
            parser.add_argument(
                flag.name,
                dest="overrides",
                action="append",
                type=lambda value, key=flag.key: f"{key}={value}",
                metavar=flag.key.upper(),
                help=flag.help or f"= {flag.key}=...",
            )
    args = parser.parse_intermixed_args(list(argv))
    items = list(args.items)
    source = args.config or default_source
    if items and "=" not in items[0] and not args.config:
        source = items.pop(0)
    loose = [item for item in items if "=" not in item]
    if loose:
        raise ValueError(f"{prog}: expected key=value after CONFIG, got {loose[0]!r}")
    return source, items + (args.overrides or [])


# ---------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _merge(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _aliases(cls: Any) -> Mapping[str, str]:
    """A config's older spellings of its keys (class attribute `KEY_ALIASES`, old -> key)."""
    return getattr(cls, "KEY_ALIASES", {}) if dataclasses.is_dataclass(cls) else {}


def _canonical_keys(cls: Any, keys: list[str]) -> list[str]:
    """A dotted override's keys with each older spelling replaced by its key, so that of
    `max_slots=2 max_seqs=3` the later one wins as with any repeated key."""
    out = []
    for key in keys:
        key = _aliases(cls).get(key, key)
        out.append(key)
        cls = typing.get_type_hints(cls).get(key) if dataclasses.is_dataclass(cls) else None
    return out


def _set_dotted(data: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        nested = data.setdefault(key, {})
        if not isinstance(nested, dict):
            nested = data[key] = {}
        data = nested
    data[keys[-1]] = value


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    spelled: dict[str, str] = {}  # key -> how data spells it
    for key in data:
        new = _aliases(cls).get(key, key)
        if new in spelled:
            raise ValueError(
                f"{prefix}{spelled[new]} and {prefix}{key} are one key: give only {prefix}{new}"
            )
        spelled[new] = key
    data = {new: data[key] for new, key in spelled.items()}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r} for {cls.__name__}: "
            f"allowed keys are {sorted(fields)}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ names the field; say where it is nested
        raise ValueError(f"{prefix}{err}") from None


def _is_text(tp: Any) -> bool:
    """A field whose override text is taken as typed rather than parsed as YAML."""
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(v, str) for v in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return all(_is_text(o) for o in get_args(tp) if o is not type(None))
    return False


def _coerce(tp: Any, value: Any, field: str) -> Any:
    if isinstance(value, _Raw):
        text = value.text
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        if _is_text(tp) and text not in ("null", "~") and not quoted:
            value = text
        else:
            value = yaml.safe_load(text)
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, field)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{field}={value!r} is invalid")
    if origin is Literal:
        require(value in get_args(tp), field, value, f"one of {get_args(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{field} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{field}.")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{field}={value!r} is invalid: expected a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        return tuple(_coerce(item_tp, v, f"{field}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        require(isinstance(value, bool), field, value, "true or false")
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), field, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e5" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        require(
            isinstance(value, int | float) and not isinstance(value, bool), field, value, "a number"
        )
        return float(value)
    if tp is str:
        require(isinstance(value, str), field, value, "a string")
        return value
    return value
