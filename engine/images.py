"""Reading and writing image files with one-line errors and no half-written outputs."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError

from engine.errors import UsageError

# Extensions we write, and the PIL format each one means.
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB, fully read (so the file can be replaced afterwards)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"image not found: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as an image ({_first_line(exc)})") from None


def check_writable_image_path(path: str | Path) -> Path:
    """Refuse, before any work is done, an output path we could not write an image to."""
    path = Path(path)
    if path.suffix.lower() not in WRITE_FORMATS:
        raise UsageError(f"cannot tell the image format of {path}; end the name with "
                         f"{', '.join(sorted(WRITE_FORMATS))}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name such as {path / 'out.png'}")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path in ``path``'s folder to write to; renamed over ``path`` when the block ends
    without an error, removed otherwise. Readers see the old file or the new, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_image(image: Image.Image, path: str | Path, **save_args) -> Path:
    """Write atomically (see ``atomic_path``); the format follows the extension."""
    path = check_writable_image_path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=WRITE_FORMATS[path.suffix.lower()], **save_args)
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
