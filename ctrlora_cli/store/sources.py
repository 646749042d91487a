"""Where an entry came from, in words, and the command that brings it (back) into the store.

A manifest's ``source`` is ``{"type": "hub", "repo", "revision", "commit", "path"?, "catalog"?}``,
``{"type": "local", "path", ...}``, ``{"type": "random", "preset"}`` or ``{"type": "demo", ...}``.
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


def pull_hint(name: str) -> str:
    """The command that would bring ``name`` into the store."""
    try:
        from ctrlora_cli.store.catalog import load

        known = name == "tiny" or name in load()
    except CtrloraError:
        known = False
    if known:
        return f"fetch it with: ctrlora pull {name}"
    return f"fetch or import it with: ctrlora pull hf://OWNER/REPO/FILE --name {name} (or a local file)"


def repair_command(manifest) -> str:
    """The command that fetches a damaged entry again, replacing its blobs."""
    source, named = manifest.source, f" --name {manifest.name}"
    if source.get("catalog"):
        return f"ctrlora pull {source['catalog']}{named if manifest.name != source['catalog'] else ''} --force"
    if source.get("type") == "hub":
        path = source.get("path")  # a file or folder of the repository; none for a whole SD repository
        what = f"hf://{source['repo']}/{path}" if path else f"sd:{source['repo']}"
        return f"ctrlora pull {what} --revision {source['commit']}{named} --force"
    if source.get("type") == "random":
        base = manifest.name[:-3] if manifest.kind == "sd" and manifest.name.endswith("-sd") else manifest.name
        return f"ctrlora pull {source.get('preset', 'tiny')}{' --name ' + base if base != 'tiny' else ''} --force"
    if source.get("type") == "local":
        return f"ctrlora pull {source.get('path')}{named} --force"
    return f"ctrlora rm {manifest.name} (then make it again)"
