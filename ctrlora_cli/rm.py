"""``ctrlora rm NAME...``: remove entries, then the blobs nothing else uses, and the run folders
of fit and train-base results that nothing else was made in."""

from __future__ import annotations

import typer
from rich.markup import escape

from ctrlora_cli.completion import any_name
from ctrlora_cli.console import interactive, say, warn
from ctrlora_cli.store import hf_cache
from ctrlora_cli.store.store import Store, folder_size
from ctrlora_cli.tables import human_size
from ctrlora_cli.options import JsonOpt, examples, print_json
from engine.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("rm", epilog=examples(
        'ctrlora rm canny',
        'ctrlora rm canny depth -y',
        'ctrlora rm canny -y --json',
    ))(rm)


def rm(
    names: list[str] = typer.Argument(..., help="Store names to remove.", autocompletion=any_name),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    purge_cache: bool = typer.Option(False, "--purge-cache", help="Also delete their hub files from the Hugging Face "
                                     "cache (kept by default: other tools use them)."),
    as_json: JsonOpt = False,
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
        if not interactive() or as_json:
            also = f"; {orphans} would point to nothing" if orphans else ""
            why = "--json" if as_json else "no terminal"
            raise UsageError(f"not removing {', '.join(names)} without confirmation ({why}){also}: pass -y")
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
    purged = hf_cache.purge(cached) if cached and purge_cache else 0
    if as_json:
        print_json({"removed": names, "freed_bytes": freed,
                    "run_folders_removed": [{"path": str(run), "bytes": sizes[run]} for run in runs],
                    "run_folders_kept": [str(run) for run in outside],
                    "hf_cache": {"files": len(cached), "purged": bool(cached and purge_cache), "freed_bytes": purged},
                    "dangling": [{"name": m.name, "link": link, "target": target} for m, link, target in dependents]})
    else:
        say(f"removed {', '.join(names)}; freed {human_size(freed)}")
        for run in runs:
            say(f"removed run folder {run} ({human_size(sizes[run])})")
        if cached and purge_cache:
            say(f"removed {len(cached)} files from the Hugging Face cache; freed {human_size(purged)}")
        elif cached:
            say(f"kept their hub files in the Hugging Face cache ({human_size(hf_cache.cached_size(cached))}, for "
                f"other tools); --purge-cache removes them")
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
