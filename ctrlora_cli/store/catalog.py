"""The catalog: what ``ctrlora pull NAME`` fetches (shipped as ``ctrlora_cli/data/catalog.json``).

``CTRLORA_CATALOG`` names a JSON file of the same form whose models are added to (or replace)
the shipped ones: a mirror, a private adapter, or a test hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

from ctrlora_cli import envconfig
from ctrlora_cli.store.names import KINDS
from engine.errors import UsageError

FORMAT = "ctrlora-catalog"


@dataclass
class CatalogEntry:
    name: str
    kind: str  # sd | base | adapter | annotator
    repo: str
    file: str | None = None
    pattern: list[str] = field(default_factory=list)
    files: list = field(default_factory=list)  # annotator: every file it needs (an item may list alternatives)
    arch: str | None = None  # sd, base: the architecture preset
    sd: str | None = None  # base: the catalog's SD it pairs with
    base: str | None = None  # adapter: the catalog's base it was made for
    condition: str | None = None
    variant: str | None = None  # sd: preferred weights variant ("fp16")
    revision: str | None = None
    notes: str = ""


def _read(text: str, where: str) -> dict[str, CatalogEntry]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"catalog {where}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("models"), dict):
        raise UsageError(f"catalog {where}: expected {{\"format\": \"{FORMAT}\", \"models\": {{...}}}}")
    known = set(CatalogEntry.__dataclass_fields__) - {"name"}
    entries = {}
    for name, raw in doc["models"].items():
        unknown = sorted(set(raw) - known)
        if unknown or raw.get("kind") not in KINDS or not raw.get("repo"):
            raise UsageError(f"catalog {where}: model {name!r} needs kind ({'|'.join(KINDS)}) and repo"
                             + (f"; unknown fields {unknown}" if unknown else ""))
        raw = dict(raw)
        if isinstance(raw.get("pattern"), str):
            raw["pattern"] = [raw["pattern"]]
        if raw["kind"] == "annotator" and not raw.get("files"):
            raise UsageError(f"catalog {where}: model {name!r} needs files (the annotator's weights and config)")
        if raw["kind"] not in ("sd", "annotator") and not (raw.get("file") or raw.get("pattern")):
            raise UsageError(f"catalog {where}: model {name!r} needs a file or a pattern")
        entries[name] = CatalogEntry(name=name, **raw)
    return entries


def load() -> dict[str, CatalogEntry]:
    shipped = resources.files("ctrlora_cli").joinpath("data/catalog.json").read_text()
    entries = _read(shipped, "(shipped)")
    path = envconfig.catalog_file()
    if path is not None:
        if not path.is_file():
            raise UsageError(f"{envconfig.CATALOG.name}={path}: no such file")
        entries.update(_read(path.read_text(), str(path)))
    return entries
