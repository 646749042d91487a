"""Fetching files from the Hugging Face Hub into the store, through huggingface_hub.

huggingface_hub resolves revisions, lists repositories, builds URLs and auth headers and owns the
HTTP session (HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are honoured). Two things it does not do
are done here: a download that dies is resumed by the NEXT pull from the bytes kept in the
store's ``partial/`` (huggingface_hub 2.x restarts a failed file from zero), and every file is
checked against the hub's sha256 (LFS files) or git blob id (small files) before it is used.

A file already in the user's Hugging Face cache is taken from there, not downloaded again; every
file fetched is placed there too, hard-linked to the store's blob (``hf_cache``).
Endpoint, cache folder and offline mode are read at call time, through ``ctrlora_cli.envconfig``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ctrlora_cli import envconfig
from ctrlora_cli.store.events import Listener, tell
from ctrlora_cli.store import hf_cache
from ctrlora_cli.store.store import link_or_copy
from engine.errors import CtrloraError, UsageError
from engine.files import CHUNK
from engine.progress import report

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_repo_id(repo: str) -> str:
    if not _REPO.match(repo or ""):
        raise UsageError(f"invalid hub repository {repo!r}: expected owner/name")
    return repo


@dataclass
class RemoteFile:
    """One file of a repository at a resolved commit."""

    repo: str
    commit: str
    path: str
    size: int
    sha256: str | None = None  # LFS files: the hub's sha256 of the content
    git_oid: str | None = None  # small files: the git blob id (sha1 of "blob <size>\\0" + content)
    revision: str | None = None  # the branch or tag it was resolved from (the HF cache's refs/ name it)

    @property
    def label(self) -> str:
        return f"{self.repo}/{self.path}"

    @property
    def key(self) -> str:
        """Names the file's bytes in partial/: its digest, else its place at an immutable commit."""
        if self.sha256:
            return f"sha256-{self.sha256}"
        return "at-" + hashlib.sha256(f"{self.repo}@{self.commit}/{self.path}".encode()).hexdigest()


@dataclass
class Snapshot:
    """A repository at a resolved commit: its files by path."""

    repo: str
    revision: str
    commit: str
    files: dict[str, RemoteFile]
    cached: bool = False  # read offline from the Hugging Face cache: only the files cached there

    def match(self, patterns: list[str] | str) -> list[RemoteFile]:
        """Files matching any glob (``*`` also crosses folders), in pattern order, then by path."""
        found: list[RemoteFile] = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            for path in sorted(self.files):
                if fnmatch.fnmatchcase(path, pattern) and self.files[path] not in found:
                    found.append(self.files[path])
        return found

    def file(self, path: str) -> RemoteFile:
        if path not in self.files:
            if self.cached:
                raise not_cached(f"{self.repo}/{path}")
            raise CtrloraError(f"{self.repo} has no file {path!r} at {self.revision} ({self.commit[:12]}); "
                               f"it may have been moved or removed")
        return self.files[path]


@dataclass
class Fetched:
    """A verified local copy of a remote file. ``owned``: a file in partial/ that the caller moves
    into the blobs or deletes; otherwise an existing blob, left as it is."""

    remote: RemoteFile
    path: Path
    digest: str  # sha256:<hex>
    owned: bool
    how: str  # "download" | "resume" | "hf-cache" | "store"


def _hub_error(exc: Exception, what: str) -> CtrloraError:
    """One line for the errors huggingface_hub raises."""
    from huggingface_hub import errors as hf_errors

    name = type(exc).__name__
    if isinstance(exc, hf_errors.GatedRepoError):
        return CtrloraError(f"{what}: the repository is gated: accept its terms on the hub, then set HF_TOKEN")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return CtrloraError(f"{what}: repository not found (or private: set HF_TOKEN) at {envconfig.hf_endpoint()}")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return CtrloraError(f"{what}: no such revision")
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return CtrloraError(f"{what}: file not found")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return CtrloraError(f"{what}: offline mode (HF_HUB_OFFLINE) forbids the network")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
        return CtrloraError(f"{what}: the hub answered: {first}")
    return CtrloraError(f"{what}: cannot reach {envconfig.hf_endpoint()} ({name}: {exc}); set CTRLORA_OFFLINE=1 "
                        f"to use only what is already downloaded")


def offline_hint() -> str:
    return "unset CTRLORA_OFFLINE/HF_HUB_OFFLINE to download it"


def not_cached(what: str) -> CtrloraError:
    """Offline, and ``what`` is not in the Hugging Face cache."""
    return CtrloraError(f"offline: {what} is not in the Hugging Face cache ({envconfig.hf_hub_cache()}); "
                        f"{offline_hint()}")


