"""Pulls: from a source to a store entry.

Sources: ``tiny`` (random, offline), ``demo`` (shipped in the package, offline), a catalog name
(``base``, ``canny``, ``sd15``, ...), ``hf://owner/repo/path/in/repo``, ``sd:owner/repo`` (a
Stable Diffusion model in diffusers layout), or a local ``.ckpt`` / ``.safetensors`` file or
folder. This module finds the bytes (catalog, hub, disk) and takes the locks; ``ingest`` decides
what they hold and stores them. Everything the user should see goes to ``on_event``.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ctrlora_cli import envconfig
from ctrlora_cli.store import hub, sources
from ctrlora_cli.store.demo import pull_demo
from ctrlora_cli.store.events import Listener, tell
from ctrlora_cli.store.ingest import Importer
from ctrlora_cli.store.names import KINDS, name_from, validate_name
from ctrlora_cli.store.sd_layout import select_sd_files
from ctrlora_cli.store.store import Staged, Store, link_or_copy, suggest
from ctrlora_cli.store.tiny import pull_tiny
from engine.errors import CtrloraError, UsageError
from engine.files import sha256_file

_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
_PICKLES = (".ckpt", ".pt", ".pth", ".bin")


def pull(store: Store, source: str, *, name: str | None = None, revision: str | None = None, kind: str | None = None,
         sd: str | None = None, base: str | None = None, condition: str | None = None, force: bool = False,
         on_event: Listener | None = None) -> None:
    """Fetch or import ``source`` into ``store``. A name the store holds is kept when it holds this
    very source ("up to date"; a newer revision of it is fetched), and refused when it holds
    anything else, unless ``force`` (fetch again and replace it: ``Store.claim``). ``kind`` is what
    the caller expects (checked against what the source holds); ``sd`` the SD a base pairs with,
    ``base`` the stored base an adapter must fit (checked, and recorded as the base it was made
    for, on a new entry and on one already there), ``condition`` an adapter's."""
    if name is not None:
        validate_name(name)
    if kind is not None and kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if sd is not None:
        validate_name(sd)
    if source == "tiny":
        pull_tiny(store, name or "tiny", replace=force, on_event=on_event)
        return
    if source == "demo":
        pull_demo(store, name or "demo", replace=force, on_event=on_event)
        return
    puller = Puller(store, force, on_event)
    options = dict(kind=kind, sd=sd, base=base, condition=condition)
    if source.startswith("hf://"):
        puller.hub_file(source[len("hf://"):], name, revision, **options)
    elif source.startswith("sd:"):
        if kind not in (None, "sd"):
            raise UsageError("sd:owner/repo pulls a Stable Diffusion model; drop --kind or use --kind sd")
        puller.sd_repo(source[len("sd:"):], name, revision, variant="fp16")
    elif looks_local(source):
        if revision:
            raise UsageError("--revision applies to hub sources, not to local files")
        puller.local(Path(source).expanduser(), name, **options)
    else:
        puller.catalog_name(source, name, revision, **options)


def looks_local(source: str) -> bool:
    return (os.path.exists(source) or source.startswith((".", "/", "~")) or os.sep in source
            or source.lower().endswith(_FILE_SUFFIXES))


