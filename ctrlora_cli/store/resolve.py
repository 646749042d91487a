"""From store names to files the engine loads: bases, their SD, and adapters."""

from __future__ import annotations

from pathlib import Path

from ctrlora_cli import envconfig
from ctrlora_cli.store.names import validate_name
from ctrlora_cli.store.store import Manifest, Store
from engine.errors import UsageError


def default_base(store: Store) -> str:
    """The base a command uses without --base: the only one in the store, else the one named 'base'."""
    bases = [m.name for m in store.list() if m.kind == "base"]
    if len(bases) == 1:
        return bases[0]
    if "base" in bases:
        return "base"
    if not bases:
        raise UsageError("no base in the store; fetch one with: ctrlora pull")
    raise UsageError(f"the store holds several bases ({', '.join(bases)}); pick one with --base")


def made_for(store: Store, adapter: str) -> dict | None:
    """The base adapter entry ``adapter`` was made for, as its manifest records it:
    ``{"name", "digest"}`` (the digest of the base's weights; None for records without one), or
    None when nothing is recorded (a file imported without --base, older entries) or ``adapter``
    is a file path rather than a store name."""
    if not _store_name(adapter) or not store.exists(adapter):
        return None
    return store.get(adapter).made_for


def recorded_base(store: Store, record: dict, manifests: list | None = None) -> str | None:
    """The store's base for a record ``{"name", "digest"}``: the entry of that name when it is a
    base with those weights (or the record has no digest), else a base with those weights under
    another name, else the entry of that name when it is a base (replaced since), else None.
    ``manifests``: the store's entries, when the caller has them already."""
    bases = {m.name: m for m in (store.list() if manifests is None else manifests) if m.kind == "base"}
    named = bases.get(record["name"])
    digest = record.get("digest")
    if named is not None and (not digest or named.weights_digest == digest):
        return named.name
    same = [m.name for m in bases.values() if digest and m.weights_digest == digest]
    if same:
        return same[0]
    return named.name if named is not None else None


def base_for(store: Store, adapters, base: str | None = None) -> str:
    """The base a command (gen, fit --from, eval) uses with ``adapters`` (store names or adapter
    files): ``base`` (--base) when given; else the base the adapters were made for, when every
    adapter that records one points at the same base and the store holds it; else, as before
    adapters recorded anything, ``default_base`` (the only base, else the one named 'base')."""
    if base:
        return base
    records = [r for r in (made_for(store, a) for a in adapters) if r]
    found = {recorded_base(store, r) for r in records}
    if len(found) == 1 and None not in found:
        return found.pop()
    return default_base(store)


def base_warning(store: Store, adapter: str, base: Manifest) -> str | None:
    """A warning when adapter entry ``adapter`` is used on another base than the one it was made
    for (of the same architecture: ``adapter_file`` refuses others), naming both; None when it is
    that base, or the adapter records none."""
    record = made_for(store, adapter)
    if record is None:
        return None
    own, digest = recorded_base(store, record), record.get("digest")
    if digest == base.weights_digest or own == base.name and not digest:
        return None  # the very weights it was made for, whatever the base is called now
    if own is None:
        return (f"adapter {adapter!r} was made for base {record['name']!r}, which is not in the store; using it on "
                f"{base.name!r} (same architecture, {base.arch}): it runs, but may follow its condition less well")
    if own == base.name:
        return (f"adapter {adapter!r} was made for base {base.name!r} as it was before it was replaced; it runs, "
                f"but may follow its condition less well")
    return (f"adapter {adapter!r} was made for base {own!r}, not {base.name!r} (same architecture, {base.arch}): "
            f"it runs, but may follow its condition less well; pass --base {own} to use its own")


def _store_name(name: str) -> bool:
    try:
        validate_name(name)
    except UsageError:
        return False
    return not name.endswith(".safetensors")