def resolve(repo: str, revision: str | None = None) -> Snapshot:
    """The repository's commit and file list for ``revision`` (default ``main``): from the hub,
    or offline from the Hugging Face cache."""
    check_repo_id(repo)
    revision = revision or "main"
    if envconfig.offline():
        return _resolve_cached(repo, revision)
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=envconfig.hf_endpoint(), library_name="ctrlora")
    what = f"{repo}@{revision}"
    try:
        commit = api.model_info(repo, revision=revision).sha
        entries = list(api.list_repo_tree(repo, revision=commit, recursive=True))
    except Exception as exc:  # huggingface_hub and httpx errors, mapped to one line
        raise _hub_error(exc, what) from None
    if not commit:
        raise CtrloraError(f"{what}: the hub did not say which commit this is")
    files = {}
    for entry in entries:
        if isinstance(entry, RepoFile):
            files[entry.path] = RemoteFile(repo, commit, entry.path, entry.size,
                                           sha256=entry.lfs.sha256 if entry.lfs else None,
                                           git_oid=None if entry.lfs else entry.blob_id, revision=revision)
    return Snapshot(repo, revision, commit, files)


def _resolve_cached(repo: str, revision: str) -> Snapshot:
    folder = hf_cache.repo_folder(repo)
    commit = revision if _COMMIT.match(revision) else None
    ref = folder / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    snapshot = folder / "snapshots" / (commit or "-")
    if not commit or not snapshot.is_dir():
        raise not_cached(f"{repo}@{revision}")
    files = {}
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            rel = path.relative_to(snapshot).as_posix()
            blob_name = Path(os.path.realpath(path)).name  # the cache names blobs by ETag
            files[rel] = RemoteFile(repo, commit, rel, path.stat().st_size,
                                    sha256=blob_name if re.fullmatch(r"[0-9a-f]{64}", blob_name) else None,
                                    git_oid=blob_name if re.fullmatch(r"[0-9a-f]{40}", blob_name) else None)
    return Snapshot(repo, revision, commit, files, cached=True)


# --- verification --------------------------------------------------------------------------------

def _verify(path: Path, remote: RemoteFile) -> str | None:
    """``sha256:<hex>`` when the file is what the hub promised; None otherwise."""
    if path.stat().st_size != remote.size:
        return None
    sha, git = hf_cache.digests(path)
    if remote.sha256 and sha != remote.sha256:
        return None
    if remote.git_oid and git != remote.git_oid:
        return None
    return "sha256:" + sha


# --- fetching ------------------------------------------------------------------------------------

def fetch(store, remote: RemoteFile, on_event: Listener | None = None, force: bool = False) -> Fetched:
    """A verified copy of ``remote``: the store's blob when it already holds these bytes, the
    user's Hugging Face cache, or a download that continues from partial bytes left by an
    earlier pull (an HTTP Range request). A file whose digest is wrong is deleted and refused.
    ``on_event`` gets the bytes downloaded (``Progress``) and notes on how the file came. The
    verified file is also placed in the Hugging Face cache, as a hard link (``hf_cache.share``)."""
    fetched = _fetch(store, remote, on_event, force)
    problem = hf_cache.share(remote, fetched.path)
    if problem:
        tell(on_event, problem, "warning")
    return fetched


def _fetch(store, remote: RemoteFile, on_event: Listener | None, force: bool) -> Fetched:

    def log(text: str) -> None:
        tell(on_event, text, "note")

    if remote.sha256 and not force:
        blob = store.blob_path("sha256:" + remote.sha256)
        if blob.is_file() and blob.stat().st_size == remote.size:
            return Fetched(remote, blob, "sha256:" + remote.sha256, owned=False, how="store")
    store.partial.mkdir(parents=True, exist_ok=True)
    part = store.partial / f"{remote.key}.part"
    # One process per file at a time: a second pull of the same thing waits, then finds it done.
    with store.lock(remote.key):
        if remote.sha256 and not force and store.blob_path("sha256:" + remote.sha256).is_file():
            return Fetched(remote, store.blob_path("sha256:" + remote.sha256), "sha256:" + remote.sha256,
                           owned=False, how="store")  # another pull finished it while we waited
        cached = _from_hf_cache(remote, part)
        if cached is not None:
            log(f"{remote.path}: taken from the Hugging Face cache")
            return Fetched(remote, part, cached, owned=True, how="hf-cache")
        if envconfig.offline():
            raise not_cached(remote.label)
        kept = part.stat().st_size if part.is_file() else 0
        if kept > remote.size:
            part.unlink()
            kept = 0
        if not kept and remote.size >= 1_000_000:
            log(f"{remote.path}: downloading {_mb(remote.size)} from {envconfig.hf_endpoint()}/{remote.repo}")
        how = _download(remote, part, on_event, log) if kept < remote.size else "resume"
        digest = _verify(part, remote)
        if digest is None:
            part.unlink(missing_ok=True)
            expected = f"sha256 {remote.sha256}" if remote.sha256 else f"git blob {remote.git_oid}"
            raise CtrloraError(f"{remote.label}: downloaded bytes do not match the hub's {expected}; "
                               f"nothing was kept, pull again (if it repeats, the mirror at "
                               f"{envconfig.hf_endpoint()} is bad)")
        return Fetched(remote, part, digest, owned=True, how=how)


