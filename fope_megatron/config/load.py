"""Loading the run configuration: defaults, then a YAML file, then dotted ``section.key=value``
overrides (command line beats file beats defaults). Every value is type-checked against its
field (int, float, bool, str, list, Optional, Literal) and unknown keys fail with the list of
allowed ones, as a ``ConfigError`` naming key, value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from fope_megatron.coerce import coerce, unknown_message
from fope_megatron.errors import ConfigError

from .schema import Config, hints


def config_from_dict(cls: type[Config], raw: dict[str, Any] | None) -> Config:
    """``Config.from_dict``: ``{section: {key: value}}`` with type checks; missing keys keep
    their defaults.

    Raises:
        ConfigError: unknown section or key, or a value of the wrong type.
    """
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections = [f.name for f in dataclasses.fields(cls)]
    for name in raw:
        if name not in sections:
            raise ConfigError(unknown_message(f"section {name!r}", str(name), sections))
    values = {}
    for name, section_cls in hints(cls).items():
        section_raw = raw.get(name) or {}
        if not isinstance(section_raw, dict):
            raise ConfigError(f"section {name!r} must be a mapping of keys, got {section_raw!r}")
        section_hints = hints(section_cls)
        kwargs = {}
        for key, value in section_raw.items():
            if key not in section_hints:
                where = f"key '{name}.{key}'"
                raise ConfigError(
                    unknown_message(where, str(key), list(section_hints), f" in {name!r}")
                )
            kwargs[key] = coerce(f"{name}.{key}", value, section_hints[key])
        values[name] = section_cls(**kwargs)
    return cls(**values)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``section.key=value`` overrides.

    Override values are parsed with ``yaml.safe_load`` (``true``, ``1e-3``, ``[128,256]``,
    ``null``). The result is resolved (see ``Config.resolve``) but not validated.

    Raises:
        ConfigError: missing file, malformed override, unknown key or wrong type.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"override {item!r} must look like section.key=value (e.g. train.steps=100)"
            )
        section, name = parts
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(
                f"section {section!r} must be a mapping of keys, got {raw[section]!r}"
            )
        raw[section][name] = value
    return Config.from_dict(raw).resolve()
