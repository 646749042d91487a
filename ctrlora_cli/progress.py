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


def describe_fit(event) -> str:
    """The text after fit's bars: loss, speed, time left, GPU memory."""
    info = event.info
    if event.task == "train":
        parts = [f"loss {info['loss_smooth']:.4f}", f"{info['it_s']:.2f} it/s", f"{info['images_s']:.1f} img/s"]
        if info.get("eta_s") is not None:
            parts.append(f"ETA {duration(info['eta_s'])}")
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


def describe_train_base(event) -> str:
    """The text after train-base's bar, from rank 0's metrics line."""
    record = event.info
    if not record:
        return "starting"
    per_rank = " ".join(f"{r:.1f}" for r in record["per_rank_samples_per_s"])
    return (f"loss {record['loss']:.4f}  {record['samples_per_s']:.1f} samples/s  (ranks: {per_rank})  "
            f"{', '.join(record['conditions'])}")
