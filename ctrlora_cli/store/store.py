"""The local model store: content-addressed blobs plus one JSON manifest per entry.

    $CTRLORA_HOME (else the platformdirs user data dir)/
        blobs/sha256-<hex>        every file, named by its digest, written to a temp file and renamed
        manifests/<name>.json     written LAST and atomically: an entry exists once its manifest does
        partial/                  bytes of downloads in progress (resumed by the next pull)
        locks/                    lock files of pulls and downloads in progress
        tmp/<pid>-...             scratch folders of running pulls (cleared when their process is gone)
        views/<name>/...          folders of links to blobs by relative path (derived, rebuilt at will)
        runs/<name>, runs/train-base/<name>   run folders of ``fit`` and ``train-base``
        .lock                     a file lock taken by every writer

A pull killed at any moment leaves no visible half-entry: blobs without a manifest are invisible
and collected by the next ``rm``/``gc``.

Views hold relative symbolic links (``../../blobs/sha256-...``), so a store folder that is moved
or copied keeps working; where links cannot be made they are hard links, else copies. A view is
checked each time it is used and rebuilt when it no longer matches its entry.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from filelock import FileLock

from ctrlora_cli import envconfig
from ctrlora_cli.store.names import KINDS, validate_name
from ctrlora_cli.store import sources
from engine.errors import CtrloraError, UsageError
from engine.files import atomic_path, sha256_bytes, sha256_file
from engine.progress import ProgressCallback, report

SCHEMA = 1


class NotInStore(UsageError):
    """A name the store does not hold: bad input (exit 2) from every command."""


class NameTaken(UsageError):
    """A command would write an entry under a name the store already holds (``Store.claim``)."""


class DamagedEntry(CtrloraError):
    """An entry whose files are missing from the store: a failure at run time (exit 1)."""


LINK_MODES = ("symlink", "hardlink", "copy")


@dataclass
class FileRecord:
    path: str  # relative path inside the entry, e.g. "controlnet/config.json"
    digest: str  # "sha256:<hex>"
    size: int


@dataclass
class Manifest:
    name: str
    kind: str  # base | adapter | sd
    files: list[FileRecord]
    arch: str | None = None  # base architecture id (engine.models.arch) for base and adapter entries
    condition: str | None = None
    rank: int | None = None
    sd: str | None = None  # for a base: the SD entry it pairs with by default
    source: dict = field(default_factory=dict)  # {"type": "hub", "repo", "revision", "path"} | {"type": "local", ...}
    converted_from: dict | None = None  # the original file, when we converted it on import
    labels: list[str] = field(default_factory=list)  # e.g. "random-weights"
    notes: str = ""
    extra: dict = field(default_factory=dict)  # kind-specific facts (fit: steps, data digest, ...)
    created: str = ""
    schema: int = SCHEMA

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def weights_digest(self) -> str | None:
        """The digest of the entry's (first) safetensors file: what names a base's weights."""
        return next((f.digest for f in self.files if f.path.endswith(".safetensors")), None)

    @property
    def made_for(self) -> dict | None:
        """For an adapter: the base it was made for, ``{"name", "digest"}`` (the digest may be None),
        as ``extra["base"]`` and ``extra["base_digest"]`` record it; None when nothing is recorded."""
        name = (self.extra or {}).get("base") if self.kind == "adapter" else None
        return {"name": name, "digest": self.extra.get("base_digest")} if isinstance(name, str) else None

    def links(self) -> list[tuple[str, str]]:
        """The entries this one needs by name: ``[("base", NAME)]`` for an adapter that records
        its base, ``[("sd", NAME)]`` for a base paired with an SD."""
        found = []
        if self.made_for:
            found.append(("base", self.made_for["name"]))
        if self.kind == "base" and self.sd:
            found.append(("sd", self.sd))
        return found

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        data = dict(data)
        data["files"] = [FileRecord(**f) for f in data.get("files", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Staged:
    """A file already hashed and verified by the caller (a finished download), moved into the
    blobs as it is instead of being copied."""

    path: Path
    digest: str


def files_in(folder: str | Path) -> dict[str, Path]:
    """Every file under ``folder`` by its relative path, as ``Store.add`` takes them."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def link_or_copy(src: str | Path, dst: str | Path) -> Path:
    """``dst`` as a hard link to ``src`` (no bytes copied), or a copy where links cannot be made."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return Path(dst)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """``links``: how views point at blobs, in order of preference (``LINK_MODES``); each file
    takes the first that works on the store's filesystem."""

    def __init__(self, root: str | Path | None = None, links: tuple[str, ...] = LINK_MODES):
        # Absolute: views, run folders and the paths handed to workers stay right whatever the
        # working directory (a relative CTRLORA_HOME is resolved once, here).
        self.root = Path(os.path.abspath(Path(root).expanduser() if root else envconfig.home()))
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.partial = self.root / "partial"
        self.views = self.root / "views"
        self.runs = self.root / "runs"
        unknown = set(links) - set(LINK_MODES)
        if not links or unknown:
            raise ValueError(f"links must be some of {LINK_MODES}, not {links}")
        self.link_modes = tuple(links)

    # -- locking and blobs ------------------------------------------------------------------
    def lock(self, key: str | None = None) -> FileLock:
        """The store's lock (taken to add or remove entries), or with ``key`` a lock of its own
        (one pull of an entry or one download of a file at a time); lock files live in locks/."""
        if key is None:
            self.root.mkdir(parents=True, exist_ok=True)
            return FileLock(str(self.root / ".lock"))
        folder = self.root / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / f"{key}.lock"))

    def blob_path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        return self.blobs / f"{algo}-{hexdigest}"

    def put_file(self, src: str | Path, replace: bool = False) -> FileRecord:
        """Copy a file into the blobs; returns its record (path = name). ``replace`` overwrites a
        blob of the same digest (repairing a damaged one)."""
        src = Path(src)
        self.blobs.mkdir(parents=True, exist_ok=True)
        # Not engine.files.atomic_path: a blob's final name is known only once its bytes are
        # hashed. The copy itself is hashed, so the name is the digest of what was stored.
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".incoming-")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            digest = sha256_file(tmp)
            final = self.adopt_blob(tmp, digest, replace=replace)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return FileRecord(path=src.name, digest=digest, size=final.stat().st_size)

    def adopt_blob(self, tmp: str | Path, digest: str, replace: bool = False) -> Path:
        """Move an already-hashed file (inside the store's filesystem) into the blobs. The file is
        whole already, so one rename is its atomic write (``atomic_path`` is for bytes still to be
        written). A blob already there is kept, unless ``replace`` (repairing a damaged one)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        final = self.blob_path(digest)
        if Path(tmp) == final:
            return final
        if final.exists() and not replace:
            Path(tmp).unlink(missing_ok=True)
        else:
            os.replace(tmp, final)
        return final

    # -- names --------------------------------------------------------------------------------
    def claim(self, name: str, force: bool = False, flag: str = "--name") -> Manifest | None:
        """The one rule for every command that writes entry ``name``: call it BEFORE any heavy
        work. A name the store does not hold is free (returns None). A name it holds is refused
        with one line naming what the entry is and where it came from (``NameTaken``, a usage
        error: exit 2), unless ``force``; then the existing manifest is returned, and the later
        ``Store.add`` of the same name replaces the entry atomically (the new manifest is renamed
        over the old one) and collects the blobs only the old entry used.

            store.claim(name, force)                  # fit, world train-sd: --name NAME [--force]
            store.claim(out_name, force, "--out")     # train-base names its base with --out
            ... the work ...
            store.add(name, kind, files, ...)         # replaces NAME when it was claimed with force

        ``flag`` is the option the user named the entry with, for the message."""
        validate_name(name)
        if not self.exists(name):
            return None
        manifest = self.get(name)
        if force:
            return manifest
        raise NameTaken(f"{name!r} is already in the store ({manifest.kind} from {sources.short(manifest.source)}); "
                        f"use another {flag}, or --force to replace it")

    def claim_group(self, names, same, force: bool = False) -> list[str]:
        """``claim`` for a pull that makes several entries at once (tiny, demo): the names to
        write. With ``force``, all of them; otherwise those the store lacks, or holds damaged, from
        this source (``same(manifest)``); entries of this source that are intact are kept. A name
        that holds anything else is refused before any is written."""
        todo = []
        for name in names:
            manifest = self.get(name) if self.exists(name) else None
            if manifest is not None and not force:
                if not same(manifest):
                    self.claim(name, force)  # refused
                if self.intact(manifest):
                    continue
            todo.append(name)
        return todo

    def not_in_store(self, name: str, hint: str | None = None) -> NotInStore:
        """The error for a name the store does not hold, the same from every command: the pull
        that fetches it when the catalog knows it, else a close store name as "did you mean",
        else ``hint`` (default: how to pull or import it)."""
        close = None if sources.pullable(name) else suggest(name, [m.name for m in self.list()])
        if close:
            return NotInStore(f"{name!r} is not in the store; did you mean {close!r}? (see: ctrlora list)")
        return NotInStore(f"{name!r} is not in the store ({self.root}); {hint or sources.pull_hint(name)}")

    # -- manifests --------------------------------------------------------------------------
    def manifest_path(self, name: str) -> Path:
        return self.manifests / f"{validate_name(name)}.json"

    def write_manifest(self, manifest: Manifest) -> Manifest:
        validate_name(manifest.name)
        if manifest.kind not in KINDS:
            raise ValueError(f"unknown kind {manifest.kind!r}")
        missing = [f.path for f in manifest.files if not self.blob_path(f.digest).is_file()]
        if missing:
            raise CtrloraError(f"internal error: blobs missing for {missing[:3]}")
        if not manifest.created:
            manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with atomic_path(self.manifest_path(manifest.name)) as tmp, open(tmp, "w") as f:
            json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())  # the entry exists once this file does: its bytes reach the disk first
        shutil.rmtree(self.views / manifest.name, ignore_errors=True)  # stale view of an older entry
        return manifest

    def add(self, name: str, kind: str, files: dict[str, str | Path | Staged], replace: bool = False,
            **meta) -> Manifest:
        """Store ``files`` ({relative path in the entry: source file}) as entry ``name``. A
        ``Staged`` source is moved in (it must lie inside the store's root); others are copied.
        ``replace`` overwrites existing blobs of the same digest (repairing damaged ones). An
        entry of that name is replaced at once (its manifest renamed over), and the blobs only
        it used are collected: check the name first with ``claim``."""
        validate_name(name)
        with self.lock():
            replacing = self.exists(name)
            records = []
            for rel, src in sorted(files.items()):
                if isinstance(src, Staged):
                    blob = self.adopt_blob(src.path, src.digest, replace=replace)
                    record = FileRecord(path=rel, digest=src.digest, size=blob.stat().st_size)
                else:
                    record = self.put_file(src, replace=replace)
                    record.path = rel
                records.append(record)
            manifest = self.write_manifest(Manifest(name=name, kind=kind, files=records, **meta))
            if replacing:
                self.gc()  # blobs only the old version used
            return manifest

    def add_folder(self, name: str, kind: str, folder: str | Path, **meta) -> Manifest:
        return self.add(name, kind, files_in(folder), **meta)

    def exists(self, name: str) -> bool:
        return self.manifest_path(name).is_file()

    def get(self, name: str) -> Manifest:
        path = self.manifest_path(name)
        if not path.is_file():
            raise self.not_in_store(name)
        return Manifest.from_json(json.loads(path.read_text()))

    def list(self) -> list[Manifest]:
        if not self.manifests.is_dir():
            return []
        paths = sorted(self.manifests.glob("*.json"), key=lambda p: p.stem)
        return [Manifest.from_json(json.loads(p.read_text())) for p in paths]

    def intact(self, manifest: Manifest) -> bool:
        """Every blob present with its recorded size (cheap; ``check`` re-hashes)."""
        for record in manifest.files:
            blob = self.blob_path(record.digest)
            if not blob.is_file() or blob.stat().st_size != record.size:
                return False
        return True

    def check(self, manifest: Manifest, on_bytes=None) -> list[str]:
        """Re-hash an entry's blobs; one line per damaged file (empty when all is well)."""
        problems = []
        for record in manifest.files:
            blob = self.blob_path(record.digest)
            if not blob.is_file():
                problems.append(f"{record.path}: blob missing")
                continue
            digest = sha256_file(blob, on_bytes)
            if digest != record.digest:
                problems.append(f"{record.path}: content changed ({digest[:19]}... != {record.digest[:19]}...)")
            elif blob.stat().st_size != record.size:
                problems.append(f"{record.path}: size {blob.stat().st_size} != {record.size}")
        return problems

    def check_all(self, manifests: list[Manifest], callback: ProgressCallback | None = None
                  ) -> list[tuple[Manifest, list[str]]]:
        """``check`` for several entries, with one progress count of bytes re-hashed (task "verify")."""
        total, done = sum(m.size for m in manifests), 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            report(callback, "verify", done, total)

        return [(m, self.check(m, on_bytes)) for m in manifests]

    def partials(self) -> list[Path]:
        """Bytes of unfinished downloads (resumed by the next pull of the same file)."""
        if not self.partial.is_dir():
            return []
        return sorted(p for p in self.partial.iterdir() if p.suffix == ".part")

    # -- links between entries ----------------------------------------------------------------
    def missing_links(self, manifest: Manifest, names: set[str] | None = None) -> list[tuple[str, str]]:
        """What ``manifest`` needs that the store no longer holds: ``[("base", NAME)]`` for an
        adapter whose base is gone, ``[("sd", NAME)]`` for a base whose SD is gone. ``names``:
        the store's names, when the caller has them already."""
        names = {m.name for m in self.list()} if names is None else names
        return [(kind, name) for kind, name in manifest.links() if name not in names]

    def dependents(self, names) -> list[tuple[Manifest, str, str]]:
        """Entries (other than ``names``) made for or paired with one of ``names``: (the entry,
        "base" or "sd", the name it points to): what would point nowhere once ``names`` go."""
        names = set(names)
        return [(m, kind, target) for m in self.list() if m.name not in names
                for kind, target in m.links() if target in names]

    # -- run folders ----------------------------------------------------------------------------
    def run_folder(self, name: str, job: str = "fit") -> Path:
        """Where a ``job`` ("fit" or "train-base") keeps its run for entry ``name`` by default:
        ``runs/NAME`` for fit, ``runs/train-base/NAME`` for train-base."""
        validate_name(name)
        if job == "fit":
            return self.runs / name
        if job == "train-base":
            return self.runs / "train-base" / name
        raise ValueError(f"unknown job {job!r}")

    def run_of(self, manifest: Manifest) -> Path | None:
        """The run folder an entry was made in (fit: ``source["run_dir"]``; train-base: the base's
        ``source["run"]``), when it still exists; a store moved since is looked up in its own
        runs/ at the default place. None for entries that no run made."""
        source = manifest.source
        if source.get("type") == "fit":
            recorded, default = source.get("run_dir"), self.run_folder(manifest.name, "fit")
        elif source.get("type") == "train-base":
            owner = manifest.made_for["name"] if manifest.made_for else manifest.name
            recorded, default = source.get("run"), self.run_folder(owner, "train-base")
        else:
            return None
        for folder in (Path(recorded) if recorded else None, default):
            if folder is not None and folder.is_dir():
                return Path(os.path.realpath(folder))
        return None

    def runs_freed_by(self, names) -> tuple[list[Path], list[Path]]:
        """Run folders that removing ``names`` leaves to no entry: (those inside the store's
        runs/, which ``rm`` removes; those elsewhere, a --run-dir the user chose, which it keeps)."""
        names = set(names)
        kept = {self.run_of(m) for m in self.list() if m.name not in names}
        freed = sorted({run for name in names if (run := self.run_of(self.get(name))) and run not in kept})
        inside = [run for run in freed if self._in_runs(run)]
        return inside, [run for run in freed if run not in inside]

    def _in_runs(self, folder: Path) -> bool:
        runs = Path(os.path.realpath(self.runs))
        folder = Path(os.path.realpath(folder))
        return folder.is_relative_to(runs) and folder not in (runs, runs / "train-base")

    def remove_runs(self, folders) -> int:
        """Delete run folders (``runs_freed_by``'s first list); returns the bytes freed."""
        freed = 0
        for folder in folders:
            if not self._in_runs(folder):
                raise ValueError(f"{folder} is not a run folder of this store")
            freed += folder_size(folder)
            shutil.rmtree(folder, ignore_errors=True)
        return freed

    # -- reading entries --------------------------------------------------------------------
    def file(self, name: str, rel: str) -> Path:
        """One file of an entry, under its own name (loaders such as ``load_tensor_file`` go by
        the suffix, which blobs lack): a link in the entry's view."""
        manifest = self.get(name)
        if not any(record.path == rel for record in manifest.files):
            raise NotInStore(f"{name!r} has no file {rel!r}")
        return self.folder(name) / rel

    def folder(self, name: str) -> Path:
        """A folder with the entry's files at their relative paths (links to the blobs), for
        loaders such as ``from_pretrained`` that want a directory. The view is checked each time
        (a store moved or copied, links left by an older version) and rebuilt when it does not
        match; an entry whose blobs are missing is ``DamagedEntry``."""
        manifest = self.get(name)
        view = self.views / name
        if not self.view_problems(manifest):
            return view
        if not self.intact(manifest):
            raise DamagedEntry(f"{name!r} is damaged (files missing from {self.blobs}); see: ctrlora verify {name}; "
                               f"repair with: {sources.repair_command(manifest)}")
        return self.build_view(manifest)

    def view_problems(self, manifest: Manifest) -> list[str]:
        """Why the entry's view cannot be used as it is (empty when it can): missing, made for
        another version of the entry, or files that do not lead to their blobs."""
        view = self.views / manifest.name
        stamp = view / ".manifest-digest"
        if not stamp.is_file():
            return ["no view"]
        if stamp.read_text() != _manifest_digest(manifest):
            return ["made for another version of the entry"]
        problems = []
        for record in manifest.files:
            target, blob = view / record.path, self.blob_path(record.digest)
            try:
                if os.path.samefile(target, blob):  # a symbolic link to the blob, or a hard link
                    continue
                if not target.is_symlink() and target.stat().st_size == record.size:
                    continue  # a copy (filesystems without links)
            except OSError:
                pass
            problems.append(f"{record.path}: does not lead to its blob")
        return problems

    def build_view(self, manifest: Manifest) -> Path:
        """(Re)build the entry's view: relative symbolic links to the blobs (they survive moving
        or copying the store folder), else hard links, else copies, file by file."""
        view = self.views / manifest.name
        self.views.mkdir(parents=True, exist_ok=True)
        # Built beside its final place, at the same depth, so the relative links hold once renamed.
        tmp = Path(tempfile.mkdtemp(dir=self.views, prefix=".building-"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a view is as readable as the blobs
        try:
            for record in manifest.files:
                final = view / record.path
                target = tmp / record.path
                target.parent.mkdir(parents=True, exist_ok=True)
                self._link(self.blob_path(record.digest), target, final.parent)
            (tmp / ".manifest-digest").write_text(_manifest_digest(manifest))
            shutil.rmtree(view, ignore_errors=True)
            os.replace(tmp, view)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.view_problems(manifest):  # not another process building the same view in between
                raise
        return view

    def repair_view(self, manifest: Manifest) -> list[str]:
        """A view that exists but no longer leads to the entry's blobs (a store moved, copied, or
        written by an older version) is rebuilt: it is derived data. Returns what was wrong
        (empty when nothing was); an entry with missing blobs is left to ``check``."""
        if not (self.views / manifest.name).exists():
            return []
        problems = self.view_problems(manifest)
        if problems and self.intact(manifest):
            self.build_view(manifest)
        return problems

    def _link(self, blob: Path, target: Path, final_parent: Path) -> None:
        for mode in self.link_modes:
            try:
                if mode == "symlink":
                    target.symlink_to(os.path.relpath(blob, final_parent))
                elif mode == "hardlink":
                    os.link(blob, target)
                else:
                    shutil.copyfile(blob, target)
                return
            except OSError:
                if mode == self.link_modes[-1]:
                    raise

    # -- removal ----------------------------------------------------------------------------
    def remove(self, names: Iterable[str]) -> int:
        """Remove entries (manifest first), then collect unreferenced blobs; returns bytes freed."""
        names = list(names)
        with self.lock():
            for name in names:  # all or nothing
                if not self.manifest_path(name).is_file():
                    raise self.not_in_store(name, "see what is with: ctrlora list")
            for name in names:
                path = self.manifest_path(name)
                path.unlink(missing_ok=True)
                shutil.rmtree(self.views / name, ignore_errors=True)
            return self.gc()

    def scratch(self) -> Path:
        """Scratch folders of running pulls (``<pid>-...``), inside the store's filesystem."""
        folder = self.root / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def new_scratch(self) -> tempfile.TemporaryDirectory:
        """A private scratch folder in ``scratch()`` (the store's filesystem, so finished files
        move in by rename), named by process id so that ``gc`` can clear what a killed pull left."""
        return tempfile.TemporaryDirectory(dir=self.scratch(), prefix=f"{os.getpid()}-")

    def _clear_dead_scratch(self) -> None:
        folder = self.root / "tmp"
        for entry in folder.iterdir() if folder.is_dir() else ():
            pid = entry.name.split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)

    def gc(self) -> int:
        """Delete blobs that no manifest references, and scratch left by killed pulls (call with
        the lock held). Returns the bytes freed: a blob hard-linked elsewhere (the Hugging Face
        cache shares the hub's files so) frees nothing."""
        self._clear_dead_scratch()
        referenced = {self.blob_path(f.digest).name for m in self.list() for f in m.files}
        freed = 0
        if self.blobs.is_dir():
            for blob in self.blobs.iterdir():
                if blob.name not in referenced:
                    stat = blob.stat()
                    freed += stat.st_size if stat.st_nlink == 1 else 0
                    blob.unlink()
        return freed


def suggest(name: str, names) -> str | None:
    """The closest of ``names`` to a name that looks like a typo of it, or None."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return close[0] if close else None


def folder_size(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def _manifest_digest(manifest: Manifest) -> str:
    return sha256_bytes(json.dumps(manifest.to_json(), sort_keys=True).encode())
