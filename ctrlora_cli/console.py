"""Terminal output shared by every command: one Rich console each for stdout and stderr."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console

out = Console()
err = Console(stderr=True)


def interactive() -> bool:
    """A person at a terminal: only then do we prompt or draw progress bars."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def say(message: str) -> None:
    """One line of plain text on stdout: no markup, no wrapping (logs keep one line per event)."""
    out.print(message, markup=False, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def ask(question: str, refusal: str, *, default=None, type=None, batch: bool = False):
    """A missing required value: asked for when a person is at a terminal, else (or with
    ``batch``, e.g. --json output) refused with ``refusal`` as a usage error (exit 2)."""
    import typer

    from engine.errors import UsageError

    if batch or not interactive():
        raise UsageError(refusal)
    with _ctrl_c_exits_130():
        return typer.prompt(question, default=default, type=type)


def confirm(question: str) -> bool:
    """A yes/no question at a terminal (no by default)."""
    import typer

    with _ctrl_c_exits_130():
        return typer.confirm(question, default=False)


@contextmanager
def _ctrl_c_exits_130():
    """Ctrl-C at a prompt exits 130 as everywhere else (click turns it into "Aborted!", exit 1)."""
    import click
    import typer

    try:
        yield
    except (click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort)) as exc:  # typer 0.2x has its own
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise typer.Exit(130) from None
        raise
