"""Errors shared by every layer (kept here so that data/, model/, checkpoint/ and eval/ can raise
them without importing train/)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


__all__ = ["ConfigError"]
