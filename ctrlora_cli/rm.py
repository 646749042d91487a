"""``ctrlora rm NAME...``: remove entries, then the blobs nothing else uses, and the run folders
of fit and train-base results that nothing else was made in."""

from __future__ import annotations

import typer
from rich.markup import escape

from ctrlora_cli.completion import any_name
from ctrlora_cli.console import interactive, say, warn
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
    as_json: JsonOpt = False,
) -> None:
    """Remove models from the local store (and the run folders of fit and train-base results)."""
    store = Store()
    names = list(dict.fromkeys(names))
    manifests = [store.get(name) for name in names]  # all must exist before anything is removed
    dependents = store.dependents(names)
    runs, outside = store.runs_freed_by(names)
    sizes = {run: folder_size(run) for run in runs}
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
        summary = ", ".join(f"{m.name} ({m.kind}, {human_size(m.size)})" for m in manifests)
        question = f"Remove {summary}" + (f", leaving {orphans} pointing to nothing" if orphans else "")
        if not typer.confirm(question + "?", default=False):
            say("nothing removed")
            raise typer.Exit(1)
    freed = store.remove(names)
    store.remove_runs(runs)
    if as_json:
        print_json({"removed": names, "freed_bytes": freed,
                    "run_folders_removed": [{"path": str(run), "bytes": sizes[run]} for run in runs],
                    "run_folders_kept": [str(run) for run in outside],
                    "dangling": [{"name": m.name, "link": link, "target": target} for m, link, target in dependents]})
    else:
        say(f"removed {', '.join(names)}; freed {human_size(freed)}")
        for run in runs:
            say(f"removed run folder {run} ({human_size(sizes[run])})")
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
