"""Hub files shared with the Hugging Face cache: one copy on disk, found by every HF tool.

Every file a pull takes from the hub (verified first, ``hub.fetch``) is also placed in the
Hugging Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``) exactly where huggingface_hub puts
its own downloads: ``models--OWNER--NAME/blobs/<etag>`` (the sha256 of an LFS file, the git blob
id of a small one: the hub's ETag), a symbolic link ``snapshots/<commit>/<path>`` to it, and
``refs/<branch>`` naming the commit. The blob is a HARD LINK to the store's own blob (a copy
where the two folders are on different filesystems), so the bytes are on disk once, and
``hf_hub_download``, ``try_to_load_from_cache`` and ``diffusers``' ``from_pretrained`` find them
without a download. The originals of converted files (an official ``.ckpt``) are kept there too,
for the reference code and ComfyUI users who fetch them by name.

The layout is huggingface_hub's own: its folder naming (``repo_folder_name``), pointer paths,
link making and ref writing are called, not rewritten. Removing is its own public API
(``scan_cache_dir().delete_files``), used only when ``ctrlora rm --purge-cache`` asks.
``CTRLORA_SHARE_HF_CACHE=0`` turns sharing off (the cache is still read, never written).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ctrlora_cli import envconfig
from ctrlora_cli.store.store import Manifest, Store, link_or_copy
from engine.files import CHUNK

SMALL = 10_000_000  # files the hub serves without LFS are far smaller; their blobs are named by git blob id


def repo_folder(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return envconfig.hf_hub_cache() / repo_folder_name(repo_id=repo, repo_type="model")


def share(remote, path: Path) -> str | None:
    """Place ``path`` (verified: the bytes of hub file ``remote``) in the HF cache; returns None,
    or one line saying why it could not be (a read-only cache: the pull goes on regardless)."""
    if not envconfig.share_hf_cache():
        return None
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _create_symlink, \
        _get_pointer_path

    etag = remote.sha256 or remote.git_oid
    if not etag:
        return None
    storage = repo_folder(remote.repo)
    blob = storage / "blobs" / etag
    try:
        if not (blob.is_file() and blob.stat().st_size == remote.size):
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(f"{etag}.{os.getpid()}.ctrlora-tmp")
            tmp.unlink(missing_ok=True)
            link_or_copy(path, tmp)  # a hard link: the same bytes as the store's blob
            os.replace(tmp, blob)
        pointer = Path(_get_pointer_path(str(storage), remote.commit, remote.path))
        if not (pointer.exists() and os.path.samefile(pointer, blob)):
            pointer.parent.mkdir(parents=True, exist_ok=True)
            _create_symlink(str(blob), str(pointer), new_blob=False)
        if getattr(remote, "revision", None):
            _cache_commit_hash_for_specific_revision(str(storage), remote.revision, remote.commit)
    except OSError as exc:
        return f"{remote.path}: not shared with the Hugging Face cache ({envconfig.hf_hub_cache()}): {exc.strerror or exc}"
    return None


def digests(path: Path) -> tuple[str, str]:
    """(sha256 hex, git blob id) of a file, in one read: the names the hub and its cache give a
    file's bytes (a small file by its git blob id, sha1 of a header and the bytes; a large one by
    its sha256). Not ``engine.files.sha256_file``: a download is read once for both."""
    size = path.stat().st_size
    sha, git = hashlib.sha256(), hashlib.sha1()
    git.update(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            git.update(chunk)
    return sha.hexdigest(), git.hexdigest()


def _blob_names(store: Store, manifest: Manifest) -> set[str]:
    """The HF cache blob names the entry's bytes go by: the sha256 of each file (and of the
    original it was converted from), the git blob id of each small one."""
    names = {record.digest.split(":", 1)[1] for record in manifest.files}
    if manifest.converted_from and manifest.converted_from.get("sha256"):
        names.add(manifest.converted_from["sha256"])
    for record in manifest.files:
        blob = store.blob_path(record.digest)
        if record.size < SMALL and blob.is_file():
            names.add(digests(blob)[1])
    return names


def cached_files(store: Store, manifests: list[Manifest], keep: list[Manifest] = ()) -> list:
    """The HF cache's files (huggingface_hub ``CachedFileInfo``) holding the bytes of ``manifests``'
    hub entries, leaving out those that entries in ``keep`` hold too."""
    repos = {m.source.get("repo") for m in manifests if m.source.get("type") == "hub"}
    if not repos or not envconfig.hf_hub_cache().is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    wanted = set().union(*(_blob_names(store, m) for m in manifests))
    kept = set().union(set(), *(_blob_names(store, m) for m in keep if m.source.get("repo") in repos))
    info = scan_cache_dir(envconfig.hf_hub_cache())
    return [file for repo in info.repos if repo.repo_type == "model" and repo.repo_id in repos
            for revision in repo.revisions for file in revision.files
            if Path(os.path.realpath(file.blob_path)).name in wanted - kept or file.blob_path.name in wanted - kept]


def cached_size(files) -> int:
    return sum(file.size_on_disk for file in {f.blob_path: f for f in files}.values())


def purge(files) -> int:
    """Delete those files from the HF cache (huggingface_hub's own ``delete_files``: a blob another
    cached file still points to is kept); returns the bytes it expected to free."""
    if not files:
        return 0
    from huggingface_hub import scan_cache_dir

    strategy = scan_cache_dir(envconfig.hf_hub_cache()).delete_files(*files)
    strategy.execute()
    return strategy.expected_freed_size
