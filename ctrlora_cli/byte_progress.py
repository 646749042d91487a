"""Rendering the store's events (``ctrlora_cli.store.events``) for pull and verify: a Rich bar per
file (bytes, speed, ETA) at a terminal, and without one a plain line per file every
``CTRLORA_LOG_EVERY`` seconds (``ctrlora_cli.progress.LineLog``); messages as plain lines either
way (results on stdout, notes and warnings on stderr)."""

from __future__ import annotations

from rich.markup import escape

from ctrlora_cli.console import err, interactive, say, warn
from ctrlora_cli.store.events import Event, Message


MIN_BAR_BYTES = 1_000_000


class ByteBars:
    """A context manager, and the listener the store's library reports to (``bars(event)``)."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = interactive() if enabled is None else enabled
        self._bars = None
        self._tasks: dict[str, int] = {}
        self._lines = None
        if not self.enabled and not interactive():
            from ctrlora_cli.progress import LineLog

            self._lines = LineLog(unit="bytes")

    def __enter__(self) -> "ByteBars":
        return self

    def __exit__(self, *exc) -> bool:
        if self._bars is not None:
            self._bars.__exit__(*exc)
        return False

    def __call__(self, event: Event) -> None:
        if isinstance(event, Message):
            self.message(event)
        else:
            self.progress(event)

    def message(self, event: Message) -> None:
        if event.level == "warning":
            warn(escape(event.text))
        elif event.level == "note":
            err.print(event.text, markup=False, highlight=False, soft_wrap=True)
        else:
            say(event.text)

    def progress(self, event) -> None:
        """An ``engine.progress.Progress``: ``task`` names the file, counts are bytes. Files
        under 1 MB get no bar (they are done before one could be read)."""
        if event.total is not None and event.total < MIN_BAR_BYTES:
            return
        if not self.enabled:
            if self._lines is not None and self._lines.every > 0:
                self._lines(event)
            return
        if self._bars is None:  # started at the first bar: a pull that downloads nothing draws nothing
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=err)
            self._bars.__enter__()
        if event.task not in self._tasks:
            label = event.task if len(event.task) <= 40 else "…" + event.task[-39:]
            self._tasks[event.task] = self._bars.add_task(escape(label), total=event.total)
        self._bars.update(self._tasks[event.task], completed=event.completed, total=event.total)
