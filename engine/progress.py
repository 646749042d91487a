"""How the engine reports progress: plain callbacks, rendered by the CLI (or ignored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Progress:
    """One update of a long task. ``completed``/``total`` count steps, files or bytes; ``info``
    carries task-specific figures (loss, it/s, memory, ...) for display and logs."""

    task: str  # e.g. "encode", "denoise", "train", "download"
    completed: float
    total: float | None = None
    info: dict = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]


def report(callback: ProgressCallback | None, task: str, completed: float, total: float | None = None, **info) -> None:
    if callback is not None:
        callback(Progress(task, completed, total, info))
