"""From store names to files the engine loads: bases, their SD, and adapters."""

from __future__ import annotations

from pathlib import Path

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


def load_pipeline(sd_dir, cn_dir, adapters, device: str, precision: str, compile_: bool):
    """(pipeline, {adapter digest: name in the model}, device, precision name); ``adapters`` are
    (path, metadata, digest) as ``adapter_file`` and the store give them."""
    from engine.formats.adapter_file import load_adapter_file
    from engine.models.storage import load_base, load_sd
    from engine.generation.pipeline import CtrLoraPipeline
    from engine.runtime import device_and_dtype

    dev, dtype, precision = device_and_dtype(device, precision)
    pipe = CtrLoraPipeline(load_sd(sd_dir, device=dev, dtype=dtype), load_base(cn_dir, device=dev, dtype=dtype),
                           device=dev, dtype=dtype, compile=compile_)
    names: dict[str, str] = {}  # an adapter given twice (two images, say) is loaded once
    for path, meta, digest in adapters:
        if digest not in names:
            names[digest] = f"c{len(names)}"
            state, _ = load_adapter_file(path)
            pipe.load_adapter(names[digest], state, alpha=meta["alpha"])
    return pipe, names, dev, precision
