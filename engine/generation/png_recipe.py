"""Generated PNGs that carry their own recipe.

Text chunks of each PNG written by ``ctrlora gen``:

- ``ctrlora``: JSON, ``{"format": "ctrlora-gen", "version": 1, "prompt", "negative_prompt", "seed",
  "condition_seed", "steps", "scheduler", "guidance", "strength", "width", "height", "precision",
  "device", "condition_encoding", "base": {"name", "digest"}, "sd": {"name", "digest"},
  "conditions": [{"adapter", "digest", "condition", "weight", "start", "end", "image", "prep"}, ...]}``
- ``ctrlora.condition.<i>``: condition i's image exactly as used (after any ``--prep`` and the
  resize), a base64 PNG, so the file alone reproduces the result (``ctrlora gen --from``).
- ``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``scheduler``, ``guidance``: plain copies for
  image viewers.

Files are written to a temporary file beside the target and renamed: never half-written, and
never over another file unless asked to.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from engine.errors import UsageError
from engine.files import write_atomic

FORMAT, VERSION = "ctrlora-gen", 1
_CONDITION_KEY = "ctrlora.condition.{}"
_PLAIN_KEYS = ("prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance")


def png_bytes(image: Image.Image, info: PngImagePlugin.PngInfo | None = None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path: str | Path, image: Image.Image, recipe: dict | None = None,
             condition_images: list[Image.Image] = (), replace: bool = True) -> Path:
    """Write ``image`` with its recipe and condition images in text chunks, atomically;
    ``replace=False`` raises ``FileExistsError`` rather than replace a file (``engine.files``)."""
    info = PngImagePlugin.PngInfo()
    if recipe is not None:
        recipe = {"format": FORMAT, "version": VERSION, **recipe}
        for key in _PLAIN_KEYS:
            if key in recipe:
                info.add_itxt(key, str(recipe[key]))
        info.add_itxt("ctrlora", json.dumps(recipe, sort_keys=True), zip=True)
        for i, cond in enumerate(condition_images):
            info.add_itxt(_CONDITION_KEY.format(i), base64.b64encode(png_bytes(cond)).decode("ascii"), zip=True)
    return write_atomic(path, png_bytes(image, info), replace)


def read_recipe(path: str | Path) -> tuple[dict, list[Image.Image]]:
    """(recipe, condition images) from a PNG written by ``save_png``."""
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except Exception as exc:
        raise UsageError(f"{path}: not a readable image ({exc})") from None
    if "ctrlora" not in text:
        raise UsageError(f"{path}: holds no ctrlora recipe (only images made by `ctrlora gen` do)")
    try:
        recipe = json.loads(text["ctrlora"])
    except json.JSONDecodeError:
        raise UsageError(f"{path}: its ctrlora recipe is damaged") from None
    if recipe.get("format") != FORMAT or recipe.get("version") != VERSION:
        raise UsageError(f"{path}: recipe version {recipe.get('version')} is not supported")
    images = []
    for i in range(len(recipe.get("conditions", []))):
        data = text.get(_CONDITION_KEY.format(i))
        if data is None:
            raise UsageError(f"{path}: condition image {i} is missing from the recipe")
        images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return recipe, images

