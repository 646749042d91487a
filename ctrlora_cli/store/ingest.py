"""What goes into the store and whether it may: a file or folder is detected (our adapter, an
official CtrLoRA base or adapter, a single-file SD1.5 checkpoint, a diffusers-layout SD, a Base
ControlNet folder), converted to safetensors where needed and stored; an entry that already holds
the same thing is kept, and one holding something else is replaced only with ``force``.

Where the bytes come from (catalog, hub, local path) is ``ctrlora_cli.store.pull``'s business.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from ctrlora_cli.store import sources
from ctrlora_cli.store.events import Listener, tell
from ctrlora_cli.store.sd_layout import entry_files, select_sd_files, unet_arch, used_variant
from ctrlora_cli.store.store import Manifest, Store, files_in
from engine.errors import CheckpointError, UsageError


class Importer:
    """``tokenizer(tmp)`` gives a folder with SD1.5's CLIP tokenizer, which a single-file SD1.5
    checkpoint lacks (the puller fetches it when the store has none)."""

    def __init__(self, store: Store, force: bool, on_event: Listener | None, tokenizer: Callable[[Path], Path]):
        self.store, self.force, self.on_event, self.tokenizer = store, force, on_event, tokenizer

    def say(self, text: str, level: str = "result") -> None:
        tell(self.on_event, text, level)

    # -- may it go in? ----------------------------------------------------------------------------
    def present(self, name: str) -> bool:
        return self.store.exists(name) and self.store.intact(self.store.get(name))

    def check_name(self, name: str, same_origin) -> Manifest | None:
        """Before any work: a name that holds something from another origin is refused unless
        --force (``Store.claim``); returns the entry it holds, if any."""
        if not self.store.exists(name):
            return None
        manifest = self.store.get(name)
        if not self.force and not same_origin(manifest):
            self.store.claim(name, self.force)
        return manifest

    def up_to_date(self, name: str, same, same_origin, base: str | None = None) -> bool:
        """True when ``name`` already holds this (checked against ``base`` when given); False when
        it is free, or holds an older revision or a damaged copy of the same origin (replaced), or
        with --force. Anything else is refused (``Store.claim``)."""
        manifest = self.check_name(name, same_origin)
        if manifest is None or self.force:
            return False
        if same(manifest) and self.store.intact(manifest):
            if base:
                self.fit_base(manifest, base)
            self.say(f"{name} is up to date ({sources.short(manifest.source)})")
            return True
        return False  # a newer revision of the same thing, or a damaged copy: replace it

    def base_target(self, base: str | None):
        """For an adapter pulled with --base: ([(arch, controlnet config)] to check it against,
        the record of the base it was made for {"base", "base_digest"}); (None, {}) without."""
        if not base:
            return None, {}
        manifest = self.store.get(base)
        if manifest.kind != "base":
            raise UsageError(f"--base {base!r} is a {manifest.kind}, not a base")
        config = json.loads(self.store.file(base, "controlnet/config.json").read_text())
        return [(manifest.arch, config)], {"base": base, "base_digest": manifest.weights_digest}

    def fit_base(self, manifest: Manifest, base: str) -> None:
        """An adapter already in the store, checked against --base like a new one (architecture
        and shapes), and recorded as made for it."""
        from engine.formats.adapter_file import load_adapter_file
        from engine.formats.official import check_adapter_state

        if manifest.kind != "adapter":
            raise UsageError(f"--base is for adapters; {manifest.name!r} is a {manifest.kind}")
        configs, record = self.base_target(base)
        arch, config = configs[0]
        if manifest.arch != arch:
            raise UsageError(f"{manifest.name!r} was made for a {manifest.arch} base, not {arch} ({base!r})")
        state, _ = load_adapter_file(self.store.file(manifest.name, "adapter.safetensors"))
        check_adapter_state(state, config, what=manifest.name)
        if {k: manifest.extra.get(k) for k in record} != record:
            manifest.extra.update(record)
            with self.store.lock():
                self.store.write_manifest(manifest)
            self.say(f"{manifest.name}: recorded as made for base {base!r}")

    def pairing(self, sd: str | None, arch: str) -> str | None:
        """The SD entry a new base pairs with: --sd, else the only stored SD of its architecture."""
        if sd:
            manifest = self.store.get(sd)
            if manifest.kind != "sd":
                raise UsageError(f"--sd {sd!r} is a {manifest.kind}, not a Stable Diffusion model")
            if manifest.arch and manifest.arch != arch:
                raise UsageError(f"--sd {sd!r} is {manifest.arch}, but the base is {arch}")
            return sd
        if arch == "sd15" and self.present("sd15"):
            return "sd15"
        fits = [m.name for m in self.store.list() if m.kind == "sd" and m.arch == arch]
        return fits[0] if len(fits) == 1 else None

    # -- in it goes -----------------------------------------------------------------------------
    def commit(self, name: str, kind: str, files: dict, **meta) -> Manifest:
        """Into the store (an entry of that name replaced, its unused blobs collected)."""
        return self.store.add(name, kind, files, replace=self.force, **meta)

    def commit_sd(self, name: str, chosen: dict[str, str], paths: dict[str, Path], digests: dict[str, str] | None,
                  source: dict) -> str:
        """A diffusers-layout SD from the files ``select_sd_files`` chose; returns its architecture."""
        with self.store.new_scratch() as tmp:
            files = entry_files(chosen, paths, digests, Path(tmp))
            source["variant"] = used_variant(chosen)
            arch = unet_arch(files)
            self.commit(name, "sd", files, arch=arch, source=source, notes="Stable Diffusion (diffusers layout)")
        return arch

    def folder(self, path: Path, name: str, *, kind, sd) -> None:
        """A local folder: an SD in diffusers layout, or a Base ControlNet (``controlnet/`` or the
        folder itself holding config.json and the safetensors weights)."""
        listing = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        source = {"type": "local", "path": str(path.resolve())}
        origin_same = lambda m: m.source.get("path") == source["path"]
        if (path / "unet" / "config.json").is_file() or (path / "model_index.json").is_file():
            if kind not in (None, "sd"):
                raise UsageError(f"{path}: a Stable Diffusion folder, not a {kind}")
            if self.up_to_date(name, lambda m: False, origin_same):
                return
            chosen = select_sd_files(listing, "fp16", where=str(path))
            arch = self.commit_sd(name, chosen, {d: path / s for d, s in chosen.items()}, None, source)
            self.say(f"imported {name} (sd, {arch}) from {path}")
            return
        folder = path / "controlnet" if (path / "controlnet" / "config.json").is_file() else path
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("_class_name") != "BaseControlNetModel" or not (folder / "diffusion_pytorch_model.safetensors").is_file():
            raise UsageError(f"{path}: not a Stable Diffusion folder (diffusers layout) nor a Base ControlNet folder "
                             f"(config.json + diffusion_pytorch_model.safetensors)")
        if kind not in (None, "base"):
            raise UsageError(f"{path}: a Base ControlNet folder, not a {kind}")
        if self.up_to_date(name, lambda m: False, origin_same):
            return
        from engine.models.arch import arch_id

        arch = arch_id(config)
        files = {"controlnet/config.json": config_file,
                 "controlnet/diffusion_pytorch_model.safetensors": folder / "diffusion_pytorch_model.safetensors"}
        pair = self.pairing(sd, arch)
        self.commit(name, "base", files, arch=arch, sd=pair, source=source)
        self.say(f"imported {name} (base, {arch}{', sd ' + pair if pair else ''}) from {path}")

    def file(self, path: Path, digest: str, name: str, source: dict, *, kind=None, sd=None, base=None,
             made_for: dict | None = None, archs=None, condition=None) -> None:
        """Detect what a file holds (our adapter, an official base or adapter, a single-file SD),
        convert it and store it. ``base`` (a stored base, --base) or ``archs`` (presets) limit the
        architectures tried; by default every preset is. An adapter records the base it was made
        for: ``base``, else ``made_for`` ({"base", "base_digest"}, from the catalog)."""
        from engine.formats.adapter_file import FORMAT, read_adapter_metadata
        from engine.formats.detect import classify, controlnet_config, preset_configs
        from engine.formats.tensors import load_tensor_file

        configs, record = self.base_target(base)
        record = {k: v for k, v in (record or made_for or {}).items() if v}

        label = source.get("path") if source.get("type") == "local" else f"{source['repo']}/{source['path']}"
        original = {"file": Path(source["path"]).name, "sha256": digest.split(":", 1)[1], "size": path.stat().st_size}
        if _header(path).get("format") == FORMAT:
            meta = read_adapter_metadata(path)
            expected = configs[0][0] if configs else (archs[0] if archs else None)
            self._own_adapter(path, meta, name, source, kind, expected, configs[0][1] if configs else None,
                              condition, label, record)
            return
        state = load_tensor_file(path)
        found = classify(state)
        found_kind = {"official-base": "base", "official-adapter": "adapter", "ldm-sd": "sd"}.get(found)
        if found_kind is None:
            first = ", ".join(list(state)[:3])
            raise CheckpointError(f"{label}: not an official CtrLoRA base or adapter, a ctrlora adapter, nor a "
                                  f"single-file SD1.5 checkpoint (first keys: {first})")
        if kind and kind != found_kind:
            raise UsageError(f"{label} holds a {found_kind}, not a {kind}")
        configs = configs or ([(a, controlnet_config(a)) for a in archs] if archs else preset_configs())
        with self.store.new_scratch() as tmp:
            tmp = Path(tmp)
            if found_kind == "base":
                from engine.formats.detect import import_official_base

                arch, _, embedded = import_official_base(state, tmp / "controlnet", configs, what=label)
                del state
                pair = self.pairing(sd, arch)
                files = {f"controlnet/{p.name}": p for p in (tmp / "controlnet").iterdir()}
                self.commit(name, "base", files, arch=arch, sd=pair, source=source,
                            converted_from=dict(original, format="official", embedded_adapter_rank=embedded),
                            notes="Base ControlNet converted from the official checkpoint")
                self.say(f"pulled {name} (base, {arch}{', sd ' + pair if pair else ''}) from {sources.short(source)}")
                if not pair:
                    self.say("next: pair it with a Stable Diffusion model: pass --sd NAME to gen/fit, or pull it "
                             "again with --sd NAME --force")
            elif found_kind == "adapter":
                from engine.formats.adapter_file import save_adapter_file
                from engine.formats.detect import import_official_adapter

                arch, _, mapped, rank = import_official_adapter(state, configs, what=label)
                cond = (condition or _exported(path).get("condition") or _condition_from(Path(source["path"]).stem)
                        or name)
                target = tmp / "adapter.safetensors"
                save_adapter_file(target, mapped, rank=rank, alpha=rank, base_arch=arch, condition=cond,
                                  provenance={"converted_from": original, "source": source})
                del state, mapped
                self.commit(name, "adapter", {"adapter.safetensors": target}, arch=arch, condition=cond, rank=rank,
                            source=source, converted_from=dict(original, format="official"),
                            extra={"alpha": rank, **record})
                self.say(f"pulled {name} (adapter {cond}, rank {rank}, {_for(arch, record)}) from "
                         f"{sources.short(source)}")
            else:
                from engine.formats.detect import import_ldm_sd

                tokenizer = self.tokenizer(tmp) if _unet_width(state) == 320 else None
                arch = import_ldm_sd(state, tmp / "sd", tokenizer_dir=tokenizer, what=label)
                del state
                self.commit(name, "sd", files_in(tmp / "sd"), arch=arch, source=source,
                            converted_from=dict(original, format="ldm-single-file"),
                            notes="Stable Diffusion converted from a single-file checkpoint")
                self.say(f"pulled {name} (sd, {arch}) from {sources.short(source)}")

    def _own_adapter(self, path, meta, name, source, kind, expected_arch, config, condition, label, record) -> None:
        from engine.formats.adapter_file import load_adapter_file, save_adapter_file
        from engine.formats.detect import controlnet_config
        from engine.formats.official import check_adapter_state
        from engine.models.presets import PRESETS

        if kind and kind != "adapter":
            raise UsageError(f"{label} holds a ctrlora adapter, not a {kind}")
        arch = meta["base_arch"]
        if expected_arch and expected_arch != arch:
            raise UsageError(f"{label} was made for a {arch} base, not {expected_arch}")
        state, _ = load_adapter_file(path)
        if config is None and arch in PRESETS:
            config = controlnet_config(arch)
        if config is not None:
            check_adapter_state(state, config, what=label)
        with self.store.new_scratch() as tmp:
            target = path
            cond = condition or meta["condition"]
            if cond != meta["condition"]:  # keep file and manifest in agreement
                target = Path(tmp) / "adapter.safetensors"
                save_adapter_file(target, state, rank=meta["rank"], alpha=meta["alpha"], base_arch=arch,
                                  condition=cond, provenance=meta["provenance"])
            self.commit(name, "adapter", {"adapter.safetensors": target}, arch=arch, condition=cond,
                        rank=meta["rank"], source=source, extra={"alpha": meta["alpha"], **record})
        self.say(f"imported {name} (adapter {cond}, rank {meta['rank']}, {_for(arch, record)}) from "
                 f"{sources.short(source)}")


def _for(arch: str, record: dict) -> str:
    """What an adapter was made for, in a pull's one-line result."""
    return f"for {arch} bases" + (f", made for {record['base']}" if record.get("base") else "")


def _unet_width(state) -> int | None:
    weight = state.get("model.diffusion_model.input_blocks.0.0.weight")
    return int(weight.shape[0]) if weight is not None else None


def _header(path: Path) -> dict[str, str]:
    """A safetensors file's header metadata (empty for other files, or one not readable here:
    ``load_tensor_file`` then gives the one-line reason)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def _exported(path: Path) -> dict:
    """What ``ctrlora export`` recorded in an official-layout file (empty otherwise)."""
    try:
        found = json.loads(_header(path).get("ctrlora_export") or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _condition_from(stem: str) -> str | None:
    """The condition in an official adapter's file name (``..._basecn700k_<cond>[_rank128][_Nimgs_Ssteps]``)."""
    m = re.search(r"basecn\d+k_(.+?)(?:_rank\d+)?(?:_\d+imgs_\d+steps)?$", stem)
    return m.group(1) if m else None
