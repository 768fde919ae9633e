"""One config loader for every job: YAML files → typed dataclasses.

- Layers, later wins: the dataclass defaults, then each `base:` (or `defaults:`) file — a path or
  list of paths relative to the inheriting file — then the file itself. Dataclass sections merge
  key by key; any other value (list, dict of tasks) is replaced whole by the layer that sets it.
- Command-line overrides `key.sub=value` apply last; the value is parsed as YAML (`3`, `[3, 4]`,
  `true`, `null`).
- Unknown keys, wrong types and missing files raise `ConfigError` naming the key (dotted path) and
  the file it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")

INHERIT_KEYS = ("base", "defaults")


class ConfigError(ValueError):
    """A config file, key or value a user supplied is wrong; the message names it."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls`: its defaults, then the YAML file at `path` (bases first), then `key=value` overrides.

    Dataclass sections merge key by key at every layer; any other value (a list, a dict of tasks)
    is replaced whole by the layer that sets it, so a file's `tasks:` says exactly which tasks run.
    Overrides address single keys of the merged result (`tasks.maze.examples=5`).
    """
    try:
        merged: dict[str, Any] = to_dict(cls())
    except TypeError:  # a required field has no default
        merged = {}
    for layer in read_layers(path) if path is not None else []:
        merged = typed_merge(cls, merged, layer)
    for override in overrides:
        apply_override(merged, override)
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " + command-line overrides"
    return from_dict(cls, merged, source=source)


def read_layers(path: str | Path, _chain: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The YAML mappings of `path` and its `base:` files, bases first (cycles are errors)."""
    path = Path(path)
    if not path.is_file():
        where = f" (inherited by {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    resolved = path.resolve()
    if resolved in _chain:
        raise ConfigError(f"config inheritance cycle: {' -> '.join(map(str, _chain + (resolved,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    bases: Any = None
    for key in INHERIT_KEYS:
        if key in data:
            bases = data.pop(key)
    if isinstance(bases, str):
        bases = [bases]
    layers: list[dict[str, Any]] = []
    for base in bases or []:
        if not isinstance(base, str):
            raise ConfigError(f"config file {path}: 'base' entries must be paths, got {base!r}")
        layers += read_layers(path.parent / base, _chain + (resolved,))
    return layers + [data]


def typed_merge(cls: Any, low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """`high` wins; sub-mappings merge only where `cls` declares a dataclass section."""
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    out = dict(low)
    for key, value in high.items():
        section = _dataclass_of(hints.get(key))
        if section is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = typed_merge(section, out[key], value)
        else:
            out[key] = value
    return out


def _dataclass_of(tp: Any) -> Any:
    """The dataclass in `tp` (also inside Optional[...]), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {exc}") from exc
    node = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], data: Any, source: str = "config", prefix: str = "") -> T:
    """Check `data` against dataclass `cls` field by field and build it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or '<top>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"{source}: unknown config key '{dotted}' (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], dotted, source)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        msg = str(exc)
        first = re.match(r"\w+", msg)
        if prefix and first and first.group(0) in fields:  # "keep_w must be …" → "cosre.keep_w must be …"
            msg = prefix + msg
        raise ConfigError(f"{source}: {msg}") from None
    except TypeError as exc:
        raise ConfigError(f"{source}: {prefix or 'config'}: {exc}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(
            f"{source}: config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise bad()
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: config key '{key}' must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise bad()
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = args or (str, Any)
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise ConfigError(f"{source}: config key '{key}' has an unsupported type {_type_name(tp)}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (for manifests, MLflow params, hashing)."""
    return dataclasses.asdict(cfg)


def config_hash(data: Any) -> str:
    """Stable short hash of a config (dataclass or plain data)."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = to_dict(data)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
