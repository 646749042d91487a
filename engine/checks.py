"""Range checks of settings, the one place their wording lives. Each raises ``SettingError``
naming the setting and the allowed range (the CLI words it as the flag:
``--grad-accum: must be at least 1, not 0``), so every numeric option is refused the same way
before any work is done. Every check of a float also refuses NaN and infinities.

A part of one option's value (the weight inside ``--cond NAME=IMAGE:WEIGHT``, an extractor's
``-p low=...``) is checked under ``within(option, label)``, which keeps the option's name and puts
the label before the message: ``--cond: 'edge=a.png:nan': weight must be a finite number, not nan``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

from engine.errors import SettingError

# Seeds are 0 .. 2**32 - 1, the range numpy's and most tools' seeds share; image k of a batch
# uses seed + k, which torch's 64-bit generators take whatever the batch.
SEED_MAX = 2**32 - 1


def finite(name: str, value: float) -> None:
    """Any real number, but not NaN or an infinity (a weight, a scale)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(name, f"must be a finite number, not {value}")


def at_least(name: str, value: float, minimum: float) -> None:
    finite(name, value)
    if value < minimum:
        raise SettingError(name, f"must be at least {minimum}, not {value}")


def above(name: str, value: float, bound: float) -> None:
    """Strictly greater than ``bound`` (a learning rate above 0)."""
    finite(name, value)
    if value <= bound:
        raise SettingError(name, f"must be greater than {bound}, not {value}")


def between(name: str, value: float, low: float, high: float) -> None:
    finite(name, value)
    if not low <= value <= high:
        raise SettingError(name, f"must be between {low} and {high}, not {value}")


def multiple_of(name: str, value: int, factor: int, minimum: int | None = None, maximum: int | None = None) -> None:
    """A multiple of ``factor`` (image sizes), within ``minimum``..``maximum`` where given."""
    low = factor if minimum is None else minimum
    if value % factor or value < low or (maximum is not None and value > maximum):
        span = (f" from {low}" if minimum is not None or value < low else "") + \
            (f" to {maximum}" if maximum is not None else "")
        raise SettingError(name, f"must be a multiple of {factor}{span}, not {value}")


def one_of(name: str, value: str, choices) -> None:
    if value not in choices:
        raise SettingError(name, f"must be one of {', '.join(choices)}, not {value!r}")


def seed(name: str, value: int) -> None:
    between(name, value, 0, SEED_MAX)


def window(name: str, start: float, end: float) -> None:
    """A fraction of the denoising steps, ``0 <= start < end <= 1``."""
    finite(name, start)
    finite(name, end)
    if not 0 <= start < end <= 1:
        raise SettingError(name, f"must satisfy 0 <= START < END <= 1, not {start}-{end}")


@contextmanager
def within(setting: str, label: str) -> Iterator[None]:
    """Checks of one part of ``setting``'s value: their ``SettingError`` names ``setting`` and
    starts with ``label`` (``weight must be ...``)."""
    try:
        yield
    except SettingError as exc:
        raise SettingError(setting, f"{label} {exc}") from None
