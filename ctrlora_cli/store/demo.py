"""The demo model that ships inside the package: ``ctrlora pull demo`` puts it in the store with
no network; ``export_demo`` (called by the recipe beside the weights) writes it from a store.

Package folder ``ctrlora_cli/data/demo/`` (``CTRLORA_DEMO_DIR`` points elsewhere, e.g. a rebuilt one)::

    demo.json                 names, conditions, architecture, the recipe's settings and fidelity table
    sd/                       the toy SD in diffusers layout (fp16 safetensors)
    base/controlnet/          the demo Base ControlNet (fp16)
    adapters/<condition>.safetensors
    recipe.py                 how all of it was made
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ctrlora_cli import envconfig
from ctrlora_cli.store.events import Listener, tell
from ctrlora_cli.store.names import validate_name
from ctrlora_cli.store.store import Store
from engine.errors import UsageError
from engine.files import sha256_bytes

PACKAGED = Path(__file__).resolve().parents[1] / "data" / "demo"
ABOUT = "demo.json"
PARTS = ("sd", "base", "adapters")


def demo_dir() -> Path:
    return envconfig.demo_dir() or PACKAGED


def pull_demo(store: Store, name: str = "demo", replace: bool = False, on_event: Listener | None = None) -> dict:
    """Add ``NAME-sd``, ``NAME`` (base) and ``NAME-<condition>`` adapters from the demo folder;
    returns their names ({"sd", "base", "adapters"}). Names already in the store are refused
    unless ``replace`` (``Store.claim_group``); entries already pulled from this demo are kept,
    and only the missing or damaged ones are added (``replace``: all of them)."""
    folder = demo_dir()
    about_file = folder / ABOUT
    if not about_file.is_file():
        raise UsageError(f"no demo model in {folder}; build it with: python {PACKAGED / 'recipe.py'}")
    text = about_file.read_text(encoding="utf-8")
    about = json.loads(text)
    validate_name(name)
    sd_name = f"{name}-sd"
    names = {condition: f"{name}-{condition}" for condition in about["adapters"]}
    for entry in (sd_name, *names.values()):
        validate_name(entry)
    arch = about["arch"]
    source = {"type": "demo", "folder": str(folder), "version": about.get("version"), "name": name,
              "about_sha256": sha256_bytes(text.encode()).split(":", 1)[1]}
    everything = {"sd": sd_name, "base": name, "adapters": list(names.values())}
    same = lambda m: m.source.get("type") == "demo" and (  # entries pulled before the digest was recorded: by version
        m.source.get("about_sha256", source["about_sha256"]) == source["about_sha256"]
        and m.source.get("version") == source["version"])
    todo = store.claim_group([name, sd_name, *names.values()], same, replace)
    if not todo:
        tell(on_event, f"{name} is up to date (the demo model: {name}, {sd_name} and {len(names)} adapters)")
        return everything
    labels = ["demo"]
    size = about.get("settings", {}).get("size")
    note = "the demo model: toy SD, base and adapters trained on the demo world" + (f" ({size} x {size})" if size else "")
    # replace=True: what is written is rewritten whole, a damaged blob of the same digest too.
    meta = dict(arch=arch, source=source, labels=labels, replace=True)
    if sd_name in todo:
        store.add_folder(sd_name, "sd", folder / "sd", notes=note, **meta)
    if name in todo:
        store.add_folder(name, "base", folder / "base", sd=sd_name, notes=note, extra={"conditions": list(names)},
                         **meta)
    made_for = {"base": name, "base_digest": store.get(name).weights_digest}
    for condition, entry in names.items():
        if entry in todo:
            info = about["adapters"][condition]
            store.add(entry, "adapter", {"adapter.safetensors": folder / "adapters" / f"{condition}.safetensors"},
                      condition=condition, rank=info["rank"], notes=f"{info['how']} ({note})", extra=made_for, **meta)
    kept = len(names) + 2 - len(todo)
    if kept:
        tell(on_event, f"pulled {', '.join(todo)} of the demo model ({kept} already there); offline, from the package")
    else:
        tell(on_event, f"pulled {name} (base, the demo model), {sd_name} (sd) and adapters "
                       f"{', '.join(names.values())}; offline, from the package")
    return everything


def export_demo(store: Store, target: Path, *, sd: str, base: str, adapters: dict[str, str], about: dict) -> Path:
    """Write the demo folder from store entries: weights in fp16, ``demo.json`` last."""
    from engine.formats.adapter_file import read_adapter_metadata
    from engine.files import write_atomic
    from engine.models.storage import save_fp16_copy

    target.mkdir(parents=True, exist_ok=True)
    (target / ABOUT).unlink(missing_ok=True)  # first: a half-written folder is never taken for a demo
    for part in PARTS:
        shutil.rmtree(target / part, ignore_errors=True)
    _copy_entry(store, sd, target / "sd", save_fp16_copy)
    _copy_entry(store, base, target / "base", save_fp16_copy)
    records = {}
    for condition, entry in adapters.items():
        path = store.file(entry, "adapter.safetensors")
        save_fp16_copy(path, target / "adapters" / f"{condition}.safetensors")
        meta = read_adapter_metadata(path)
        how = "fitted on the demo base" if store.get(entry).source.get("type") == "fit" else "trained with the base"
        records[condition] = {"rank": meta["rank"], "how": how}
    arch = store.get(base).arch
    sizes = {part: sum(p.stat().st_size for p in (target / part).rglob("*") if p.is_file()) for part in PARTS}
    content = {"version": 1, "arch": arch, "adapters": records, "bytes": sizes, **about}
    write_atomic(target / ABOUT, json.dumps(content, indent=2) + "\n")  # ASCII: json.dumps escapes the rest
    return target


def _copy_entry(store: Store, name: str, target: Path, convert) -> None:
    for record in store.get(name).files:
        src = store.folder(name) / record.path
        dst = target / record.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        if record.path.endswith(".safetensors"):
            convert(src, dst)
        else:
            shutil.copyfile(src, dst)
