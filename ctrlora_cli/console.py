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
