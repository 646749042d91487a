"""Names in the store: what an entry can be called (1-64 characters of ``a-z 0-9 . _ -``), a name
made from a file or repository name, and the kinds of entry."""

from __future__ import annotations

import re

from engine.errors import UsageError

KINDS = ("base", "adapter", "sd", "annotator")
_NAME = re.compile(r"^[a-z0-9._-]{1,64}$")


def validate_name(name: str) -> str:
    if not _NAME.match(name or "") or name in (".", "..") or ".." in name:
        raise UsageError(f"invalid name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-' (no '..')")
    return name


def name_from(stem: str) -> str:
    """A store name from a file or repository name: lower case, other characters as '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")[:64] or "model"
    return validate_name(re.sub(r"\.\.+", ".", name))
