"""Parsing plugin options given as text (``--option KEY=VALUE``) into Python values."""

from __future__ import annotations

from typing import Any

from cxrtool.errors import UsageError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def as_bool(value: Any, label: str) -> bool:
    """``value`` as a bool: bools, 0/1 and true/false/yes/no/on/off (any case). ``label`` names the
    option in the error, e.g. ``"grad-cam: option relu"``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise UsageError(f"{label}={value!r} is not true/false")
