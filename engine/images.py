"""Reading and writing image files with one-line errors and no half-written outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from PIL import Image, UnidentifiedImageError

from engine.errors import UsageError
from engine.files import atomic_path

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


def save_image(image: Image.Image, path: str | Path, **save_args) -> Path:
    """Write atomically (see ``atomic_path``); the format follows the extension."""
    path = check_writable_image_path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=WRITE_FORMATS[path.suffix.lower()], **save_args)
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (3, H, W) float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """The reference preprocessing: resize the short side, then crop the centre.
    ``size`` is a square side or ``(width, height)``."""
    width, height = (size, size) if isinstance(size, int) else size
    scale = max(width / image.width, height / image.height)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(new, Image.BICUBIC)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    return image.crop((left, top, left + width, top + height))
