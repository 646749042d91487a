"""Terminal output shared by every command: one Rich console each for stdout and stderr."""

from __future__ import annotations

import sys

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
    return typer.prompt(question, default=default, type=type)


def confirm(question: str) -> bool:
    """A yes/no question for a person at a terminal, No by default (Ctrl-C: exit 130, in app.main)."""
    import typer

    return typer.confirm(question, default=False)


def go_on_despite(warnings: list[str], yes: bool, *, batch: bool = False) -> None:
    """Warnings about something the user may not mean (an adapter on another base than its own):
    each printed; then, at a terminal and unless ``yes`` or ``batch`` (--json), a question whose
    No stops the command (exit 1) before any work. Without a terminal the command goes on."""
    import typer
    from rich.markup import escape

    for message in warnings:
        warn(escape(message))
    if warnings and not yes and not batch and interactive() and not confirm("Go on?"):
        say("stopped; nothing was done")
        raise typer.Exit(1)
