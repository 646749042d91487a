"""Range checks of settings, the one place their wording lives. Each raises ``SettingError``
naming the setting and the allowed range (the CLI words it as the flag:
``--grad-accum: must be at least 1, not 0``), so every numeric option is refused the same way
before any work is done."""

from __future__ import annotations

import math

from engine.errors import SettingError


def _finite(name: str, value: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(name, f"must be a finite number, not {value}")


def at_least(name: str, value: float, minimum: float) -> None:
    _finite(name, value)
    if value < minimum:
        raise SettingError(name, f"must be at least {minimum}, not {value}")


def above(name: str, value: float, bound: float) -> None:
    """Strictly greater than ``bound`` (a learning rate above 0)."""
    _finite(name, value)
    if value <= bound:
        raise SettingError(name, f"must be greater than {bound}, not {value}")


def between(name: str, value: float, low: float, high: float) -> None:
    _finite(name, value)
    if not low <= value <= high:
        raise SettingError(name, f"must be between {low} and {high}, not {value}")


def multiple_of(name: str, value: int, factor: int, minimum: int | None = None, maximum: int | None = None) -> None:
    """A multiple of ``factor`` (image sizes), within ``minimum``..``maximum`` where given."""
    low = factor if minimum is None else minimum
    if value % factor or value < low or (maximum is not None and value > maximum):
        span = (f" from {low}" if minimum is not None or value < low else "") + \
            (f" to {maximum}" if maximum is not None else "")
        raise SettingError(name, f"must be a multiple of {factor}{span}, not {value}")
