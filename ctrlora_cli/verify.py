"""``ctrlora verify [NAME...]``: re-hash the store's files and report damage (exit 1 if any);
rebuild views that no longer lead to the blobs (they are derived data)."""

from __future__ import annotations

import typer
from rich.markup import escape

from ctrlora_cli.byte_progress import ByteBars
from ctrlora_cli.console import out, say
from ctrlora_cli.store.sources import repair_command
from ctrlora_cli.store.store import Store
from ctrlora_cli.options import examples


def register(app: typer.Typer) -> None:
    app.command("verify", epilog=examples(
        'ctrlora verify',
        'ctrlora verify base canny',
        'ctrlora verify --json',
    ))(verify)


def verify(names: list[str] | None = typer.Argument(None, help="Store names (default: every entry).")) -> None:
    """Re-hash models in the store and rebuild their views where needed; exit 1 when a file is damaged or missing."""
    store = Store()
    manifests = [store.get(name) for name in dict.fromkeys(names)] if names else store.list()
    if not manifests:
        say("nothing to verify: the store is empty")
        return
    with ByteBars() as bars:
        results = store.check_all(manifests, bars)
    damaged = []
    for manifest, problems in results:
        if not problems:
            view = store.repair_view(manifest)  # derived data: rebuilt, not a reason to fail
            if view:
                out.print(f"[green]ok[/green]       {manifest.name}: view rebuilt ({escape(view[0])}"
                          f"{f' and {len(view) - 1} more' if len(view) > 1 else ''})", highlight=False, soft_wrap=True)
            else:
                out.print(f"[green]ok[/green]       {manifest.name}", highlight=False, soft_wrap=True)
            continue
        damaged.append(manifest)
        for problem in problems:
            out.print(f"[red]damaged[/red]  {manifest.name}: {escape(problem)}", highlight=False, soft_wrap=True)
    if not damaged:
        say(f"{len(manifests)} verified, all intact")
        return
    say(f"{len(damaged)} of {len(manifests)} damaged; repair with:")
    for m in damaged:
        say(f"  {repair_command(m)}")
    raise typer.Exit(1)