def _from_hf_cache(remote: RemoteFile, part: Path) -> str | None:
    """Copy (or hard-link) the file from the Hugging Face cache into ``part`` when it is there
    and verifies; returns its digest."""
    from huggingface_hub import try_to_load_from_cache

    candidates = []
    found = try_to_load_from_cache(remote.repo, remote.path, cache_dir=str(envconfig.hf_hub_cache()),
                                   revision=remote.commit)
    if isinstance(found, str):
        candidates.append(Path(found))
    blobs = hf_cache.repo_folder(remote.repo) / "blobs"
    for etag in (remote.sha256, remote.git_oid):  # the same bytes cached under another commit
        if etag:
            candidates.append(blobs / etag)
    for candidate in candidates:
        if not candidate.is_file() or candidate.stat().st_size != remote.size:
            continue
        tmp = part.with_suffix(".cache-tmp")
        tmp.unlink(missing_ok=True)
        link_or_copy(os.path.realpath(candidate), tmp)
        digest = _verify(tmp, remote)
        if digest is None:
            tmp.unlink()
            continue
        os.replace(tmp, part)
        return digest
    return None


def _download(remote: RemoteFile, part: Path, callback: Listener | None, log) -> str:
    """Append the missing bytes of ``remote`` to ``part``, asking for them with a Range request.
    Every byte received is on disk before an error surfaces, so a cut at any point, in a file of
    any size, continues from where it stopped: connection drops are retried
    (CTRLORA_DOWNLOAD_RETRIES), and after that the next pull continues. Returns "resume" when
    the server sent only the missing bytes (206) at least once, else "download"; ``log(text)``
    notes it ("resuming at ...") only when the server did."""
    import httpx2
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(remote.repo, remote.path, revision=remote.commit, endpoint=envconfig.hf_endpoint())
    headers = build_hf_headers(library_name="ctrlora")
    left = envconfig.download_retries()
    wait = 1.0
    how = "download"
    while True:
        have = part.stat().st_size if part.is_file() else 0
        before = have
        if have >= remote.size:
            return how
        ask = dict(headers, Range=f"bytes={have}-") if have else headers
        try:
            with get_session().stream("GET", url, headers=ask, follow_redirects=True,
                                      timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                if response.status_code == 416:  # we hold more than the server has: start over
                    part.unlink(missing_ok=True)
                    continue
                if response.status_code >= 400:
                    response.read()  # the hub's error message is in the body
                hf_raise_for_status(response)
                mode = "ab"
                if have and response.status_code == 206:
                    how = "resume"
                    log(f"{remote.path}: resuming at {_mb(have)} of {_mb(remote.size)}")
                elif have:  # the server ignored Range: take it whole
                    log(f"{remote.path}: the server sent the whole file again (it ignored the range request); "
                        f"downloading {_mb(remote.size)} from the start")
                    mode, have = "wb", 0
                with open(part, mode) as f:
                    report(callback, remote.path, have, remote.size)
                    shown = have
                    # Pieces as they arrive (no chunk size: a buffered chunk would be lost in a cut).
                    for piece in response.iter_bytes():
                        f.write(piece)
                        f.flush()  # bytes on disk survive a kill; the next pull continues from them
                        have += len(piece)
                        if have - shown >= CHUNK or have == remote.size:
                            report(callback, remote.path, have, remote.size)
                            shown = have
            if have != remote.size:
                raise httpx2.RemoteProtocolError(f"got {have} of {remote.size} bytes")
            return how
        except (httpx2.TransportError, httpx2.RemoteProtocolError) as exc:
            if part.is_file() and part.stat().st_size > before:
                left, wait = envconfig.download_retries(), 1.0  # progress: the budget starts again
            if left <= 0:
                kept = part.stat().st_size if part.is_file() else 0
                raise CtrloraError(f"{remote.label}: download interrupted ({type(exc).__name__}) with "
                                   f"{_mb(kept)} of {_mb(remote.size)} kept; run the same pull again to "
                                   f"continue") from None
            left -= 1
            time.sleep(wait)
            wait = min(wait * 2, 8.0)
        except Exception as exc:
            raise _hub_error(exc, remote.label) from None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
