"""``ctrlora rm NAME...``: remove entries, then the blobs nothing else uses, and the run folders
of fit and train-base results that nothing else was made in."""

from __future__ import annotations

import typer
from rich.markup import escape

from ctrlora_cli.console import interactive, say, warn
from ctrlora_cli.store import hf_cache
from ctrlora_cli.store.store import Store, folder_size
from ctrlora_cli.tables import human_size
from engine.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("rm")(rm)


def rm(
    names: list[str] = typer.Argument(..., help="Store names to remove."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    purge_cache: bool = typer.Option(False, "--purge-cache", help="Also delete their hub files from the Hugging Face "
                                     "cache (kept by default: other tools use them)."),
) -> None:
    """Remove models from the local store (and the run folders of fit and train-base results)."""
    store = Store()
    names = list(dict.fromkeys(names))
    manifests = [store.get(name) for name in names]  # all must exist before anything is removed
    dependents = store.dependents(names)
    runs, outside = store.runs_freed_by(names)
    sizes = {run: folder_size(run) for run in runs}
    cached = hf_cache.cached_files(store, manifests, keep=[m for m in store.list() if m.name not in names])
    if not yes:
        orphans = ", ".join(dict.fromkeys(m.name for m, _, _ in dependents))
        if not interactive():
            also = f"; {orphans} would point to nothing" if orphans else ""
            raise UsageError(f"not removing {', '.join(names)} without confirmation (no terminal){also}: pass -y")
        for m, link, target in dependents:
            say(f"  {_link(m, link, target)}")
        for run in runs:
            say(f"  run folder {run} ({human_size(sizes[run])}) goes too")
        if purge_cache and cached:
            say(f"  {len(cached)} files in the Hugging Face cache ({human_size(hf_cache.cached_size(cached))}) go too")
        summary = ", ".join(f"{m.name} ({m.kind}, {human_size(m.size)})" for m in manifests)
        question = f"Remove {summary}" + (f", leaving {orphans} pointing to nothing" if orphans else "")
        if not typer.confirm(question + "?", default=False):
            say("nothing removed")
            raise typer.Exit(1)
    freed = store.remove(names)
    store.remove_runs(runs)
    say(f"removed {', '.join(names)}; freed {human_size(freed)}")
    for run in runs:
        say(f"removed run folder {run} ({human_size(sizes[run])})")
    if cached and purge_cache:
        say(f"removed {len(cached)} files from the Hugging Face cache; freed {human_size(hf_cache.purge(cached))}")
    elif cached:
        say(f"kept their hub files in the Hugging Face cache ({human_size(hf_cache.cached_size(cached))}, for other "
            f"tools); --purge-cache removes them")
    for run in outside:
        say(f"kept run folder {run} (outside the store)")
    for m, link, target in dependents:
        if link == "sd":
            warn(escape(f"base {m.name!r} paired with {target!r}, which is gone: pass --sd NAME to gen/fit, or pull "
                        f"{target} again"))
        else:
            warn(escape(f"adapter {m.name!r} was made for base {target!r}, which is gone: pass --base NAME to gen, "
                        f"or pull {target} again"))


def _link(manifest, link: str, target: str) -> str:
    if link == "sd":
        return f"base {manifest.name} is paired with {target}"
    return f"adapter {manifest.name} was made for {target}"
