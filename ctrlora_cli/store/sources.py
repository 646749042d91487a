"""Where an entry came from, in words, and the command that brings it (back) into the store.

A manifest's ``source`` is ``{"type": "hub", "repo", "revision", "commit", "path"?, "catalog"?}``,
``{"type": "local", "path", ...}``, ``{"type": "random", "preset", "name"}``, ``{"type": "demo",
"folder", "version", "name"}`` (``name``: the base the group was pulled as), ``{"type": "fit",
"data", "run_dir"}``, ``{"type": "train-base", "run"}`` or ``{"type": "world", ...}``.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import CtrloraError


def short(source: dict) -> str:
    """For one-line messages: ``owner/repo@<12 of the commit> path``, a local path, ..."""
    if source.get("type") == "hub":
        where = f"{source['repo']}@{source['commit'][:12]}"
        return where + (f" {source['path']}" if source.get("path") else "")
    if source.get("type") == "local":
        return source.get("path", "local")
    if source.get("type") == "random":
        return f"random {source.get('preset')}"
    if source.get("type") == "demo":
        return "the demo model"
    if source.get("type") == "fit":
        return f"fit on {source.get('data', '?')}"
    if source.get("type") == "train-base":
        return f"train-base run {source.get('run', '?')}"
    if source.get("type") == "world":
        return "world train-sd"
    return source.get("type", "?")


def label(source: dict) -> str:
    """For a table column: ``owner/repo@<7 of the commit>``, a file name, ..."""
    kind = source.get("type")
    if kind == "hub":
        return f"{source.get('repo')}@{str(source.get('commit', ''))[:7]}"
    if kind == "local":
        return Path(source.get("path", "")).name or "local"
    if kind == "random":
        return f"random ({source.get('preset')})"
    return str(kind or "-")


def detail(source: dict) -> str:
    """In full: ``hf://owner/repo/path at REVISION = COMMIT (endpoint)``, a local path, ..."""
    if source.get("type") == "hub":
        text = f"hf://{source['repo']}" + (f"/{source['path']}" if source.get("path") else "")
        text += f" at {source.get('revision')} = {source.get('commit')}"
        return text + (f" ({source['endpoint']})" if source.get("endpoint") else "")
    if source.get("type") == "local":
        return source.get("path", "")
    return label(source)


OFFLINE_SOURCES = ("tiny", "demo")  # what ``ctrlora pull`` makes without the catalog


def pullable(name: str) -> bool:
    """``ctrlora pull NAME`` knows ``name`` (the catalog, tiny, demo)."""
    try:
        from ctrlora_cli.store.catalog import load

        return name in OFFLINE_SOURCES or name in load()
    except CtrloraError:
        return False


def pull_hint(name: str) -> str:
    """The command that would bring ``name`` into the store."""
    if pullable(name):
        return f"fetch it with: ctrlora pull {name}"
    return f"fetch or import it with: ctrlora pull hf://OWNER/REPO/FILE --name {name} (or a local file)"


def repair_command(manifest) -> str:
    """The command that makes a damaged entry again, replacing its blobs."""
    source, named = manifest.source, f" --name {manifest.name}"
    kind = source.get("type")
    if source.get("catalog"):
        return f"ctrlora pull {source['catalog']}{named if manifest.name != source['catalog'] else ''} --force"
    if kind == "hub":
        path = source.get("path")  # a file or folder of the repository; none for a whole SD repository
        what = f"hf://{source['repo']}/{path}" if path else f"sd:{source['repo']}"
        return f"ctrlora pull {what} --revision {source['commit']}{named} --force"
    if kind in ("random", "demo"):  # made as a group (NAME, NAME-sd, NAME-<condition>) by `pull tiny|demo`
        group = source.get("name") or _group_name(manifest)
        command = "tiny" if kind == "random" else "demo"
        return f"ctrlora pull {command}{' --name ' + group if group != command else ''} --force"
    if kind == "local":
        return f"ctrlora pull {source.get('path')}{named} --force"
    if kind == "world":
        settings = "".join(f" --{key} {source[key]}" for key in ("size", "count", "seed") if key in source)
        return f"ctrlora world train-sd{named}{settings} --force"
    if kind == "fit" and source.get("data"):
        base = manifest.made_for["name"] if manifest.made_for else None
        return (f"ctrlora rm -y {manifest.name} && ctrlora fit {source['data']}{named}"
                f"{' --base ' + base if base else ''}")
    if kind == "train-base":
        return f"ctrlora rm -y {manifest.name}, then run its ctrlora train-base again"
    return f"ctrlora rm -y {manifest.name}, then make it again"


def _group_name(manifest) -> str:
    """The base name a ``pull tiny``/``pull demo`` group was made under, for entries recorded
    before the source named it: NAME-sd is its SD, an adapter names its base."""
    if manifest.kind == "sd" and manifest.name.endswith("-sd"):
        return manifest.name[:-3]
    if manifest.made_for:
        return manifest.made_for["name"]
    if manifest.kind == "adapter" and "-" in manifest.name:
        return manifest.name.rsplit("-", 1)[0]
    return manifest.name
