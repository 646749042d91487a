"""Writing a store entry out as a file other tools load: ``ctrlora export``'s library half.

``official``: the layout of the published CtrLoRA checkpoints (``control_model.`` ldm names, as
``engine.formats.official`` reads and writes them), which the reference code and
ComfyUI-Advanced-ControlNet's CtrLoRA loader load; ``ours``: our adapter file, or a Base
ControlNet folder (config.json + safetensors), as the store keeps them. ``ctrlora pull`` reads
either back with the same weights, bit for bit (at the dtype they were written in).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ctrlora_cli.store.store import Manifest, Store
from engine.errors import UsageError

FORMATS = ("official", "ours")
BASE_WEIGHTS = "controlnet/diffusion_pytorch_model.safetensors"


def check_target(manifest: Manifest, out: Path, fmt: str, dtype: str | None, force: bool) -> None:
    """Every refusal before any work: the entry's kind, the format, the file's suffix, an existing
    output (unless ``force``)."""
    from engine.formats.tensors import DTYPES, PICKLE_SUFFIXES

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if manifest.kind == "sd":
        raise UsageError(f"{manifest.name!r} is a Stable Diffusion model: export writes bases and adapters (its "
                         f"diffusers-layout files are in the store's view, see: ctrlora show {manifest.name})")
    suffixes = (".safetensors", *PICKLE_SUFFIXES) if fmt == "official" else (".safetensors",)
    if fmt == "ours" and manifest.kind == "base":
        if out.suffix:
            raise UsageError(f"-o {out}: a base in our format is a folder (config.json + safetensors); "
                             f"give a folder name without a suffix")
    elif out.suffix not in suffixes:
        raise UsageError(f"-o {out}: the file name must end in {' or '.join(suffixes)} "
                         f"(safetensors, or a pickled .ckpt the official loaders also read)")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out} already exists; choose another -o, or pass --force to replace it")
    if force and out.is_dir() and not (fmt == "ours" and manifest.kind == "base"):
        raise UsageError(f"{out} is a folder; give a file name")


def export_entry(store: Store, name: str, out: str | Path, fmt: str = "official", dtype: str | None = "fp32",
                 force: bool = False) -> dict:
    """Write entry ``name`` to ``out``; returns what was written (``path``, ``kind``, ``format``,
    ``dtype``, ``arch``, ``rank``, ``condition``, ``tensors``, ``bytes``, ``notes``: what the
    official loaders make of it)."""
    from engine.formats.official import official_loader_notes

    out = Path(out).expanduser()
    manifest = store.get(name)
    check_target(manifest, out, fmt, dtype, force)
    if manifest.kind == "adapter":
        count = _adapter(store, manifest, out, fmt, dtype, force)
    else:
        count = _base(store, manifest, out, fmt, dtype, force)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
    notes = official_loader_notes(manifest.kind, manifest.arch or "?", manifest.rank, out.name) if fmt == "official" \
        else ["our format: ctrlora pull reads it; the official loaders need --format official"]
    return {"path": str(out), "name": name, "kind": manifest.kind, "format": fmt, "dtype": dtype or "as stored",
            "arch": manifest.arch, "rank": manifest.rank, "condition": manifest.condition, "tensors": count,
            "bytes": size, "notes": notes}


def _adapter(store: Store, manifest: Manifest, out: Path, fmt: str, dtype: str | None, force: bool) -> int:
    from engine.formats.adapter_file import load_adapter_file
    from engine.formats.tensors import save_tensor_file

    path = store.file(manifest.name, "adapter.safetensors")
    state, _ = load_adapter_file(path)
    if fmt == "ours":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()  # our adapter format's header, as it is
        save_tensor_file(out, state, dtype=dtype, metadata=header, replace=force)
        return len(state)
    from engine.formats.official import official_adapter_state

    official = official_adapter_state(state, _config(store, manifest), what=manifest.name)
    save_tensor_file(out, official, dtype=dtype, metadata=_header(manifest), replace=force)
    return len(official)


def _base(store: Store, manifest: Manifest, out: Path, fmt: str, dtype: str | None, force: bool) -> int:
    from engine.formats.tensors import load_tensor_file, save_tensor_file

    state = load_tensor_file(store.file(manifest.name, BASE_WEIGHTS))
    if fmt == "official":
        from engine.formats.official import official_base_state

        # The published base's embedded LoRA is rank 128; a tiny or custom base gets a small one.
        official = official_base_state(state, _config(store, manifest), 128 if manifest.arch == "sd15" else 4,
                                       what=manifest.name)
        save_tensor_file(out, official, dtype=dtype, metadata=_header(manifest), replace=force)
        return len(official)
    # Ours: a Base ControlNet folder, built beside its place and renamed in.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        shutil.copyfile(store.file(manifest.name, "controlnet/config.json"), tmp / "config.json")
        save_tensor_file(tmp / Path(BASE_WEIGHTS).name, state, dtype=dtype, metadata={"format": "pt"})
        os.chmod(tmp, 0o755)
        old = None
        if os.path.lexists(out):  # --force, checked before
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(state)


def _config(store: Store, manifest: Manifest) -> dict:
    """The Base ControlNet configuration the entry's shapes follow: the base's own, else (an
    adapter) its base's when in the store, else the preset of its architecture."""
    from engine.formats.detect import controlnet_config
    from engine.models.presets import PRESETS

    base = manifest.name if manifest.kind == "base" else (manifest.made_for or {}).get("name")
    if base and store.exists(base) and store.get(base).kind == "base" and store.get(base).arch == manifest.arch:
        return json.loads(store.file(base, "controlnet/config.json").read_text())
    if manifest.arch in PRESETS:
        return controlnet_config(manifest.arch)
    raise UsageError(f"{manifest.name!r} is a {manifest.arch} adapter and its base is not in the store: "
                     f"pull the base it was made for first")


def _header(manifest: Manifest) -> dict[str, str]:
    """Safetensors metadata: ``format: pt`` (what the official files' loaders expect, and not our
    adapter format, so ``ctrlora pull`` converts it as an official file) and where it came from."""
    facts = {"name": manifest.name, "kind": manifest.kind, "arch": manifest.arch, "rank": manifest.rank,
             "condition": manifest.condition, "weights": manifest.weights_digest}
    return {"format": "pt", "ctrlora_export": json.dumps({k: v for k, v in facts.items() if v}, sort_keys=True)}
