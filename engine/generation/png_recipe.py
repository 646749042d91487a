"""Generated PNGs that carry their own recipe.

Text chunks of each PNG written by ``ctrlora gen`` (grids too):

- ``parameters``: the recipe as AUTOMATIC1111 writes it (``a1111_parameters``), which A1111's PNG
  Info, Civitai and most image browsers show: the prompt, a ``Negative prompt:`` line, then
  ``Steps: .., Sampler: .., CFG scale: .., Seed: .., Size: WxH, Model hash: .., Model: ..,
  CtrLoRA base: .., CtrLoRA: "name:weight:start-end, ..."``.
- ``ctrlora``: JSON, ``{"format": "ctrlora-gen", "version": 1, "prompt", "negative_prompt", "seed",
  "condition_seed", "steps", "scheduler", "guidance", "strength", "width", "height", "precision",
  "device", "condition_encoding", "base": {"name", "digest"}, "sd": {"name", "digest"},
  "conditions": [{"adapter", "digest", "condition", "weight", "start", "end", "image", "prep"}, ...]}``
- ``ctrlora.condition.<i>``: condition i's image exactly as used (after any ``--prep`` and the
  resize), a base64 PNG, so the file alone reproduces the result (``ctrlora gen --from``).

No chunk is named ``prompt`` or ``workflow``: ComfyUI reads those as its JSON graph. PNGs of
earlier versions also hold plain ``prompt``, ``negative_prompt``, ``seed``, ``steps``,
``scheduler`` and ``guidance`` chunks; they are read as before (from their ``ctrlora`` chunk).
A PNG with only a ``parameters`` chunk (made by A1111 or a tool that writes its format) gives
what ctrlora can use of it (``recipe_from_parameters``).

Files are written to a temporary file beside the target and renamed: never half-written, and
never over another file unless asked to.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from engine.errors import UsageError
from engine.files import write_atomic

FORMAT, VERSION = "ctrlora-gen", 1
RECIPE_KEY, PARAMETERS_KEY = "ctrlora", "parameters"
_CONDITION_KEY = "ctrlora.condition.{}"
# Our schedulers as A1111 names its samplers (engine.generation.settings.SCHEDULERS).
A1111_SAMPLERS = {"ddim": "DDIM", "unipc": "UniPC", "euler-a": "Euler a", "dpm++": "DPM++ 2M"}
# One "Key: value" of A1111's last line; a value is plain (no comma) or a JSON string.
_FIELD = re.compile(r'\s*(\w[^:,"\n]*):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


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
        info.add_text(PARAMETERS_KEY, a1111_parameters(recipe))  # tEXt (iTXt when not Latin-1), as A1111
        info.add_itxt(RECIPE_KEY, json.dumps(recipe, sort_keys=True), zip=True)
        for i, cond in enumerate(condition_images):
            info.add_itxt(_CONDITION_KEY.format(i), base64.b64encode(png_bytes(cond)).decode("ascii"), zip=True)
    return write_atomic(path, png_bytes(image, info), replace)


# -- AUTOMATIC1111's "parameters" text ---------------------------------------------------------

def a1111_parameters(recipe: dict) -> str:
    """The recipe in A1111's infotext form: the prompt; ``Negative prompt: ...`` when there is
    one; then one line of ``Key: value`` fields, a value holding ``,``, ``:`` or a newline
    written as a JSON string. ``Model hash`` is A1111's: the first 10 hex digits of the
    SHA-256 of the checkpoint file, given only when the SD model came from one file
    (``recipe["sd"]["checkpoint_sha256"]``)."""
    sd = recipe.get("sd") or {}
    checkpoint = (sd.get("checkpoint_sha256") or "").removeprefix("sha256:")
    conditions = ", ".join(f"{c['adapter']}:{_number(c['weight'])}:{_number(c['start'])}-{_number(c['end'])}"
                           for c in recipe.get("conditions", []))
    fields = {
        "Steps": recipe.get("steps"),
        "Sampler": A1111_SAMPLERS.get(recipe.get("scheduler"), recipe.get("scheduler")),
        "CFG scale": _number(recipe["guidance"]) if "guidance" in recipe else None,
        "Seed": recipe.get("seed"),
        "Size": f"{recipe['width']}x{recipe['height']}" if "width" in recipe else None,
        "Model hash": checkpoint[:10] or None,
        "Model": sd.get("name"),
        "CtrLoRA base": (recipe.get("base") or {}).get("name"),
        "CtrLoRA": conditions or None,
        "CtrLoRA strength": _number(recipe["strength"]) if recipe.get("strength", 1.0) != 1.0 else None,
    }
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None)
    negative = recipe.get("negative_prompt") or ""
    text = f"{recipe.get('prompt') or ''}" + (f"\nNegative prompt: {negative}" if negative else "") + f"\n{line}"
    return text.strip()


def _number(value) -> str:
    return f"{float(value):g}"


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) of an A1111 ``parameters`` text: its last line holds the
    fields when at least three ``Key: value`` pairs are found there (as A1111 reads it)."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in _FIELD.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        fields[key.strip()] = value.strip() if isinstance(value, str) else value
    return "\n".join(prompt), "\n".join(negative), fields


def recipe_from_parameters(text: str) -> tuple[dict, list[str]]:
    """What ``ctrlora gen --from`` can use of an A1111 ``parameters`` text: (a partial recipe with
    prompt, negative prompt, seed, steps, size, guidance and the scheduler when it is one of
    ours; the fields left out, as "Key: value (why)")."""
    prompt, negative, fields = parse_parameters(text)
    recipe: dict = {"prompt": prompt, "negative_prompt": negative, "conditions": []}
    readers = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int)}
    samplers = {name: ours for ours, name in A1111_SAMPLERS.items()}
    ignored = []
    for key, value in fields.items():
        try:
            if key in readers:
                recipe[readers[key][0]] = readers[key][1](value)
            elif key == "Size" and _SIZE.match(value):
                recipe["width"], recipe["height"] = (int(v) for v in _SIZE.match(value).groups())
            elif key == "Sampler" and value in samplers:
                recipe["scheduler"] = samplers[value]
            else:
                ignored.append(f"{key}: {value}")
        except ValueError:
            ignored.append(f"{key}: {value} (not a number)")
    return recipe, ignored


# -- reading -----------------------------------------------------------------------------------

def read_recipe(path: str | Path) -> tuple[dict, list[Image.Image]]:
    """(recipe, condition images) from a PNG written by ``save_png`` (of any version); from a PNG
    with only A1111 ``parameters``: ``recipe_from_parameters``'s recipe, with ``"format":
    "a1111"`` and ``"ignored"`` (the fields left out), and no images."""
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except Exception as exc:
        raise UsageError(f"{path}: not a readable image ({exc})") from None
    if RECIPE_KEY not in text:
        if PARAMETERS_KEY in text:
            recipe, ignored = recipe_from_parameters(text[PARAMETERS_KEY])
            return {"format": "a1111", **recipe, "ignored": ignored}, []
        raise UsageError(f"{path}: holds no ctrlora recipe nor AUTOMATIC1111 parameters (only images made by "
                         "`ctrlora gen` or tools that write A1111's `parameters` text do)")
    try:
        recipe = json.loads(text[RECIPE_KEY])
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
