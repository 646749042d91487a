"""The Store tab's work, without Gradio: the table ``ctrlora list`` prints, ``ctrlora pull`` with
its byte events, and ``ctrlora rm`` with what it would take along, said before it is done."""

from __future__ import annotations

from ctrlora_cli.store import sources
from ctrlora_cli.store.events import Message
from ctrlora_cli.store.store import Store, folder_size
from ctrlora_cli.tables import human_size
from engine.errors import UsageError
from engine.progress import Progress

COLUMNS = ["NAME", "KIND", "CONDITION", "RANK", "SIZE", "SOURCE", "DATE"]


def table(store: Store) -> list[list[str]]:
    return [[m.name, m.kind, m.condition or "-", str(m.rank) if m.rank else "-", human_size(m.size),
             sources.label(m.source), m.created[:10]] for m in store.list()]


def pullable() -> list[str]:
    """The catalog's names, and the two made offline."""
    from ctrlora_cli.store.catalog import load

    return list(load()) + ["demo", "tiny"]


def pull(store: Store, name: str, on_bytes) -> list[str]:
    """Pull ``name`` (as ``ctrlora pull NAME``); ``on_bytes(file, done, total)`` as bytes come;
    returns the lines it said."""
    from ctrlora_cli.store.pull import pull as pull_source

    if not (name or "").strip():
        raise UsageError("name what to pull: a catalog name, demo or tiny")
    said: list[str] = []

    def listen(event) -> None:
        if isinstance(event, Progress):
            on_bytes(event.task, event.completed, event.total)
        elif isinstance(event, Message):
            said.append(("warning: " if event.level == "warning" else "") + event.text)

    pull_source(store, name.strip(), on_event=listen)
    return said


def removal(store: Store, names: list[str]) -> str:
    """What removing ``names`` does, in one line, to confirm before it is done."""
    if not names:
        raise UsageError("pick what to remove")
    manifests = [store.get(name) for name in names]  # all must exist
    parts = [", ".join(f"{m.name} ({m.kind}, {human_size(m.size)})" for m in manifests)]
    orphans = list(dict.fromkeys(m.name for m, _, _ in store.dependents(names)))
    if orphans:
        parts.append(f"leaving {', '.join(orphans)} pointing to nothing")
    runs, _ = store.runs_freed_by(names)
    parts += [f"and run folder {run} ({human_size(folder_size(run))})" for run in runs]
    return "Remove " + ", ".join(parts) + "?"


def remove(store: Store, names: list[str]) -> str:
    runs, _ = store.runs_freed_by(names)
    freed = store.remove(names)
    store.remove_runs(runs)
    return f"removed {', '.join(names)}; freed {human_size(freed)}"
