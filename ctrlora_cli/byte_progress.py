"""Byte-counting progress for downloads and re-hashing: a Rich bar per file (bytes, speed, ETA)
at a terminal, nothing drawn otherwise; ``log`` lines go to stderr either way."""

from __future__ import annotations

from rich.markup import escape

from ctrlora_cli.console import err, interactive


MIN_BAR_BYTES = 1_000_000


class ByteBars:
    def __init__(self, enabled: bool | None = None):
        self.enabled = interactive() if enabled is None else enabled
        self._bars = None
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> "ByteBars":
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=err)
            self._bars.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        if self._bars is not None:
            self._bars.__exit__(*exc)
        return False

    def log(self, message: str) -> None:
        err.print(message, markup=False, highlight=False, soft_wrap=True)

    def progress(self, event) -> None:
        """An ``engine.progress.Progress`` callback: ``task`` names the file, counts are bytes.
        Files under 1 MB get no bar (they are done before one could be read)."""
        if self._bars is None or (event.total is not None and event.total < MIN_BAR_BYTES):
            return
        if event.task not in self._tasks:
            label = event.task if len(event.task) <= 40 else "…" + event.task[-39:]
            self._tasks[event.task] = self._bars.add_task(escape(label), total=event.total)
        self._bars.update(self._tasks[event.task], completed=event.completed, total=event.total)
