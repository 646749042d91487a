"""The models ``ctrlora gen`` uses, found in the store: the base, its SD and each condition's
adapter; for ``--from``, the very entries that made the image, found by digest wherever they are
now. (Beside ``ctrlora_cli.store.resolve``, which holds the lookups by name.)

A condition here is anything with ``name`` (an adapter: store name or file) and ``digest`` (the
adapter's file digest from a recipe, or None), like ``ctrlora_cli.gen_conditions.CondSpec``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ctrlora_cli.store.resolve import adapter_file, base_folders, base_for, base_warning
from ctrlora_cli.store.store import Manifest, NotInStore, Store
from engine.errors import UsageError
from engine.files import sha256_bytes

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class Models:
    base: Manifest
    controlnet_dir: Path
    sd_dir: Path
    adapters: list[tuple[Path, dict, str]]  # (file, metadata, digest) of each condition's adapter
    made_with: dict  # the recipe's {"base": {"name", "digest"}, "sd": {"name", "digest"[, "checkpoint_sha256"]}}
    base_warnings: list[str]  # adapters used on another base than the one they were made for


def find_models(store: Store, specs: list, base: str | None, sd: str | None, recipe: dict,
                warn: Callable[[str], None]) -> Models:
    """The models for ``specs``; ``recipe`` ({} unless ``--from``) names the ones that made the
    image. A model that differs from the recipe's is used with a ``warn``ing; a missing one is
    bad input (exit 2). Without ``base`` (--base) or a recipe, the base is the one the adapters
    were made for (``resolve.base_for``); an adapter used on another base is in ``base_warnings``."""
    try:
        base_name = base or recipe.get("base", {}).get("name")
        recipe_sd = recipe.get("sd", {}) if not base else {}  # another base: its own SD
        sd = sd or _find(store, "sd", recipe_sd, warn)
        if recipe_sd and not sd:
            warn(f"sd {recipe_sd.get('name')!r} that made the image is not in the store; using the base's")
        if base_name and recipe.get("base", {}).get("name") == base_name:  # the base that made it, if still here
            base_name = _find(store, "base", recipe["base"], warn) or base_name
        if not base_name:
            base_name = base_for(store, [spec.name for spec in specs])
        manifest, controlnet_dir, sd_dir = base_folders(store, base_name, sd)
        adapters = [_adapter(store, spec, manifest, warn) for spec in specs]
    except NotInStore as exc:
        raise UsageError(str(exc)) from None
    sd_name = Path(sd_dir).name
    made_with = {"base": {"name": manifest.name, "digest": entry_digest(manifest)},
                 "sd": {"name": sd_name, "digest": entry_digest(store.get(sd_name)),
                        **_checkpoint_sha256(store.get(sd_name))}}
    warnings = [w for w in dict.fromkeys(base_warning(store, spec.name, manifest) for spec in specs) if w]
    return Models(manifest, controlnet_dir, sd_dir, adapters, made_with, warnings)


def _checkpoint_sha256(manifest: Manifest) -> dict:
    """``{"checkpoint_sha256": "sha256:<hex>"}`` for an SD converted from one checkpoint file (what
    AUTOMATIC1111's "Model hash" is made from), else {}."""
    original = manifest.converted_from or {}
    return {"checkpoint_sha256": f"sha256:{original['sha256']}"} if original.get("sha256") else {}


def _find(store: Store, kind: str, wanted: dict, warn) -> str | None:
    """A recipe's entry ({"name", "digest"}): the named entry if its digest matches, else any
    entry of that kind with the digest, else the named one with a warning, else None."""
    name, digest = wanted.get("name"), wanted.get("digest")
    if not name:
        return None
    if store.exists(name) and entry_digest(store.get(name)) == digest:
        return name
    same = [m.name for m in store.list() if m.kind == kind and entry_digest(m) == digest]
    if same:
        return same[0]
    if store.exists(name):
        warn(f"{kind} {name!r} differs from the one that made the image; the result will differ")
        return name
    return None


def _adapter(store: Store, spec, base: Manifest, warn) -> tuple[Path, dict, str]:
    """(file, metadata, digest) of a condition's adapter, checked against the base."""
    from engine.files import sha256_file

    if spec.digest:  # from a recipe: the very adapter the image was made with, wherever it is now
        found = adapter_by_digest(store, spec.digest)
        if found:
            spec.name = found
        else:
            if _exists(store, spec.name):
                warn(f"adapter {spec.name!r} differs from the one that made the image; the result will differ")
            else:
                raise UsageError(f"adapter {spec.name!r} ({spec.digest[:19]}) that made the image is not in the store")
    if not _exists(store, spec.name):
        raise UsageError(f"unknown adapter {spec.name!r}: not in the store and not an adapter file "
                         "(list adapters with: ctrlora list)")
    path, meta = adapter_file(store, spec.name, base)
    if Path(spec.name).is_file():
        return path, meta, sha256_file(Path(path))
    record = next(f for f in store.get(spec.name).files if f.path == ADAPTER_FILE)
    # The entry's view: the blob itself has no .safetensors suffix, which the loader goes by.
    return store.folder(spec.name) / ADAPTER_FILE, meta, record.digest


def adapter_by_digest(store: Store, digest: str | None) -> str | None:
    """The store's adapter entry holding the adapter file of ``digest`` (a recipe's), if any."""
    for m in store.list():
        if m.kind == "adapter" and any(f.path == ADAPTER_FILE and f.digest == digest for f in m.files):
            return m.name
    return None


def _exists(store: Store, name: str) -> bool:
    path = Path(name)
    if path.suffix == ".safetensors" or "/" in name:
        return path.is_file()
    try:
        return store.exists(name)
    except UsageError:  # not a valid store name
        return False


def entry_digest(manifest: Manifest) -> str:
    """One digest for a whole store entry (its files' paths and digests)."""
    lines = "\n".join(f"{f.path} {f.digest}" for f in sorted(manifest.files, key=lambda f: f.path))
    return sha256_bytes(lines.encode())
