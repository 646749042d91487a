"""Files written whole or not at all, and file digests: the one place for both.

Every file the project writes for a user (images, adapters, checkpoints, manifests, JSON) goes
through ``atomic_path`` (or ``write_atomic``): a reader sees the old file or the new one, never
half of one, and an interrupted write leaves nothing behind. Every content digest is
``sha256:<hex>`` from ``sha256_file`` / ``sha256_bytes``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

CHUNK = 1 << 20  # bytes read at a time when hashing


@contextmanager
def atomic_path(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temp path in ``path``'s folder to write to; renamed over ``path`` when the block ends
    without an error, removed otherwise. Readers see the old file or the new, never half of one.
    ``replace=False``: an existing ``path`` is kept and ``FileExistsError`` raised instead, also
    when another process creates it while the block runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        if replace:
            os.replace(tmp, path)
        else:
            _rename_new(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rename_new(tmp: Path, path: Path) -> None:
    """``tmp`` renamed to ``path`` only if nothing is there: a hard link fails atomically on an
    existing name; where links cannot be made, the name is checked right before the rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes, replace: bool = True) -> Path:
    """Write text (as UTF-8, whatever the locale) or bytes to ``path`` through ``atomic_path``."""
    with atomic_path(path, replace) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data, **dumps_args) -> Path:
    """``data`` as JSON (indented, keys sorted unless told otherwise) through ``atomic_path``."""
    dumps_args = {"indent": 2, "sort_keys": True, **dumps_args}
    return write_atomic(path, json.dumps(data, **dumps_args))


def sha256_file(path: str | Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """``sha256:<hex>`` of a file; ``on_bytes(n)`` is called after each chunk read (for progress)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return "sha256:" + h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """``sha256:<hex>`` of bytes in memory."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
