"""Rendering engine progress events: the one renderer, for a person at a terminal and for logs.

At a terminal, a Rich bar per task: done/total, time elapsed, then the task's own figures, its
speed and ONE time left (ours, not Rich's), folded onto a second line rather than cut when the
terminal is narrow. Without a terminal (a pipe, nohup, SLURM), the same text as one plain line
on stderr per task every ``CTRLORA_LOG_EVERY`` seconds (``ctrlora_cli.envconfig``; 0: none),
and a last line when a task that was logged finishes."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from ctrlora_cli.console import err, interactive
from engine.progress import Progress as EngineProgress

Describe = Callable[[EngineProgress], str]


@contextmanager
def progress_bars(enabled: bool | None = None, describe: Describe | None = None,
                  lines: bool | None = None) -> Iterator[Callable[[EngineProgress], None]]:
    """Yield a callback for the engine. Each distinct ``task`` gets its own bar (``enabled``,
    default: at a terminal); ``describe`` turns an update's ``info`` into the figures shown. When
    no bar is drawn: plain lines (``lines``, default: without a terminal), else nothing."""
    if enabled is None:
        enabled = interactive()
    if not enabled:
        log = LineLog(describe) if (not interactive() if lines is None else lines) else None
        yield log if log is not None and log.every > 0 else (lambda update: None)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[detail]}", table_column=Column(overflow="fold"))]
    with Progress(*columns, console=err, transient=False) as bars:
        tasks: dict[str, int] = {}
        speeds: dict[str, Speed] = {}

        def update(event: EngineProgress) -> None:
            if event.task not in tasks:
                tasks[event.task] = bars.add_task(event.task, total=event.total, detail="")
            speed = speeds.setdefault(event.task, Speed())
            detail = figures(event, describe, speed.update(event))
            bars.update(tasks[event.task], completed=event.completed, total=event.total, detail=detail)

        yield update


@dataclass
class Speed:
    """A task's speed since its first progress (time before it, loading say, does not count)."""

    start: float = 0.0
    first: float | None = None

    def update(self, event: EngineProgress, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if self.first is None or event.completed <= self.first:
            self.start, self.first = now, event.completed
            return None
        return (event.completed - self.first) / max(now - self.start, 1e-9)


def figures(event: EngineProgress, describe: Describe | None, speed: float | None, unit: str = "it") -> str:
    """The task's own figures, then its speed and time left: from ``info`` (``it_s``, ``eta_s``)
    when the engine measured them, else from ``speed``."""
    info = event.info
    speed = info.get("it_s") or speed
    parts = [describe(event)] if describe else []
    if speed:
        parts.append(f"{size(speed)}/s" if unit == "bytes" else f"{speed:.2f} {unit}/s")
    eta = info.get("eta_s")
    if eta is None and speed and event.total is not None:
        eta = max(event.total - event.completed, 0) / speed
    if eta is not None and (event.total is None or event.completed < event.total):
        parts.append(f"ETA {duration(eta)}")
    return " · ".join(p for p in parts if p)


class LineLog:
    """The callback without a terminal: per task, a line every ``every`` seconds and one when a
    logged task ends. ``unit``: "it" (steps, images) or "bytes"."""

    def __init__(self, describe: Describe | None = None, unit: str = "it", every: float | None = None):
        from ctrlora_cli.envconfig import log_every

        self.describe, self.unit = describe, unit
        self.every = log_every() if every is None else every
        self._speeds: dict[str, Speed] = {}
        self._logged: dict[str, float] = {}  # task -> when its last line went out
        self._started = time.monotonic()

    def __call__(self, event: EngineProgress) -> None:
        now = time.monotonic()
        speed = self._speeds.setdefault(event.task, Speed()).update(event, now)
        done = event.total is not None and event.completed >= event.total
        last = self._logged.get(event.task)
        if now - (self._started if last is None else last) >= self.every or (done and last is not None):
            self._logged[event.task] = now
            err.print(self.line(event, speed), markup=False, highlight=False, soft_wrap=True)
            if done:
                self._logged.pop(event.task)

    def line(self, event: EngineProgress, speed: float | None) -> str:
        count = (f"{size(event.completed)}/{size(event.total) if event.total else '?'}" if self.unit == "bytes"
                 else f"{event.completed:g}/{event.total:g}" if event.total else f"{event.completed:g}")
        percent = f" ({100 * event.completed / event.total:.0f}%)" if event.total else ""
        rest = figures(event, self.describe, speed, self.unit)
        return f"{event.task} {count}{percent}" + (f" · {rest}" if rest else "")


def describe_fit(event) -> str:
    """fit's figures: loss, images per second, GPU memory (speed and time left come from
    ``figures``)."""
    info = event.info
    if event.task == "train":
        parts = [f"loss {info['loss_smooth']:.4f}", f"{info['images_s']:.1f} img/s"]
        if info.get("memory_gb") is not None:
            parts.append(f"GPU {info['memory_gb']:.1f} GB")
        return " · ".join(parts)
    if event.task == "encode" and "cached" in info:
        return f"{info['cached']} already cached"
    if event.task == "validate":
        return f"step {info['step']}"
    return ""


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def size(count: float) -> str:
    """Bytes: 512 B, 3.4 MB, 1.2 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


def describe_train_base(event) -> str:
    """train-base's figures, from rank 0's metrics line."""
    record = event.info
    if not record:
        return "starting"
    per_rank = " ".join(f"{r:.1f}" for r in record["per_rank_samples_per_s"])
    return (f"loss {record['loss']:.4f} · {record['samples_per_s']:.1f} samples/s (ranks: {per_rank}) · "
            f"{', '.join(record['conditions'])}")
