"""Config dataclasses as CLI flags and YAML files.

One dataclass per trainer is the single source of truth: its fields (each with a one-line doc in
``field(metadata={"doc": ...})``) become ``--flags``, the keys of ``--config run.yaml``, and the
``config.yaml`` saved in every run directory. Precedence: dataclass default < YAML < explicit flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from palate.errors import ConfigError

T = TypeVar("T")


def doc_field(default: Any = dataclasses.MISSING, doc: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a one-line doc shown in ``--help`` (lists/dicts get a factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"doc": doc}, **kwargs)
    return dataclasses.field(default=default, metadata={"doc": doc}, **kwargs)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or string value to the field's declared type, or raise ConfigError."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"config field '{name}' may not be null; give a value of type {getattr(inner, '__name__', inner)}")
    origin = get_origin(inner)
    try:
        if origin is Literal:
            choices = get_args(inner)
            if value not in choices:
                raise ConfigError(f"config field '{name}' must be one of {list(choices)}, got {value!r}")
            return value
        if origin in (list, tuple):
            (item_tp, *_) = get_args(inner) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            return [_coerce(name, item_tp, v) for v in value]
        if origin is dict or inner is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"config field '{name}' must be a mapping, got {value!r}")
            return dict(value)
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if inner is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if inner is float:
            return float(value)
        if inner is str:
            return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"config field '{name}' expects {getattr(inner, '__name__', inner)}, got {value!r}"
        ) from err
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unknown_fields_message(unknown: list[str], names: set[str]) -> str:
    """``unknown field(s) [...]`` with a "did you mean" for each near miss, and the valid names."""
    hints = []
    for name in unknown:
        match = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
        if match:
            hints.append(f"'{name}': did you mean '{match[0]}'?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"unknown field(s) {unknown}{hint}; valid fields: {sorted(names)}"


def coerce_fields(cfg: Any) -> None:
    """Convert each field of a config dataclass to its declared type in place (``"8"`` -> 8), or
    raise ConfigError naming the field, its type and its default.

    Config ``validate`` methods call this first, so a value of the wrong type (``learning_rate="abc"``,
    ``n_envs=1.5``) is one clear error rather than a TypeError from a comparison."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        try:
            value = _coerce(f.name, hints[f.name], getattr(cfg, f.name))
        except ConfigError as err:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
            raise ConfigError(f"{err}; give e.g. {f.name}={default!r} (the default)") from None
        object.__setattr__(cfg, f.name, value)


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys with "did you mean" and the valid ones."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: {unknown_fields_message(unknown, names)}")
    values = {k: _coerce(k, hints[k], v) for k, v in data.items()}
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config dataclass (what goes into config.yaml)."""
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def config_fields(cls: type) -> list[dataclasses.Field]:
    """A config dataclass's fields, its own first and those it inherits from a shared base after.

    Dataclasses put inherited fields first; a reader of ``--help`` wants a stage's own settings
    (model, data, loss) before the plumbing every stage shares.
    """
    own = set(getattr(cls, "__annotations__", {}))
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field; unset flags stay absent so YAML values survive."""
    hints = _hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields (also valid as YAML keys)")
    for f in config_fields(cls):
        if f.name in skip:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        doc = f.metadata.get("doc", "")
        help_text = f"{doc} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
        else:
            kwargs["metavar"] = getattr(tp, "__name__", "VALUE").upper()
        if get_origin(tp) is dict or tp is dict:
            kwargs["help"] = help_text + f"; a YAML mapping, e.g. {flag} '{{key: value}}', merged over the --config file's section"
        group.add_argument(flag, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, yaml_path: str | Path | None = None,
                     base: dict[str, Any] | None = None) -> T:
    """Merge dataclass defaults, an optional base mapping, the YAML file and explicit flags."""
    data: dict[str, Any] = dict(base or {})
    if yaml_path:
        data.update(load_yaml(yaml_path))
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in names:
        if name in vars(args):
            value = getattr(args, name)
            inner, _ = _unwrap_optional(hints[name])
            if (get_origin(inner) is dict or inner is dict) and isinstance(value, str):
                value = _flag_mapping(name, value)
                if isinstance(data.get(name), dict):  # a flag overrides the keys it names, not the section
                    value = {**data[name], **value}
            data[name] = value
    return config_from_dict(cls, data, source=str(yaml_path or "flags"))


def _flag_mapping(name: str, text: str) -> dict[str, Any]:
    """``--label '{k: 8, limit: 64}'``: a YAML mapping given as a flag, or one ConfigError naming the flag."""
    flag = "--" + name.replace("_", "-")
    try:
        value = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{flag}: {text!r} is not YAML ({err.__class__.__name__}); give a mapping such as "
                          f"{flag} '{{key: value, other: 2}}'") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} expects a YAML mapping such as {flag} '{{key: value}}', got {text!r}")
    return value
