"""``ctrlora verify [NAME...]``: re-hash the store's files and report damage (exit 1 if any)."""

from __future__ import annotations

import typer

from ctrlora_cli.byte_progress import ByteBars
from rich.markup import escape

from ctrlora_cli.console import out, say
from ctrlora_cli.store import Store
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
    fixes = []
    for m in damaged:
        if m.source.get("type") in ("hub", "random"):
            what = m.source.get("catalog") or ("tiny" if m.source.get("type") == "random" else None)
            fixes.append(f"ctrlora pull {what or _hub_spec(m.source)} --name {m.name} --force")
        else:
            fixes.append(f"ctrlora rm {m.name}, then import it again")
    say(f"{len(damaged)} of {len(manifests)} damaged; repair: " + "; ".join(fixes))
    raise typer.Exit(1)


def _hub_spec(source: dict) -> str:
    if source.get("path") and source["path"].endswith((".ckpt", ".safetensors", ".pt", ".pth", ".bin")):
        return f"hf://{source['repo']}/{source['path']} --revision {source['commit']}"
    return f"sd:{source['repo']} --revision {source['commit']}"
