"""``ctrlora verify [NAME...]``: re-hash the store's files and report damage (exit 1 if any);
rebuild views that no longer lead to the blobs (they are derived data)."""

from __future__ import annotations

import typer
from rich.markup import escape

from ctrlora_cli.byte_progress import ByteBars
from ctrlora_cli.completion import any_name
from ctrlora_cli.console import out, say
from ctrlora_cli.store.sources import repair_command
from ctrlora_cli.store.store import Store
from ctrlora_cli.options import JsonOpt, examples, print_json


def register(app: typer.Typer) -> None:
    app.command("verify", epilog=examples(
        'ctrlora verify',
        'ctrlora verify base canny',
        'ctrlora verify --json',
    ))(verify)


def verify(names: list[str] | None = typer.Argument(None, help="Store names (default: every entry).",
                                                   autocompletion=any_name),
           as_json: JsonOpt = False) -> None:
    """Re-hash models in the store and rebuild their views where needed; exit 1 when a file is damaged or missing."""
    store = Store()
    manifests = [store.get(name) for name in dict.fromkeys(names)] if names else store.list()
    if not manifests and not as_json:
        say("nothing to verify: the store is empty")
        return
    with ByteBars() as bars:
        results = store.check_all(manifests, bars)
    entries = []
    for manifest, problems in results:
        view = [] if problems else store.repair_view(manifest)  # derived data: rebuilt, not a reason to fail
        entries.append({"name": manifest.name, "ok": not problems, "problems": list(problems),
                        "view_rebuilt": list(view or []), "repair": repair_command(manifest) if problems else None})
    damaged = [e for e in entries if not e["ok"]]
    if as_json:
        print_json({"verified": len(entries), "damaged": [e["name"] for e in damaged], "entries": entries})
    else:
        _report(entries)
    if damaged:
        raise typer.Exit(1)


def _report(entries: list[dict]) -> None:
    for e in entries:
        view = e["view_rebuilt"]
        more = f" and {len(view) - 1} more" if len(view) > 1 else ""
        rebuilt = f": view rebuilt ({escape(view[0])}{more})" if view else ""
        if e["ok"]:
            out.print(f"[green]ok[/green]       {e['name']}{rebuilt}", highlight=False, soft_wrap=True)
        for problem in e["problems"]:
            out.print(f"[red]damaged[/red]  {e['name']}: {escape(problem)}", highlight=False, soft_wrap=True)
    damaged = [e for e in entries if not e["ok"]]
    if not damaged:
        say(f"{len(entries)} verified, all intact")
        return
    say(f"{len(damaged)} of {len(entries)} damaged; repair with:")
    for e in damaged:
        say(f"  {e['repair']}")