class Puller:
    def __init__(self, store: Store, force: bool, on_event: Listener | None = None):
        self.store, self.force, self.on_event = store, force, on_event
        self.importer = Importer(store, force, on_event, self._sd15_tokenizer)
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
            close = suggest(source, [*self.catalog, *sources.OFFLINE_SOURCES])
            raise UsageError(f"unknown model {source!r}: {f'did you mean {close!r}? ' if close else ''}see the "
                             f"names pull knows with: ctrlora list --catalog (or pull hf://owner/repo/path, "
                             f"sd:owner/repo, or a local file)")
        if kind and kind != entry.kind:
            raise UsageError(f"{source!r} is a {entry.kind}, not a {kind}")
        name = validate_name(name or entry.name)
        if self._precheck(name, _catalog_origin(entry), base):
            return
        origin = {"catalog": entry.name}
        if entry.kind == "sd":
            self.sd_repo(entry.repo, name, revision or entry.revision, variant=entry.variant, origin=origin)
            return
        snapshot = hub.resolve(entry.repo, revision or entry.revision)
        if entry.kind == "annotator":
            self._hub_annotator(entry, snapshot, name, origin)
            return
        remote = self._pick(snapshot, entry)
        if entry.kind == "base":
            pair = sd or entry.sd
            if pair and not sd and pair in self.catalog and not self.importer.present(pair):
                self.catalog_name(pair, None, None, kind="sd", sd=None, base=None, condition=None)
            self._hub_import(remote, snapshot, name, kind="base", sd=pair, archs=[entry.arch] if entry.arch else None,
                             origin=origin, same_origin=_catalog_origin(entry))
        else:
            base_entry = self.catalog.get(entry.base) if entry.base else None
            arch = base_entry.arch if base_entry else None
            self._hub_import(remote, snapshot, name, kind="adapter", condition=condition or entry.condition,
                             base=base, made_for=self._stored_base(entry.base), archs=[arch] if arch else None,
                             origin=origin, same_origin=_catalog_origin(entry))
            wanted = base or (base_entry.name if base_entry else None)
            if wanted and not self.importer.present(wanted):
                tell(self.on_event, f"next: ctrlora pull {wanted}  (the base this adapter was made for)")

    def hub_file(self, spec: str, name, revision, *, kind, sd, base, condition) -> None:
        parts = spec.split("/", 2)
        if len(parts) < 3 or not all(parts):
            raise UsageError(f"hf://{spec}: expected hf://owner/repo/path/to/file")
        repo, path = f"{parts[0]}/{parts[1]}", parts[2].rstrip("/")
        if name and self._precheck(validate_name(name), lambda m: _hub_origin(m, repo, path), base):
            return
        snapshot = hub.resolve(f"{parts[0]}/{parts[1]}", revision)
        in_repo = [p for p in snapshot.files if p == parts[2] or p.startswith(parts[2].rstrip("/") + "/")]
        if parts[2] not in snapshot.files and in_repo:
            # a folder of the repository: a diffusers-layout SD or a Base ControlNet folder
            self._hub_folder(snapshot, parts[2].rstrip("/"), name, kind=kind, sd=sd)
            return
        remote = snapshot.file(parts[2])
        self._hub_import(remote, snapshot, name or name_from(Path(parts[2]).stem), kind=kind, sd=sd, base=base,
                         condition=condition)

    def sd_repo(self, repo: str, name, revision, variant: str | None = None, origin: dict | None = None) -> None:
        name = validate_name(name or name_from(repo.split("/")[-1]))
        if self._precheck(name, lambda m: _hub_origin(m, repo, None)):
            return
        self._hub_sd(hub.resolve(repo, revision), "", name, variant, origin or {})

    def local(self, path: Path, name, *, kind, sd, base, condition) -> None:
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")
        name = name or name_from(path.stem if path.is_file() else path.resolve().name)
        if path.is_dir():
            with self._entry_lock(name):
                self.importer.folder(path, name, kind=kind, sd=sd)
            return
        where = str(path.resolve())
        same_origin = lambda m: m.source.get("type") == "local" and m.source.get("path") == where
        self.importer.check_name(name, same_origin)  # before hashing a large file
        digest = sha256_file(path)
        source = {"type": "local", "path": where, "sha256": digest.split(":", 1)[1]}
        same = lambda m: m.source.get("type") == "local" and m.source.get("sha256") == source["sha256"]
        with self._entry_lock(name):
            if self.importer.up_to_date(name, same, same_origin, base):
                return
            self.importer.file(path, digest, name, source, kind=kind, sd=sd, base=base, condition=condition)

    # -- hub plumbing ---------------------------------------------------------------------------
    def _pick(self, snapshot, entry):
        if entry.file:
            return snapshot.file(entry.file)
        found = snapshot.match(entry.pattern)
        if not found and snapshot.cached:
            raise CtrloraError(f"offline: no file of {entry.repo} matching {' or '.join(entry.pattern)} is in the "
                               f"Hugging Face cache ({envconfig.hf_hub_cache()}); {hub.offline_hint()}")
        if not found:
            raise UsageError(f"{entry.name}: no file in {entry.repo}@{snapshot.revision} matches "
                             f"{' or '.join(entry.pattern)}; it may have been renamed or removed (pull a file "
                             f"directly with hf://{entry.repo}/PATH --name {entry.name})")
        if len(found) > 1:
            tell(self.on_event, f"{entry.name}: several files match; using {found[0].path} (others: "
                                f"{', '.join(f.path for f in found[1:4])})", "warning")
        return found[0]

    def _fetch(self, remote):
        return hub.fetch(self.store, remote, on_event=self.on_event, force=self.force)

    def _hub_source(self, snapshot, origin: dict | None = None, **more) -> dict:
        source = {"type": "hub", "repo": snapshot.repo, "revision": snapshot.revision, "commit": snapshot.commit}
        if envconfig.hf_endpoint() != envconfig.DEFAULT_HF_ENDPOINT:
            source["endpoint"] = envconfig.hf_endpoint()
        source.update(more)
        source.update(origin or {})
        return source

    def _hub_import(self, remote, snapshot, name, *, kind=None, sd=None, base=None, made_for=None, archs=None,
                    condition=None, origin=None, same_origin=None) -> None:
        """``same_origin``: what counts as an older version of this entry (default: the same file
        of the same repository)."""
        validate_name(name)
        source = self._hub_source(snapshot, origin, path=remote.path)
        same = lambda m: _hub_origin(m, remote.repo, remote.path) and m.source.get("commit") == remote.commit
        same_origin = same_origin or (lambda m: _hub_origin(m, remote.repo, remote.path))
        with self._entry_lock(name):
            if self.importer.up_to_date(name, same, same_origin, base):
                return
            fetched = self._fetch(remote)
            try:
                with self.store.new_scratch() as tmp:
                    named = link_or_copy(fetched.path, Path(tmp) / Path(remote.path).name)  # loaders go by the suffix
                    self.importer.file(named, fetched.digest, name, source, kind=kind, sd=sd, base=base,
                                       made_for=made_for, archs=archs, condition=condition)
            except CtrloraError:
                _discard(fetched)  # refused: not a download to continue
                raise
            _discard(fetched)  # converted: the store keeps ours

    def _hub_folder(self, snapshot, folder: str, name, *, kind, sd) -> None:
        files = {p[len(folder) + 1:] for p in snapshot.files if p.startswith(folder + "/")}
        name = name or name_from(folder.split("/")[-1])
        if kind in (None, "sd") and ("unet/config.json" in files or "model_index.json" in files):
            self._hub_sd(snapshot, folder + "/", name, "fp16", {})
        else:
            raise UsageError(f"hf://{snapshot.repo}/{folder}: a folder is imported only as a Stable Diffusion model "
                             f"in diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")

    def _hub_sd(self, snapshot, prefix: str, name: str, variant: str | None, origin: dict) -> None:
        validate_name(name)
        source = self._hub_source(snapshot, origin, **({"path": prefix.rstrip("/")} if prefix else {}))
        origin_same = lambda m: _hub_origin(m, snapshot.repo, source.get("path"))
        same = lambda m: m.kind == "sd" and origin_same(m) and m.source.get("commit") == snapshot.commit
        with self._entry_lock(name):
            if self.importer.up_to_date(name, same, origin_same):
                return
            listing = [p[len(prefix):] for p in snapshot.files if p.startswith(prefix)]
            chosen = select_sd_files(listing, variant, where=f"{snapshot.repo}/{prefix}")
            # Files finished before a later one fails stay in partial/: the next pull takes them from there.
            fetched = {dest: self._fetch(snapshot.files[prefix + src]) for dest, src in chosen.items()}
            try:
                arch = self.importer.commit_sd(name, chosen, {d: f.path for d, f in fetched.items()},
                                               {d: f.digest for d, f in fetched.items()}, source)
            finally:
                for f in fetched.values():
                    _discard(f)  # moved into the blobs, or converted
            tell(self.on_event, f"pulled {name} (sd, {arch}) from {sources.short(source)}")

    def _hub_annotator(self, entry, snapshot, name: str, origin: dict) -> None:
        """An annotator's files (the first of each item's alternatives the repository has), pickled
        weights rewritten as safetensors (opened with ``weights_only=True``)."""
        chosen = {}
        for item in entry.files:
            options = [item] if isinstance(item, str) else list(item)
            found = next((p for p in options if p in snapshot.files), None)
            if found is None:
                raise UsageError(f"{entry.name}: {entry.repo}@{snapshot.revision} has no {' or '.join(options)}")
            stem = "model" if Path(found).name == "pytorch_model.bin" else Path(found).stem
            chosen[f"{stem}.safetensors" if found.endswith(_PICKLES) else Path(found).name] = found
        path = ",".join(chosen.values())
        source = self._hub_source(snapshot, origin, path=path)
        same_origin = lambda m: _hub_origin(m, snapshot.repo, path)
        same = lambda m: m.kind == "annotator" and same_origin(m) and m.source.get("commit") == snapshot.commit
        with self._entry_lock(name):
            if self.importer.up_to_date(name, same, same_origin):
                return
            fetched = {dest: self._fetch(snapshot.files[src]) for dest, src in chosen.items()}
            try:
                with self.store.new_scratch() as tmp:
                    files = {}
                    for dest, src in chosen.items():
                        if src.endswith(_PICKLES):
                            from engine.formats.detect import bin_to_safetensors

                            named = link_or_copy(fetched[dest].path, Path(tmp) / Path(src).name)  # by suffix
                            files[dest] = Path(tmp) / dest
                            bin_to_safetensors(named, files[dest])
                        else:
                            files[dest] = Staged(fetched[dest].path, fetched[dest].digest)
                    self.importer.commit(name, "annotator", files, source=source, notes=entry.notes)
            finally:
                for f in fetched.values():
                    _discard(f)
            tell(self.on_event, f"pulled {name} (annotator) from {sources.short(source)}")

    def _sd15_tokenizer(self, tmp: Path) -> Path:
        """SD1.5's CLIP tokenizer: from the store's sd15 entry, else its repository's tokenizer/ folder."""
        for manifest in self.store.list():
            if manifest.kind == "sd" and manifest.arch == "sd15" and self.store.intact(manifest):
                folder = self.store.folder(manifest.name) / "tokenizer"
                if folder.is_dir():
                    return folder
        entry = self.catalog.get("sd15")
        snapshot = hub.resolve(entry.repo, entry.revision)
        folder = tmp / "tokenizer"
        folder.mkdir()
        for remote in snapshot.match("tokenizer/*"):
            fetched = self._fetch(remote)
            shutil.copyfile(fetched.path, folder / Path(remote.path).name)
            _discard(fetched)
        return folder

    # -- store plumbing -------------------------------------------------------------------------
    def _precheck(self, name: str, same_origin, base: str | None = None) -> bool:
        """Before the network: a name that holds something of another origin is refused (unless
        --force); offline, an intact entry of this origin is used as it is (updates cannot be
        checked), after checking it against ``base``. True when there is nothing more to do."""
        manifest = self.importer.check_name(name, same_origin)
        if manifest is None or self.force or not envconfig.offline() or not self.store.intact(manifest):
            return False
        if base:
            self.importer.fit_base(manifest, base)
        tell(self.on_event, f"{name} is in the store (offline: not checked for updates)")
        return True

    def _stored_base(self, name: str | None) -> dict | None:
        """The record of the base a catalog adapter was made for: its name, and the digest of the
        store's base of that name when there is one."""
        if not name:
            return None
        stored = self.store.get(name) if self.store.exists(name) else None
        return {"base": name, "base_digest": stored.weights_digest if stored and stored.kind == "base" else None}

    @contextmanager
    def _entry_lock(self, name: str):
        """One pull per entry name at a time: a second pull of the same thing waits, then finds it
        up to date."""
        with self.store.lock(f"pull-{name}"):
            yield


def _discard(fetched) -> None:
    """A verified download of ours (in partial/) that is no longer needed; a blob is left alone."""
    if fetched.owned:
        fetched.path.unlink(missing_ok=True)


def _hub_origin(manifest, repo: str, path: str | None) -> bool:
    """The entry came from this file or folder of this hub repository (at any commit)."""
    return (manifest.source.get("type") == "hub" and manifest.source.get("repo") == repo
            and (manifest.source.get("path") or None) == (path or None))


def _catalog_origin(entry):
    """Whether an entry came from this catalog entry (by name, or its repository and file)."""
    import fnmatch

    def same(manifest) -> bool:
        source = manifest.source
        if source.get("catalog") == entry.name:
            return True
        if source.get("type") != "hub" or source.get("repo") != entry.repo:
            return False
        path = source.get("path") or ""
        return path == entry.file if entry.file else (entry.kind == "sd" and not path) or any(
            fnmatch.fnmatchcase(path, p) for p in entry.pattern)

    return same
