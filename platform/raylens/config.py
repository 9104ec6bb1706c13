"""Typed run configuration: dataclass schema, strict YAML merge, dotted overrides.

Every field is declared with :func:`opt`, which carries a one-line doc (shown by a
job's ``--help``) and whether the value is a secret (never written to disk or logs).

Merging is strict: an unknown key raises :class:`ConfigError` naming the key and the
nearest valid one; a value of the wrong type names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")
REDACTED = None  # secrets are saved as null, so a saved config falls back to the env


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


def opt(default: Any = dataclasses.MISSING, doc: str = "", *, secret: bool = False) -> Any:
    """Declares a config field with a one-line doc; mutable defaults are copied per instance."""
    meta = {"doc": doc, "secret": secret}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- types


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Returns ``value`` checked against (and lightly converted to) the type ``tp``."""
    origin = get_origin(tp)
    bad = ConfigError(
        f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        options = get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads off/on/no/yes as booleans; map back to a matching option.
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in options), value)
        if value in options:
            return value
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise bad
            return tuple(
                _coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        ktp, vtp = get_args(tp) or (Any, Any)
        return {
            _coerce(k, ktp, f"{key}.<key>"): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad
        return merge(tp(), value, prefix=key)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ----------------------------------------------------------------------------- keys


def iter_fields(cls_or_obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any, dict]]:
    """Yields ``(dotted_key, type, default, metadata)`` for every leaf field."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    obj = cls_or_obj if not isinstance(cls_or_obj, type) else cls()
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(value, prefix=key + ".")
        else:
            yield key, tp, value, dict(f.metadata)


def all_keys(cls: type) -> list[str]:
    """Every dotted key of a schema, sections included (``data`` and ``data.image_size``)."""
    keys: list[str] = []
    for key, *_ in iter_fields(cls):
        parts = key.split(".")
        keys.extend(".".join(parts[: i + 1]) for i in range(len(parts)))
    return list(dict.fromkeys(keys))


def _unknown(key: str, valid: list[str]) -> ConfigError:
    nearest = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


# ----------------------------------------------------------------------------- merge


def merge(cfg: T, updates: Mapping[str, Any], prefix: str = "") -> T:
    """Returns a copy of ``cfg`` with nested ``updates`` applied strictly."""
    cls = type(cfg)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes: dict[str, Any] = {}
    for name, value in updates.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            root_valid = [k for k in all_keys(cls)]
            valid = [f"{prefix}.{k}" if prefix else k for k in root_valid]
            raise _unknown(key, valid)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"config key '{key}': expected a mapping of sub-keys, got {value!r}"
                )
            changes[name] = merge(getattr(cfg, name), value, prefix=key)
        else:
            changes[name] = _coerce(value, tp, key)
    return dataclasses.replace(cfg, **changes)


def parse_override(text: str) -> tuple[str, Any]:
    """Parses ``key.sub=value``; the value is read as YAML (``3``, ``true``, ``[a, b]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (for example data.image_size=64)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """Turns ``{"a.b": 1}`` into ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' conflicts with a value set for '{part}'")
        node[parts[-1]] = value
    return out


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Turns ``{"a": {"b": 1}}`` into ``{"a.b": 1}`` (the inverse of :func:`nest`)."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(
    old: Mapping[str, Any], new: Mapping[str, Any], *, ignore: tuple[str, ...] = ()
) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for the leaves two nested configs disagree on. Keys
    starting with an ``ignore`` prefix are skipped, and so are keys ``old`` lacks (a
    config saved before the schema grew)."""
    a, b = flatten(old), flatten(new)
    return {
        k: (a[k], b[k])
        for k in b
        if k in a and not k.startswith(ignore) and _normal(a[k]) != _normal(b[k])
    }


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def apply_overrides(cfg: T, overrides: Mapping[str, Any] | list[str]) -> T:
    """Applies dotted overrides, given as ``["k.s=v", ...]`` or ``{"k.s": v}``."""
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    valid = all_keys(type(cfg))
    for key in overrides:
        if key not in valid:
            raise _unknown(key, valid)
    return merge(cfg, nest(overrides))


def load(cls: type[T], yaml_text: str | None = None, overrides: list[str] | None = None) -> T:
    """Builds a config: defaults, then YAML text, then dotted overrides; validates the result."""
    cfg = cls()
    if yaml_text:
        data = yaml.safe_load(yaml_text) or {}
        if not isinstance(data, Mapping):
            raise ConfigError("config file: expected a mapping at the top level")
        cfg = merge(cfg, data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


# ----------------------------------------------------------------------------- output


def to_dict(cfg: Any, *, redact: bool = True) -> dict[str, Any]:
    """Nested plain dict of a config; secret fields are written as null when ``redact``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value, redact=redact)
        elif redact and f.metadata.get("secret") and value is not None:
            out[f.name] = REDACTED
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, secrets redacted; loads back with :func:`load`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def help_text(cls: type, sections: list[str] | None = None) -> str:
    """One line per key: ``key (type, default): doc``; optionally only some sections."""
    lines = []
    for key, tp, default, meta in iter_fields(cls):
        if sections and key.split(".")[0] not in sections:
            continue
        shown = "<secret>" if meta.get("secret") and default else repr(default)
        if isinstance(default, tuple):
            shown = repr(list(default))
        lines.append(f"  {key} = {shown}  [{_type_name(tp)}]\n      {meta.get('doc', '')}")
    return "\n".join(lines)
