"""``ctrlora pull``: fetch or import models into the local store.

Sources: ``tiny`` (random, offline), a catalog name (``base``, ``canny``, ``sd15``, ...),
``hf://owner/repo/path/in/repo``, ``sd:owner/repo`` (a Stable Diffusion model in diffusers
layout), or a local ``.ckpt`` / ``.safetensors`` file or folder. Official CtrLoRA files are
converted on the way in; the store keeps only safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.markup import escape

from ctrlora_cli.byte_progress import ByteBars
from ctrlora_cli.console import ask, say, warn
from ctrlora_cli.store.store import Manifest, Staged, Store, validate_name
from engine.files import sha256_file
from engine.errors import CheckpointError, CtrloraError, UsageError

KINDS = ("base", "adapter", "sd")
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_PICKLED = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "pytorch_model"}
_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)


def pull(
    source: str | None = typer.Argument(None, show_default=False, help="'base', an adapter ('canny', ...), 'sd15', 'demo' (offline), 'tiny' (random, offline), "
                                           "hf://owner/repo/path, sd:owner/repo, or a local file or folder."),
    name: str | None = typer.Option(None, "--name", help="Store name (default: from the source)."),
    revision: str | None = typer.Option(None, "--revision", help="Hub branch, tag or commit to pin."),
    kind: str | None = typer.Option(None, "--kind", help="Expect this kind: base, adapter or sd (default: detected)."),
    sd: str | None = typer.Option(None, "--sd", help="For a base: the SD model (store name) it pairs with."),
    base: str | None = typer.Option(None, "--base", help="For an adapter: the base (store name) it was made for."),
    condition: str | None = typer.Option(None, "--condition", help="For an adapter: the condition's name."),
    force: bool = typer.Option(False, "--force", help="Fetch again and replace an existing entry of that name."),
) -> None:
    """Fetch or import a model into the local store.

    Examples: ctrlora pull base | ctrlora pull canny | ctrlora pull hf://owner/repo/file.ckpt --name x |
    ctrlora pull ./model.safetensors --kind sd --name y
    """
    if source is None:
        source = ask("What to pull (base, canny, ..., demo, tiny, hf://..., a file)",
                     "what to pull? e.g. ctrlora pull base (see: ctrlora list --catalog)")
    if name is not None:
        validate_name(name)
    if kind is not None and kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if sd is not None:
        validate_name(sd)
    store = Store()
    options = dict(kind=kind, sd=sd, base=base, condition=condition)
    if source == "tiny":
        _pull_random(store, "tiny", name or "tiny", replace=force)
        return
    if source == "demo":
        from ctrlora_cli.demo import pull_demo

        made = pull_demo(store, name or "demo", replace=force)
        say(f"pulled {made['base']} (base, the demo model), {made['sd']} (sd) and adapters "
            f"{', '.join(made['adapters'])}; offline, from the package")
        return
    try:
        with ByteBars() as ui:
            _pull(_Puller(store, ui, force), source, name, revision, options)
    except KeyboardInterrupt:
        warn("interrupted: the same pull continues from the bytes already downloaded")
        raise


def _pull(puller: "_Puller", source: str, name, revision, options: dict) -> None:
    if source.startswith("hf://"):
        puller.hub_file(source[len("hf://"):], name, revision, **options)
    elif source.startswith("sd:"):
        if options["kind"] not in (None, "sd"):
            raise UsageError("sd:owner/repo pulls a Stable Diffusion model; drop --kind or use --kind sd")
        puller.sd_repo(source[len("sd:"):], name, revision, variant="fp16")
    elif _looks_local(source):
        if revision:
            raise UsageError("--revision applies to hub sources, not to local files")
        puller.local(Path(source).expanduser(), name, **options)
    else:
        puller.catalog_name(source, name, revision, **options)


def _looks_local(source: str) -> bool:
    return (os.path.exists(source) or source.startswith((".", "/", "~")) or os.sep in source
            or source.lower().endswith(_FILE_SUFFIXES))


# --- the pulls ---------------------------------------------------------------------------------

class _Puller:
    def __init__(self, store: Store, ui: ByteBars, force: bool):
        self.store, self.ui, self.force = store, ui, force
        self._catalog = None

    @property
    def catalog(self):
        if self._catalog is None:
            from ctrlora_cli.store import catalog

            self._catalog = catalog.load()
        return self._catalog

    # -- sources --------------------------------------------------------------------------------
    def catalog_name(self, source: str, name, revision, *, kind, sd, base, condition) -> None:
        entry = self.catalog.get(source)
        if entry is None:
            validate_name(source)
            raise UsageError(f"unknown model {source!r}: see the names pull knows with: ctrlora list --catalog "
                             f"(or pull hf://owner/repo/path, sd:owner/repo, or a local file)")
        if kind and kind != entry.kind:
            raise UsageError(f"{source!r} is a {entry.kind}, not a {kind}")
        name = name or entry.name
        if self._offline_present(name):
            return
        origin = {"catalog": entry.name}
        if entry.kind == "sd":
            self.sd_repo(entry.repo, name, revision or entry.revision, variant=entry.variant, origin=origin)
            return
        snapshot = self._resolve(entry.repo, revision or entry.revision)
        remote = self._pick(snapshot, entry)
        if entry.kind == "base":
            pair = sd or entry.sd
            if pair and not sd and pair in self.catalog and not self._present(pair):
                self.catalog_name(pair, None, None, kind="sd", sd=None, base=None, condition=None)
            self._hub_import(remote, snapshot, name, kind="base", sd=pair, archs=[entry.arch] if entry.arch else None,
                             origin=origin)
        else:
            base_entry = self.catalog.get(entry.base) if entry.base else None
            arch = base_entry.arch if base_entry else None
            self._hub_import(remote, snapshot, name, kind="adapter", condition=condition or entry.condition,
                             configs=self._base_configs(base), archs=[arch] if arch else None, origin=origin)
            wanted = base or (base_entry.name if base_entry else None)
            if wanted and not self._present(wanted):
                say(f"next: ctrlora pull {wanted}  (the base this adapter was made for)")

    def hub_file(self, spec: str, name, revision, *, kind, sd, base, condition) -> None:
        parts = spec.split("/", 2)
        if len(parts) < 3 or not all(parts):
            raise UsageError(f"hf://{spec}: expected hf://owner/repo/path/to/file")
        if name and self._offline_present(name):
            return
        snapshot = self._resolve(f"{parts[0]}/{parts[1]}", revision)
        in_repo = [p for p in snapshot.files if p == parts[2] or p.startswith(parts[2].rstrip("/") + "/")]
        if parts[2] not in snapshot.files and in_repo:
            # a folder of the repository: a diffusers-layout SD or a Base ControlNet folder
            self._hub_folder(snapshot, parts[2].rstrip("/"), name, kind=kind, sd=sd)
            return
        remote = snapshot.file(parts[2])
        self._hub_import(remote, snapshot, name or _name_from(Path(parts[2]).stem), kind=kind, sd=sd,
                         configs=self._base_configs(base), condition=condition)

    def sd_repo(self, repo: str, name, revision, variant: str | None = None, origin: dict | None = None) -> None:
        name = name or _name_from(repo.split("/")[-1])
        if self._offline_present(name):
            return
        self._hub_sd(self._resolve(repo, revision), "", name, variant, origin or {})

    def local(self, path: Path, name, *, kind, sd, base, condition) -> None:
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")
        name = name or _name_from(path.stem if path.is_file() else path.resolve().name)
        if path.is_dir():
            with self._entry_lock(name):
                self._local_folder(path, name, kind=kind, sd=sd)
            return
        digest = sha256_file(path)
        source = {"type": "local", "path": str(path.resolve()), "sha256": digest.split(":", 1)[1]}
        same = lambda m: m.source.get("type") == "local" and m.source.get("sha256") == source["sha256"]
        with self._entry_lock(name):
            if self._up_to_date(name, same, same_origin=lambda m: m.source.get("path") == source["path"]):
                return
            self._import_file(path, digest, name, source, kind=kind, sd=sd, configs=self._base_configs(base),
                              condition=condition)

    # -- hub plumbing ---------------------------------------------------------------------------
    def _resolve(self, repo: str, revision: str | None):
        from ctrlora_cli.store import hub

        return hub.resolve(repo, revision)

    def _pick(self, snapshot, entry):
        if entry.file:
            return snapshot.file(entry.file)
        found = snapshot.match(entry.pattern)
        if not found and snapshot.cached:
            from ctrlora_cli.store import hub

            raise CtrloraError(f"offline: no file of {entry.repo} matching {' or '.join(entry.pattern)} is in the "
                               f"Hugging Face cache ({hub.cache_dir()}); unset CTRLORA_OFFLINE/HF_HUB_OFFLINE to "
                               f"download it")
        if not found:
            raise UsageError(f"{entry.name}: no file in {entry.repo}@{snapshot.revision} matches "
                             f"{' or '.join(entry.pattern)}; it may have been renamed or removed (pull a file "
                             f"directly with hf://{entry.repo}/PATH --name {entry.name})")
        if len(found) > 1:
            warn(escape(f"{entry.name}: several files match; using {found[0].path} (others: "
                 f"{', '.join(f.path for f in found[1:4])})"))
        return found[0]

    def _fetch(self, remote):
        from ctrlora_cli.store import hub

        return hub.fetch(self.store, remote, callback=self.ui.progress, force=self.force, log=self.ui.log)

    def _hub_source(self, snapshot, origin: dict | None = None, **more) -> dict:
        from ctrlora_cli.store import hub

        source = {"type": "hub", "repo": snapshot.repo, "revision": snapshot.revision, "commit": snapshot.commit}
        if hub.endpoint() != "https://huggingface.co":
            source["endpoint"] = hub.endpoint()
        source.update(more)
        source.update(origin or {})
        return source

    def _hub_import(self, remote, snapshot, name, *, kind=None, sd=None, configs=None, archs=None, condition=None,
                    origin=None) -> None:
        validate_name(name)
        source = self._hub_source(snapshot, origin, path=remote.path)
        same = (lambda m: m.source.get("repo") == remote.repo and m.source.get("path") == remote.path
                and m.source.get("commit") == remote.commit)
        origin_same = lambda m: m.source.get("repo") == remote.repo and m.source.get("path") == remote.path
        with self._entry_lock(name):
            if self._up_to_date(name, same, origin_same):
                return
            fetched = self._fetch(remote)
            with _scratch(self.store) as tmp:
                named = _linked(fetched.path, Path(tmp) / Path(remote.path).name)  # loaders go by the suffix
                self._import_file(named, fetched.digest, name, source, kind=kind, sd=sd, configs=configs,
                                  archs=archs, condition=condition)
            if fetched.owned:
                fetched.path.unlink(missing_ok=True)  # the original was converted; the store keeps ours

    def _hub_folder(self, snapshot, folder: str, name, *, kind, sd) -> None:
        files = {p[len(folder) + 1:] for p in snapshot.files if p.startswith(folder + "/")}
        name = name or _name_from(folder.split("/")[-1])
        if kind in (None, "sd") and ("unet/config.json" in files or "model_index.json" in files):
            self._hub_sd(snapshot, folder + "/", name, "fp16", {})
        else:
            raise UsageError(f"hf://{snapshot.repo}/{folder}: a folder is imported only as a Stable Diffusion model "
                             f"in diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")

    def _hub_sd(self, snapshot, prefix: str, name: str, variant: str | None, origin: dict) -> None:
        validate_name(name)
        source = self._hub_source(snapshot, origin, **({"path": prefix.rstrip("/")} if prefix else {}))
        same = (lambda m: m.kind == "sd" and m.source.get("repo") == snapshot.repo
                and m.source.get("commit") == snapshot.commit and m.source.get("path") == source.get("path"))
        origin_same = lambda m: m.source.get("repo") == snapshot.repo and m.source.get("path") == source.get("path")
        with self._entry_lock(name):
            if self._up_to_date(name, same, origin_same):
                return
            self._hub_sd_files(snapshot, prefix, name, variant, source)

    def _hub_sd_files(self, snapshot, prefix: str, name: str, variant: str | None, source: dict) -> None:
        listing = [p[len(prefix):] for p in snapshot.files if p.startswith(prefix)]
        chosen = select_sd_files(listing, variant, where=f"{snapshot.repo}/{prefix}")
        fetched = {}
        try:
            for dest, src in chosen.items():
                fetched[dest] = self._fetch(snapshot.files[prefix + src])
            with _scratch(self.store) as tmp:
                files = self._sd_files(chosen, {d: f.path for d, f in fetched.items()},
                                       {d: f.digest for d, f in fetched.items()}, Path(tmp))
                source["variant"] = _used_variant(chosen)
                arch = _arch_of_unet(files["unet/config.json"])
                self._commit(name, "sd", files, arch=arch, source=source,
                             notes="Stable Diffusion (diffusers layout)")
        finally:
            for f in fetched.values():
                if f.owned:
                    f.path.unlink(missing_ok=True)
        say(f"pulled {name} (sd, {arch}) from {_short(source)}")

    def _sd_files(self, chosen: dict[str, str], paths: dict[str, Path], digests: dict[str, str] | None,
                  tmp: Path) -> dict:
        """Entry files for a chosen SD layout: pickled weights rewritten as safetensors, the rest as is."""
        files = {}
        for dest, src in chosen.items():
            if src.endswith(".bin"):
                from engine.formats.detect import bin_to_safetensors

                out_path = tmp / dest
                out_path.parent.mkdir(parents=True, exist_ok=True)
                bin_to_safetensors(paths[dest], out_path)
                files[dest] = out_path
            elif digests is not None:
                files[dest] = Staged(paths[dest], digests[dest])
            else:
                files[dest] = paths[dest]
        return files

    # -- local plumbing -------------------------------------------------------------------------
    def _local_folder(self, path: Path, name: str, *, kind, sd) -> None:
        listing = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        source = {"type": "local", "path": str(path.resolve())}
        origin_same = lambda m: m.source.get("path") == source["path"]
        if (path / "unet" / "config.json").is_file() or (path / "model_index.json").is_file():
            if kind not in (None, "sd"):
                raise UsageError(f"{path}: a Stable Diffusion folder, not a {kind}")
            if self._up_to_date(name, lambda m: False, origin_same):
                return
            chosen = select_sd_files(listing, "fp16", where=str(path))
            with _scratch(self.store) as tmp:
                files = self._sd_files(chosen, {d: path / s for d, s in chosen.items()}, None, Path(tmp))
                source["variant"] = _used_variant(chosen)
                arch = _arch_of_unet(files["unet/config.json"])
                self._commit(name, "sd", files, arch=arch, source=source, notes="Stable Diffusion (diffusers layout)")
            say(f"imported {name} (sd, {arch}) from {path}")
            return
        folder = path / "controlnet" if (path / "controlnet" / "config.json").is_file() else path
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("_class_name") != "BaseControlNetModel" or not (folder / "diffusion_pytorch_model.safetensors").is_file():
            raise UsageError(f"{path}: not a Stable Diffusion folder (diffusers layout) nor a Base ControlNet folder "
                             f"(config.json + diffusion_pytorch_model.safetensors)")
        if kind not in (None, "base"):
            raise UsageError(f"{path}: a Base ControlNet folder, not a {kind}")
        if self._up_to_date(name, lambda m: False, origin_same):
            return
        from engine.models.arch import arch_id

        arch = arch_id(config)
        files = {"controlnet/config.json": config_file,
                 "controlnet/diffusion_pytorch_model.safetensors": folder / "diffusion_pytorch_model.safetensors"}
        pair = self._pairing(sd, arch)
        self._commit(name, "base", files, arch=arch, sd=pair, source=source)
        say(f"imported {name} (base, {arch}{', sd ' + pair if pair else ''}) from {path}")

    # -- one file: detect, convert, store -------------------------------------------------------
    def _import_file(self, path: Path, digest: str, name: str, source: dict, *, kind=None, sd=None, configs=None,
                     archs=None, condition=None) -> None:
        """Detect what a file holds (our adapter, an official base or adapter, a single-file SD),
        convert it and store it. ``configs`` ([(arch, controlnet config)]) or ``archs`` (presets)
        limit the architectures tried; by default every preset is."""
        from engine.formats.adapter_file import FORMAT, read_adapter_metadata
        from engine.formats.tensors import load_tensor_file
        from engine.formats.detect import classify, controlnet_config, preset_configs

        label = source.get("path") if source.get("type") == "local" else f"{source['repo']}/{source['path']}"
        original = {"file": Path(source["path"]).name, "sha256": digest.split(":", 1)[1], "size": path.stat().st_size}
        if path.suffix == ".safetensors" and _safetensors_format(path) == FORMAT:
            meta = read_adapter_metadata(path)
            expected = configs[0][0] if configs else (archs[0] if archs else None)
            self._own_adapter(path, meta, name, source, kind, expected, configs[0][1] if configs else None,
                              condition, label)
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
        with _scratch(self.store) as tmp:
            tmp = Path(tmp)
            if found_kind == "base":
                from engine.formats.detect import import_official_base

                arch, _, embedded = import_official_base(state, tmp / "controlnet", configs, what=label)
                del state
                pair = self._pairing(sd, arch)
                files = {f"controlnet/{p.name}": p for p in (tmp / "controlnet").iterdir()}
                self._commit(name, "base", files, arch=arch, sd=pair, source=source,
                             converted_from=dict(original, format="official", embedded_adapter_rank=embedded),
                             notes="Base ControlNet converted from the official checkpoint")
                say(f"pulled {name} (base, {arch}{', sd ' + pair if pair else ''}) from {_short(source)}")
                if not pair:
                    say("next: pair it with a Stable Diffusion model: pass --sd NAME to gen/fit, or pull it "
                              "again with --sd NAME --force")
            elif found_kind == "adapter":
                from engine.formats.adapter_file import save_adapter_file
                from engine.formats.detect import import_official_adapter

                arch, _, mapped, rank = import_official_adapter(state, configs, what=label)
                cond = condition or _condition_from(Path(source["path"]).stem) or name
                target = tmp / "adapter.safetensors"
                save_adapter_file(target, mapped, rank=rank, alpha=rank, base_arch=arch, condition=cond,
                                  provenance={"converted_from": original, "source": source})
                del state, mapped
                self._commit(name, "adapter", {"adapter.safetensors": target}, arch=arch, condition=cond, rank=rank,
                             source=source, converted_from=dict(original, format="official"),
                             extra={"alpha": rank})
                say(f"pulled {name} (adapter {cond}, rank {rank}, for {arch} bases) from {_short(source)}")
            else:
                from engine.formats.detect import import_ldm_sd

                tokenizer = self._sd15_tokenizer(tmp) if _unet_width(state) == 320 else None
                arch = import_ldm_sd(state, tmp / "sd", tokenizer_dir=tokenizer, what=label)
                del state
                self._commit_folder(name, "sd", tmp / "sd", arch=arch, source=source,
                                    converted_from=dict(original, format="ldm-single-file"),
                                    notes="Stable Diffusion converted from a single-file checkpoint")
                say(f"pulled {name} (sd, {arch}) from {_short(source)}")

    def _own_adapter(self, path, meta, name, source, kind, expected_arch, config, condition, label) -> None:
        from engine.formats.adapter_file import load_adapter_file, save_adapter_file
        from engine.formats.official import check_adapter_state
        from engine.formats.detect import controlnet_config
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
        with _scratch(self.store) as tmp:
            target = path
            cond = condition or meta["condition"]
            if cond != meta["condition"]:  # keep file and manifest in agreement
                target = Path(tmp) / "adapter.safetensors"
                save_adapter_file(target, state, rank=meta["rank"], alpha=meta["alpha"], base_arch=arch,
                                  condition=cond, provenance=meta["provenance"])
            self._commit(name, "adapter", {"adapter.safetensors": target}, arch=arch, condition=cond,
                         rank=meta["rank"], source=source, extra={"alpha": meta["alpha"]})
        say(f"imported {name} (adapter {cond}, rank {meta['rank']}, for {arch} bases) from {_short(source)}")

    def _sd15_tokenizer(self, tmp: Path) -> Path:
        """SD1.5's CLIP tokenizer: from the store's sd15 entry, else its repository's tokenizer/ folder."""
        for manifest in self.store.list():
            if manifest.kind == "sd" and manifest.arch == "sd15" and self.store.intact(manifest):
                folder = self.store.folder(manifest.name) / "tokenizer"
                if folder.is_dir():
                    return folder
        entry = self.catalog.get("sd15")
        snapshot = self._resolve(entry.repo, entry.revision)
        folder = tmp / "tokenizer"
        folder.mkdir()
        for remote in snapshot.match("tokenizer/*"):
            fetched = self._fetch(remote)
            shutil.copyfile(fetched.path, folder / Path(remote.path).name)
            if fetched.owned:
                fetched.path.unlink(missing_ok=True)
        return folder

    # -- store plumbing -------------------------------------------------------------------------
    def _base_configs(self, base: str | None):
        """[(arch, controlnet config)] of a stored base named by --base."""
        if not base:
            return None
        manifest = self.store.get(base)
        if manifest.kind != "base":
            raise UsageError(f"--base {base!r} is a {manifest.kind}, not a base")
        config = json.loads(self.store.file(base, "controlnet/config.json").read_text())
        return [(manifest.arch, config)]

    def _pairing(self, sd: str | None, arch: str) -> str | None:
        """The SD entry a new base pairs with: --sd, else the only stored SD of its architecture."""
        if sd:
            manifest = self.store.get(sd)
            if manifest.kind != "sd":
                raise UsageError(f"--sd {sd!r} is a {manifest.kind}, not a Stable Diffusion model")
            if manifest.arch and manifest.arch != arch:
                raise UsageError(f"--sd {sd!r} is {manifest.arch}, but the base is {arch}")
            return sd
        if arch == "sd15" and self._present("sd15"):
            return "sd15"
        fits = [m.name for m in self.store.list() if m.kind == "sd" and m.arch == arch]
        return fits[0] if len(fits) == 1 else None

    def _offline_present(self, name: str) -> bool:
        """Offline, an entry already in the store is used as it is (updates cannot be checked)."""
        from ctrlora_cli.store import hub

        if hub.offline() and not self.force and self._present(name):
            say(f"{name} is in the store (offline: not checked for updates)")
            return True
        return False

    @contextmanager
    def _entry_lock(self, name: str):
        """One pull per entry name at a time: a second pull of the same thing waits, then finds it
        up to date."""
        with self.store.lock(f"pull-{name}"):
            yield

    def _present(self, name: str) -> bool:
        return self.store.exists(name) and self.store.intact(self.store.get(name))

    def _up_to_date(self, name: str, same, same_origin) -> bool:
        """True when ``name`` already holds this; refuses to overwrite something else without --force."""
        if not self.store.exists(name) or self.force:
            return False
        manifest = self.store.get(name)
        if same(manifest) and self.store.intact(manifest):
            say(f"{name} is up to date ({_short(manifest.source)})")
            return True
        if same_origin(manifest) or not self.store.intact(manifest):
            return False  # a newer revision of the same thing, or a damaged entry: replace it
        raise UsageError(f"{name!r} already holds {manifest.kind} from {_short(manifest.source)}; choose another "
                         f"--name, or replace it with --force")

    def _commit(self, name: str, kind: str, files: dict, **meta) -> Manifest:
        replaced = self.store.exists(name)
        manifest = self.store.add(name, kind, files, replace=self.force, **meta)
        if replaced:
            with self.store.lock():
                self.store.gc()  # blobs only the old version used
        return manifest

    def _commit_folder(self, name: str, kind: str, folder: Path, **meta) -> Manifest:
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return self._commit(name, kind, files, **meta)


