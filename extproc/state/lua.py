"""Lua scripts for Redis, kept as package data: ``<package>/lua/<name>.lua``."""

from __future__ import annotations

from importlib import resources


def script(package: str, name: str) -> str:
    """The text of ``lua/<name>.lua`` in ``package`` (a dotted package name)."""
    return (resources.files(package) / "lua" / f"{name}.lua").read_text()
