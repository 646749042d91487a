"""``ctrlora rm NAME...``: remove entries, then the blobs nothing else uses."""

from __future__ import annotations

import typer
from rich.markup import escape

from ctrlora_cli.console import interactive, say, warn
from ctrlora_cli.store.store import Store
from ctrlora_cli.tables import human_size
from engine.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("rm")(rm)


def rm(
    names: list[str] = typer.Argument(..., help="Store names to remove."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove models from the local store."""
    store = Store()
    names = list(dict.fromkeys(names))
    manifests = [store.get(name) for name in names]  # all must exist before anything is removed
    summary = ", ".join(f"{m.name} ({m.kind}, {human_size(m.size)})" for m in manifests)
    if not yes:
        if not interactive():
            raise UsageError(f"not removing {', '.join(names)} without confirmation (no terminal): pass -y")
        if not typer.confirm(f"Remove {summary}?", default=False):
            say("nothing removed")
            raise typer.Exit(1)
    freed = store.remove(names)
    say(f"removed {', '.join(names)}; freed {human_size(freed)}")
    for m in store.list():
        if m.kind == "base" and m.sd in names:
            warn(escape(f"base {m.name!r} paired with {m.sd!r}, which is gone: pass --sd NAME to gen/fit, or pull {m.sd} again"))
