"""The one config system: dataclasses, a TOML file, and ``--set section.key=value`` overrides.

A stage's config is a dataclass whose fields are section dataclasses (``model``, ``data``,
``train``). Every key has a default, so a config file is optional. Unknown keys are refused with
the closest valid key suggested; values are checked against the field types.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from gptlab.errors import UserError
from gptlab.fileio import read_text
from gptlab.runs import RunFolder


def read_raw(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The nested dict from a TOML file (optional) with ``key.sub=value`` overrides applied."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; check the --config path")
        try:
            raw = tomllib.loads(read_text(path))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML ({e}); fix the file") from None
    return apply_overrides(raw, overrides)


def read_run_raw(config_path: str | Path | None, overrides: list[str], out_dir: Path, resume: bool) -> dict:
    """A run's raw config: the one its run.json recorded when resuming without --config (so a
    resumed run trains on what it started with), else the file plus overrides. A resume with
    nothing to resume is refused here, before any other file is read."""
    run = RunFolder(out_dir)
    if resume:
        run.checkpoints_to_resume()
    if resume and config_path is None and run.has_record():
        fix = "resume with --config and the run's settings"
        raw = run.read_record(fix).get("config")
        if not isinstance(raw, dict):
            raise UserError(f"{run.record_path} holds no run config; {fix}")
        return apply_overrides(raw, overrides)
    return read_raw(config_path, overrides)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} is not of the form section.key=value; e.g. --set train.lr=3e-4")
        set_dotted(raw, key.strip(), parse_value(value.strip()))
    return raw


def parse_value(text: str) -> Any:
    """A TOML literal (1, 3e-4, true, "x", [1, 2]) or, failing that, the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"config key {key!r}: {part!r} is a value, not a section")
    node[leaf] = value


def get_dotted(raw: dict, key: str, default: Any = None) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key a config dataclass accepts."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def build(cls, raw: dict, prefix: str = ""):
    """Instantiate config dataclass ``cls`` from a nested dict, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            if close:
                hint = f"did you mean {prefix + close[0]!r}?"
            else:
                close = difflib.get_close_matches(prefix + key, all_keys(cls, prefix), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(sorted(names))}"
            raise UserError(f"unknown config key {prefix + key!r}; {hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if dataclasses.is_dataclass(hints[f.name]):
                kwargs[f.name] = build(hints[f.name], {}, f"{prefix}{f.name}.")
            continue
        kwargs[f.name] = coerce(raw[f.name], hints[f.name], prefix + f.name)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid config: {e}") from None


def coerce(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r} is a section; set its keys, e.g. {key}.<name>=...")
        return build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if type(None) in options and (value is None or value == "none"):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):  # --set key=2,3 as well as key=[2, 3]
            value = [parse_value(v.strip()) for v in str(value).split(",") if v.strip()]
        (item,) = typing.get_args(hint)
        return [coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise UserError(f"config key {key!r} must be {hint.__name__}, got {value!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