# --- helpers -------------------------------------------------------------------------------------

def select_sd_files(paths, variant: str | None, where: str) -> dict[str, str]:
    """{path in the entry: path in the source} for a diffusers-layout SD: each part's configs and
    tokenizer files, and one set of weights (the ``variant`` where published, saved under the
    plain name so loaders need no variant; pickled ``.bin`` only when no safetensors exist)."""
    paths = set(paths)
    chosen = {"model_index.json": "model_index.json"} if "model_index.json" in paths else {}
    for part in SD_PARTS:
        inside = sorted(p for p in paths if p.startswith(part + "/") and "/" not in p[len(part) + 1:])
        if not inside:
            raise UsageError(f"{where}: no {part}/ folder: not a Stable Diffusion model in diffusers layout")
        for p in inside:
            if p.endswith((".json", ".txt")) and not p.endswith(".index.json"):
                chosen[p] = p
        if part not in _WEIGHTS:
            continue
        plain = f"{part}/{_WEIGHTS[part]}.safetensors"
        pickled = f"{part}/{_PICKLED[part]}"
        options = ([f"{part}/{_WEIGHTS[part]}.{variant}.safetensors"] if variant else []) + [plain]
        options += ([f"{pickled}.{variant}.bin"] if variant else []) + [f"{pickled}.bin"]
        pick = next((o for o in options if o in paths), None)
        if pick:
            chosen[plain] = pick
            continue
        shards = sorted(p for p in inside if re.fullmatch(rf"{re.escape(part)}/{_WEIGHTS[part]}-\d+-of-\d+\.safetensors", p))
        index = f"{plain}.index.json"
        if shards and index in paths:
            chosen.update({p: p for p in shards + [index]})
            continue
        raise UsageError(f"{where}: no weights for {part}/ (looked for {', '.join(options)})")
    return chosen