def base_folders(store: Store, base: str, sd: str | None = None) -> tuple[Manifest, Path, Path]:
    """(base manifest, Base ControlNet folder, SD folder) for a base entry, paired with ``sd`` or
    the SD entry the base names."""
    manifest = store.get(base)
    if manifest.kind != "base":
        raise UsageError(f"{base!r} is a {manifest.kind}, not a base; list bases with: ctrlora list")
    sd_name = sd or manifest.sd
    if not sd_name:
        raise UsageError(f"base {base!r} names no Stable Diffusion model; pass --sd NAME")
    sd_manifest = store.get(sd_name)
    if sd_manifest.kind != "sd":
        raise UsageError(f"{sd_name!r} is a {sd_manifest.kind}, not a Stable Diffusion model")
    if sd_manifest.arch and manifest.arch and sd_manifest.arch != manifest.arch:
        raise UsageError(f"{sd_name!r} is a {sd_manifest.arch} Stable Diffusion model, but base {base!r} is "
                         f"{manifest.arch}; pick an SD model of that architecture with --sd")
    folder = store.folder(base)
    return manifest, folder / "controlnet", store.folder(sd_name)


def adapter_file(store: Store, name_or_path: str, base: Manifest) -> tuple[Path, dict]:
    """An adapter by store name or file path, checked to fit ``base``'s architecture."""
    from engine.formats.adapter_file import read_adapter_metadata

    path = Path(name_or_path)
    if path.suffix == ".safetensors" and path.is_file():
        meta = read_adapter_metadata(path)
        label = str(path)
    else:
        manifest = store.get(name_or_path)
        if manifest.kind != "adapter":
            raise UsageError(f"{name_or_path!r} is a {manifest.kind}, not an adapter")
        path = store.file(name_or_path, "adapter.safetensors")
        meta = read_adapter_metadata(path)
        label = name_or_path
    if meta["base_arch"] != base.arch:
        raise UsageError(f"adapter {label!r} was made for a {meta['base_arch']} base, but {base.name!r} is "
                         f"{base.arch}; pick an adapter of that base")
    return path, meta


def load_pipeline(sd_dir, cn_dir, adapters, device: str, precision: str | None, compile_: bool,
                  recorded_precision: str | None = None):
    """(pipeline, {adapter digest: name in the model}, device, precision name); ``adapters`` are
    (path, metadata, digest) as ``adapter_file`` and the store give them. ``precision`` None: the
    recipe's ``recorded_precision`` where the device runs it, else auto (``engine.runtime``)."""
    from engine.formats.adapter_file import load_adapter_file
    from engine.models.storage import load_base, load_sd, unet_width
    from engine.generation.pipeline import CtrLoraPipeline
    from engine.runtime import device_and_dtype, replayed_precision, resolve_device

    envconfig.apply_cpu_bf16()  # CTRLORA_CPU_BF16, before auto is decided
    if precision is None:
        precision = replayed_precision(recorded_precision, resolve_device(device))
    dev, dtype, precision = device_and_dtype(device, precision, width=unet_width(sd_dir))
    pipe = CtrLoraPipeline(load_sd(sd_dir, device=dev, dtype=dtype), load_base(cn_dir, device=dev, dtype=dtype),
                           device=dev, dtype=dtype, compile=compile_)
    names: dict[str, str] = {}  # an adapter given twice (two images, say) is loaded once
    for path, meta, digest in adapters:
        if digest not in names:
            names[digest] = f"c{len(names)}"
            state, _ = load_adapter_file(path)
            pipe.load_adapter(names[digest], state, alpha=meta["alpha"])
    return pipe, names, dev, precision


def run_base(store: Store, run_dir: Path) -> str | None:
    """The store's base with the weights the run in ``run_dir`` started on (``--resume``), if any."""
    from engine.training.fit import saved_run

    digest = ((saved_run(run_dir) or {}).get("identity") or {}).get("base_digest")
    return recorded_base(store, {"name": "", "digest": digest}) if digest else None
