"""What the app's events do, without Gradio: the same request, model lookup, condition
preparation, pipeline call and PNG recipes as ``ctrlora gen`` (``ctrlora_cli.gen_*``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ctrlora_cli.store.store import Store
from ctrlora_cli.webui.warm import WarmModels
from engine.errors import UsageError

# Conditions drawn by hand rather than extracted from a photo: their rows open on a canvas.
SKETCH_LIKE = ("sketch", "hedsketch", "scribble", "lineart", "lineart_anime")

# Added to the prompt / used as the negative prompt; our own wording of the usual SD1.5 presets.
PROMPT_PRESETS = {
    "none": "",
    "quality": "best quality, highly detailed",
    "photo": "photograph, natural lighting, sharp focus, high resolution, detailed texture",
    "illustration": "illustration, clean lines, vivid colours, highly detailed",
}
NEGATIVE_PRESETS = {
    "none": "",
    "general": "low quality, worst quality, blurry, jpeg artifacts, watermark, text, signature",
    "general (long)": "low quality, worst quality, lowres, blurry, jpeg artifacts, noisy, cropped, out of frame, "
                      "duplicate, tiling, deformed, distorted, ugly, watermark, text, signature, logo",
    "people": "bad anatomy, bad proportions, deformed face, extra fingers, missing fingers, fused fingers, "
              "extra limbs, missing limbs, long neck, cross-eyed",
    "photo": "painting, drawing, sketch, cartoon, anime, illustration, cgi, 3d render",
    "painting": "photo, photorealistic, cgi, 3d render",
}


@dataclass
class Row:
    """One condition row: an adapter, its image (a file among the uploads), an optional prep kind."""

    adapter: str | None
    image: str | None
    prep: str | None = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass
class Session:
    """What the app holds for its life: the store, the warm models, where images are written."""

    store: Store
    warm: WarmModels
    out: Path


def choices(store: Store, kind: str) -> list[str]:
    return [m.name for m in store.list() if m.kind == kind]


def adapters_for(store: Store, base: str | None) -> list[str]:
    """The adapters made for ``base`` (``resolve.made_for``), and those that record no base but
    have its architecture."""
    from ctrlora_cli.store.resolve import made_for, recorded_base

    if not base or not store.exists(base):
        return []
    arch = store.get(base).arch
    found = []
    for m in store.list():
        if m.kind != "adapter":
            continue
        record = made_for(store, m.name)
        if (recorded_base(store, record) == base) if record else m.arch == arch:
            found.append(m.name)
    return found


def sketch_like(store: Store, adapter: str | None) -> bool:
    return bool(adapter) and store.exists(adapter) and (store.get(adapter).condition or "") in SKETCH_LIKE


def prep_kinds() -> list[str]:
    """Every kind the extractor registry holds now (built in, and annotators where installed)."""
    from engine.demo.extractors import SPECS

    return sorted(SPECS)


def preview(image_path: str | None, prep: str | None):
    """The condition image as a row would give it to the pipeline at the image's own size."""
    from ctrlora_cli.gen_conditions import CondSpec, output_size, prepare, read_image

    if not image_path:
        return None
    spec = CondSpec("preview", image_path, prep=prep or None)
    image = read_image(spec)
    width, height = output_size(image, None, None)
    return prepare(spec, image, width, height)


def generate(session: Session, base: str | None, sd: str | None, rows: list[Row], prompt: str, negative: str,
             steps: int, guidance: float, scheduler: str, strength: float, seed: int | None, batch: int,
             width: int | None, height: int | None, restored: dict | None = None, progress=None,
             warn=lambda message: None) -> tuple[list[str], dict]:
    """(the PNGs written, a summary); ``restored``: the recipe of a dropped PNG, whose image is made
    again when its seed is used (``ctrlora gen --from``'s condition latents)."""
    from ctrlora_cli.gen_conditions import CondSpec, prepare
    from ctrlora_cli.gen_outputs import recipe_of, write_outputs
    from ctrlora_cli.gen_request import build_request, sample
    from ctrlora_cli.store.lookup import find_models
    from engine.generation.settings import check_condition

    started = time.perf_counter()
    specs = []
    for i, row in enumerate(rows, 1):
        if not row.adapter:
            raise UsageError(f"condition {i}: pick an adapter")
        if not row.image:
            raise UsageError(f"condition {i} ({row.adapter}): give it an image")
        check_condition("cond", f"condition {i} ({row.adapter})", row.weight, row.start, row.end)
        specs.append(CondSpec(row.adapter, row.image, row.weight, row.start, row.end, prep=row.prep or None))
    if not specs:
        raise UsageError("add a condition: an adapter and its image")
    if not (prompt or "").strip():
        raise UsageError("write a prompt: what to draw")
    recipe = {k: v for k, v in (restored or {}).items() if k in ("seed", "condition_seed")}
    given = dict(negative_prompt=negative or "", steps=_whole("steps", steps), guidance=guidance,
                 scheduler=scheduler, strength=strength)
    request = build_request(recipe, specs, prompt, given, seed, width or None, height or None,
                            _whole("batch", batch), session.out)
    models = find_models(session.store, specs, base or None, sd or None, {}, warn=warn)
    for message in models.base_warnings:
        warn(message)
    cond_images = [prepare(spec, image, request.width, request.height)
                   for spec, image in zip(request.specs, request.images)]
    with session.warm.lock:
        pipe, names = session.warm.pipeline(models)
        load_s = time.perf_counter() - started
        result = sample(pipe, names, request, models, cond_images, _whole("batch", batch), progress)
    warm = session.warm
    written, _ = write_outputs(request.outputs, result, recipe_of(request, models, warm.precision, warm.device),
                               cond_images, warn)
    steps_done = request.settings["steps"]
    return written, {"images": written, "seeds": result.seeds, "width": request.width, "height": request.height,
                     "seconds": {"load": round(load_s, 3), "denoise": round(result.timings["denoise"], 3),
                                 "per_step": round(result.timings["denoise"] / steps_done, 4)}}


def _whole(name: str, value) -> int:
    from engine.errors import SettingError

    if value is None or float(value) != int(float(value)):
        raise SettingError(name, f"{name} must be a whole number, not {value!r}")
    return int(float(value))


def restore(store: Store, png_path: str) -> dict:
    """The settings of a PNG made by ``ctrlora gen`` or this app: {"recipe", "rows": [(adapter,
    condition image, weight, start, end)]}; its condition images are stored already prepared."""
    from ctrlora_cli.store.lookup import adapter_by_digest
    from engine.generation.png_recipe import read_recipe

    recipe, images = read_recipe(png_path)
    rows = []
    for entry, image in zip(recipe.get("conditions", []), images):
        rows.append((adapter_by_digest(store, entry.get("digest")) or entry["adapter"], image, float(entry["weight"]),
                     float(entry["start"]), float(entry["end"])))
    return {"recipe": recipe, "rows": rows}



def flatten(path: str | None) -> str | None:
    """A drawing from the canvas (transparent where nothing is drawn) on white, beside it."""
    from PIL import Image

    if not path:
        return None
    with Image.open(path) as image:
        if image.mode not in ("RGBA", "LA", "P"):
            return path
        rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.getchannel("A"))
    target = Path(path).with_name(Path(path).stem + "-flat.png")
    flat.save(target)
    return str(target)