def _linked(src: Path, dst: Path) -> Path:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def _used_variant(chosen: dict[str, str]) -> str:
    return "fp16" if any(".fp16." in src for src in chosen.values()) else "default"


def _arch_of_unet(config) -> str:
    from engine.models.arch import arch_id

    path = config.path if isinstance(config, Staged) else config
    return arch_id(json.loads(Path(path).read_text()))


def _unet_width(state) -> int | None:
    weight = state.get("model.diffusion_model.input_blocks.0.0.weight")
    return int(weight.shape[0]) if weight is not None else None


def _safetensors_format(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # not readable here; load_tensor_file gives the one-line reason
        return None


def _name_from(stem: str) -> str:
    """A store name from a file or repository name: lower case, other characters as '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")[:64] or "model"
    return validate_name(re.sub(r"\.\.+", ".", name))


def _condition_from(stem: str) -> str | None:
    """The condition in an official adapter's file name (``..._basecn700k_<cond>[_rank128][_Nimgs_Ssteps]``)."""
    m = re.search(r"basecn\d+k_(.+?)(?:_rank\d+)?(?:_\d+imgs_\d+steps)?$", stem)
    return m.group(1) if m else None


def _short(source: dict) -> str:
    if source.get("type") == "hub":
        where = f"{source['repo']}@{source['commit'][:12]}"
        return where + (f" {source['path']}" if source.get("path") else "")
    if source.get("type") == "local":
        return source.get("path", "local")
    if source.get("type") == "random":
        return f"random {source.get('preset')}"
    return source.get("type", "?")


def _pull_random(store: Store, preset: str, name: str, replace: bool = False) -> None:
    from engine.models.arch import arch_id
    from engine.formats.adapter_file import make_random_adapter
    from engine.models.storage import make_random_model

    validate_name(name)
    sd_name = f"{name}-sd"
    validate_name(sd_name)
    with _scratch(store) as tmp:
        config = make_random_model(preset, f"{tmp}/sd", f"{tmp}/base/controlnet")
        labels = ["random-weights"]
        note = "randomly initialised: for trying commands offline, not for real images"
        store.add_folder(sd_name, "sd", f"{tmp}/sd", source={"type": "random", "preset": preset}, labels=labels,
                         notes=note, arch=arch_id(config), replace=replace)
        store.add_folder(name, "base", f"{tmp}/base", arch=arch_id(config), sd=sd_name,
                         source={"type": "random", "preset": preset}, labels=labels, notes=note, replace=replace)
        # An untrained adapter (equal to the base), so `ctrlora gen` can be tried at once.
        adapter_name = f"{name}-canny"
        validate_name(adapter_name)
        make_random_adapter(f"{tmp}/base/controlnet", f"{tmp}/adapter.safetensors", "canny")
        store.add(adapter_name, "adapter", {"adapter.safetensors": f"{tmp}/adapter.safetensors"},
                  arch=arch_id(config), condition="canny", rank=4, source={"type": "random", "preset": preset},
                  labels=labels, notes=note, replace=replace)
    say(f"pulled {name} (base, {preset}, random weights), {sd_name} (sd) and {adapter_name} (untrained adapter)")


def _scratch(store: Store) -> tempfile.TemporaryDirectory:
    """A scratch folder inside the store (same filesystem, so finished files move in by rename),
    named by process id so that ``gc`` can clear what a killed pull left."""
    return tempfile.TemporaryDirectory(dir=store.scratch(), prefix=f"{os.getpid()}-")
