"""``ctrlora verify [NAME...]``: re-hash the store's files and report damage (exit 1 if any)."""

from __future__ import annotations

import typer
from rich.markup import escape

from ctrlora_cli.byte_progress import ByteBars
from ctrlora_cli.console import out, say
from ctrlora_cli.store.store import Store
from engine.progress import report


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)


def verify(names: list[str] | None = typer.Argument(None, help="Store names (default: every entry).")) -> None:
    """Re-hash models in the store; exit non-zero when a file is damaged or missing."""
    store = Store()
    manifests = [store.get(name) for name in dict.fromkeys(names)] if names else store.list()
    if not manifests:
        say("nothing to verify: the store is empty")
        return
    total = sum(m.size for m in manifests)
    damaged = []
    with ByteBars() as bars:
        done = 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            report(bars.progress, "verify", done, total)

        results = [(m, store.check(m, on_bytes)) for m in manifests]
    for manifest, problems in results:
        if not problems:
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


def repair_command(m) -> str:
    """The command that fetches a damaged entry again, replacing its blobs."""
    source, named = m.source, f" --name {m.name}"
    if source.get("catalog"):
        return f"ctrlora pull {source['catalog']}{named if m.name != source['catalog'] else ''} --force"
    if source.get("type") == "hub":
        path = source.get("path")  # a file or folder of the repository; none for a whole SD repository
        what = f"hf://{source['repo']}/{path}" if path else f"sd:{source['repo']}"
        return f"ctrlora pull {what} --revision {source['commit']}{named} --force"
    if source.get("type") == "random":
        base = m.name[:-3] if m.kind == "sd" and m.name.endswith("-sd") else m.name
        return f"ctrlora pull {source.get('preset', 'tiny')}{' --name ' + base if base != 'tiny' else ''} --force"
    if source.get("type") == "local":
        return f"ctrlora pull {source.get('path')}{named} --force"
    return f"ctrlora rm {m.name} (then make it again)"
