"""Typed config values from YAML and ``key=value`` overrides: coercion to a dataclass field's
type, with a ConfigError that names the key and what is allowed (used by :mod:`config`)."""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from fope_megatron.errors import ConfigError


def unknown_message(what: str, given: str, allowed: list[str], where: str = "") -> str:
    close = difflib.get_close_matches(given, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} (allowed{where}: {', '.join(allowed)}{hint})"


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the field type ``tp`` or raise ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        null = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if type(None) in args and null:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, option)
            except ConfigError:
                pass
        names = " or ".join(type_name(a) for a in args)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {names}")
    if origin is Literal:
        for choice in args:  # strings match case-insensitively: 'rmsnorm' -> 'RMSNorm'
            if value == choice or str(value).lower() == str(choice).lower():
                return choice
        allowed = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")
    if origin is list:
        if isinstance(value, str) and args[0] is int:  # "128,256" from a shell
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value if isinstance(value, bool) else text in ("true", "yes", "on", "1")
    elif tp in (int, float) and not isinstance(value, bool):
        n = number(value)
        if n is not None and (tp is float or n.is_integer()):
            return tp(n)
    elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {type_name(tp)}")


def number(value: Any) -> float | None:
    """A finite number from an int, float or numeric string (PyYAML reads ``1e-3`` as a string)."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
    return "null" if tp is type(None) else names.get(tp, str(tp))
