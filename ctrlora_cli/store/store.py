"""The local model store: content-addressed blobs plus one JSON manifest per entry.

    $CTRLORA_HOME (else the platformdirs user data dir)/
        blobs/sha256-<hex>        every file, named by its digest, written to a temp file and renamed
        manifests/<name>.json     written LAST and atomically: an entry exists once its manifest does
        partial/                  bytes of downloads in progress (resumed by the next pull)
        locks/                    lock files of pulls and downloads in progress
        tmp/<pid>-...             scratch folders of running pulls (cleared when their process is gone)
        views/<name>/...          folders of links to blobs by relative path (derived, rebuilt at will)
        .lock                     a file lock taken by every writer

A pull killed at any moment leaves no visible half-entry: blobs without a manifest are invisible
and collected by the next ``rm``/``gc``.
"""

from __future__ import annotations

import datetime as _dt
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
from ctrlora_cli.store.sources import pull_hint
from engine.errors import CtrloraError
from engine.files import atomic_path, sha256_bytes, sha256_file
from engine.progress import ProgressCallback, report

SCHEMA = 1


class NotInStore(CtrloraError):
    exit_code = 1


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
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else envconfig.home()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.partial = self.root / "partial"
        self.views = self.root / "views"

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
        ``replace`` overwrites existing blobs of the same digest (repairing damaged ones)."""
        validate_name(name)
        with self.lock():
            records = []
            for rel, src in sorted(files.items()):
                if isinstance(src, Staged):
                    blob = self.adopt_blob(src.path, src.digest, replace=replace)
                    record = FileRecord(path=rel, digest=src.digest, size=blob.stat().st_size)
                else:
                    record = self.put_file(src, replace=replace)
                    record.path = rel
                records.append(record)
            return self.write_manifest(Manifest(name=name, kind=kind, files=records, **meta))

    def add_folder(self, name: str, kind: str, folder: str | Path, **meta) -> Manifest:
        return self.add(name, kind, files_in(folder), **meta)

    def exists(self, name: str) -> bool:
        return self.manifest_path(name).is_file()

    def get(self, name: str) -> Manifest:
        path = self.manifest_path(name)
        if not path.is_file():
            raise NotInStore(f"{name!r} is not in the store ({self.root}); {pull_hint(name)}")
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
        loaders such as ``from_pretrained`` that want a directory."""
        manifest = self.get(name)
        view = self.views / name
        stamp = view / ".manifest-digest"
        want = sha256_bytes(json.dumps(manifest.to_json(), sort_keys=True).encode())
        if stamp.is_file() and stamp.read_text() == want:
            return view
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".view-"))
        for record in manifest.files:
            target = tmp / record.path
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = self.blob_path(record.digest)
            try:
                target.symlink_to(blob)
            except OSError:  # filesystems without links
                shutil.copyfile(blob, target)
        (tmp / ".manifest-digest").write_text(want)
        self.views.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(view, ignore_errors=True)
        try:
            os.replace(tmp, view)
        except OSError:  # another process built the same view in between
            shutil.rmtree(tmp, ignore_errors=True)
            if not (stamp.is_file() and stamp.read_text() == want):
                raise
        return view

    # -- removal ----------------------------------------------------------------------------
    def remove(self, names: Iterable[str]) -> int:
        """Remove entries (manifest first), then collect unreferenced blobs; returns bytes freed."""
        names = list(names)
        with self.lock():
            for name in names:  # all or nothing
                if not self.manifest_path(name).is_file():
                    raise NotInStore(f"{name!r} is not in the store; see what is with: ctrlora list")
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
        the lock held)."""
        self._clear_dead_scratch()
        referenced = {self.blob_path(f.digest).name for m in self.list() for f in m.files}
        freed = 0
        if self.blobs.is_dir():
            for blob in self.blobs.iterdir():
                if blob.name not in referenced:
                    freed += blob.stat().st_size
                    blob.unlink()
        return freed
