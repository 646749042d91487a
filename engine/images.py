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


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] -> a PIL RGB image (each value rounded to the nearest of 256)."""
    array = (tensor.detach().float().cpu().permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


def image_grid(images: list[Image.Image | torch.Tensor], columns: int | None = None, gap: int = 0) -> Image.Image:
    """The images on a white sheet, row by row, ``columns`` to a row (default: one row). Each cell
    is the size of the largest image, the image at its top left, followed by ``gap`` white pixels
    to the right and below. Tensors are (3, H, W) in [0, 1] (``tensor_to_image``).

    Not diffusers' ``make_image_grid``: that one wants a full grid of equal images on black, and
    ``ctrlora gen --grid`` lays out condition images beside results of any count."""
    images = [tensor_to_image(i) if isinstance(i, torch.Tensor) else i.convert("RGB") for i in images]
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    w, h = max(i.width for i in images) + gap, max(i.height for i in images) + gap
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for k, image in enumerate(images):
        sheet.paste(image, ((k % columns) * w, (k // columns) * h))
    return sheet


def resize_center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """The reference preprocessing: resize the short side, then crop the centre.
    ``size`` is a square side or ``(width, height)``."""
    width, height = (size, size) if isinstance(size, int) else size
    scale = max(width / image.width, height / image.height)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(new, Image.BICUBIC)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    return image.crop((left, top, left + width, top + height))
