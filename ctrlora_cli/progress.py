"""Rendering engine progress callbacks with Rich, only when a person is watching."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctrlora_cli.console import err, interactive
from engine.progress import Progress as EngineProgress


@contextmanager
def progress_bars(enabled: bool | None = None,
                  describe: Callable[[EngineProgress], str] | None = None) -> Iterator[Callable[[EngineProgress], None]]:
    """Yield a callback for the engine. Each distinct ``task`` gets its own bar; ``describe``
    turns an update's ``info`` into the text shown after the bar. Draws nothing (and costs
    nothing) when stdout/stdin is not a terminal, or when ``enabled`` is False."""
    if enabled is None:
        enabled = interactive()
    if not enabled:
        yield lambda update: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[detail]}")]
    with Progress(*columns, console=err, transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(event: EngineProgress) -> None:
            if event.task not in tasks:
                tasks[event.task] = bars.add_task(event.task, total=event.total, detail="")
            detail = describe(event) if describe else ""
            bars.update(tasks[event.task], completed=event.completed, total=event.total, detail=detail)

        yield update
