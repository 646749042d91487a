"""``ctrlora gen``: generate images from any number of conditions, each with its own adapter."""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from ctrlora_cli.console import ask, err, interactive, out, warn
from engine.errors import UsageError

SCHEDULER_NAMES = ("ddim", "unipc", "euler-a", "dpm++")  # engine.generation.sampling.SCHEDULERS (not imported: --help stays fast)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEFAULTS = dict(negative_prompt="", steps=20, guidance=7.5, scheduler="ddim", strength=1.0)
_WINDOW = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*-\s*([0-9]*\.?[0-9]+)\s*$")


@dataclass
class CondSpec:
    """One ``--cond NAME=IMAGE[:WEIGHT[:START-END]]``."""

    name: str  # store adapter name or adapter file path
    image: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    prep: str | None = None
    digest: str | None = None  # from a recipe: the adapter the image was made with
    loaded: object = field(default=None, repr=False)  # from a recipe: the image exactly as used


def parse_cond(spec: str) -> CondSpec:
    """Parse NAME=IMAGE[:WEIGHT[:START-END]]; an IMAGE that exists as a file is taken whole, so
    paths with ':' work."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise UsageError(f"--cond {spec!r}: expected NAME=IMAGE[:WEIGHT[:START-END]]")
    if Path(rest).is_file() or ":" not in rest:
        return CondSpec(name.strip(), rest)
    parts = rest.rsplit(":", 2)
    if len(parts) == 3 and not _WINDOW.match(parts[2]) and not _is_number(parts[1]):
        parts = [parts[0] + ":" + parts[1], parts[2]]  # 'a:b.png:0.5': the image holds a ':'
    image, weight_text = parts[0], parts[1]
    if not _is_number(weight_text):
        raise UsageError(f"--cond {spec!r}: weight {weight_text!r} is not a number")
    weight = float(weight_text)
    start, end = 0.0, 1.0
    if len(parts) == 3:
        match = _WINDOW.match(parts[2])
        if not match:
            raise UsageError(f"--cond {spec!r}: window {parts[2]!r} must be START-END, e.g. 0-0.5")
        start, end = float(match[1]), float(match[2])
        if not (0.0 <= start < end <= 1.0):
            raise UsageError(f"--cond {spec!r}: window {parts[2]!r} must satisfy 0 <= START < END <= 1")
    return CondSpec(name.strip(), image, weight, start, end)


def _is_number(text: str) -> bool:
    try:
        return float(text) == float(text) and abs(float(text)) != float("inf")
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    app.command("gen")(gen)


def gen(
    cond: list[str] = typer.Option(None, "--cond", "-c", metavar="NAME=IMAGE[:WEIGHT[:START-END]]",
                                   help="A condition: adapter (store name or .safetensors file) and its image; "
                                        "WEIGHT (default 1.0) and the fraction of steps START-END (default 0-1). "
                                        "Repeat for several."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="What to draw."),
    negative: str | None = typer.Option(None, "--negative", "-n", help="What to avoid (default: empty)."),
    base: str | None = typer.Option(None, "--base", help="Base in the store (default: the only one, or 'base')."),
    sd: str | None = typer.Option(None, "--sd", help="Stable Diffusion in the store (default: the base's)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Denoising steps (default: 20)."),
    guidance: float | None = typer.Option(None, "--guidance", min=0.0, help="Classifier-free guidance (default: 7.5)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help=f"{' | '.join(SCHEDULER_NAMES)} (default: ddim)."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Seed of the first image (image k: seed + k) (default: random)."),
    width: int | None = typer.Option(None, "--width", min=8, help="Width, a multiple of 8 (default: the first condition image's)."),
    height: int | None = typer.Option(None, "--height", min=8, help="Height, a multiple of 8 (default: the first condition image's)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Images to make."),
    strength: float | None = typer.Option(None, "--strength", help="Global control scale (default: 1.0)."),
    out_path: Path | None = typer.Option(None, "--out", "-o", help="A .png file, or a folder (default: the current folder)."),
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | fp16 | bf16 (auto: fp16 on GPU, fp32 on CPU)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the UNet and ControlNet (slow first step)."),
    grid: bool = typer.Option(False, "--grid", help="Also write a sheet with the condition images beside the results."),
    from_png: Path | None = typer.Option(None, "--from", help="Make again from a PNG made by ctrlora gen (options given override)."),
    prep: list[str] = typer.Option(None, "--prep", metavar="[NAME=]KIND",
                                   help="Extract the condition from the image first (e.g. canny); NAME= picks one condition."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the paths."),
) -> None:
    """Generate images from one or more conditions."""
    started = time.perf_counter()
    recipe, specs = {}, []
    if from_png is not None:
        from engine.generation.png_recipe import read_recipe

        recipe, recipe_images = read_recipe(from_png)
        if not cond:
            specs = _recipe_specs(recipe, recipe_images)
    specs = specs or [parse_cond(c) for c in cond or []]
    if not specs:
        raise UsageError("give at least one condition: --cond NAME=IMAGE (or --from IMAGE.png)")
    _apply_prep(specs, prep or [])

    prompt = prompt if prompt is not None else recipe.get("prompt")
    if prompt is None:
        prompt = ask("Prompt", "give a prompt with -p/--prompt", batch=json_output)
    settings = {k: recipe.get(k, v) for k, v in DEFAULTS.items()}
    given = dict(negative_prompt=negative, steps=steps, guidance=guidance, scheduler=scheduler, strength=strength)
    settings.update({k: v for k, v in given.items() if v is not None})
    if settings["scheduler"] not in SCHEDULER_NAMES:
        raise UsageError(f"unknown scheduler {settings['scheduler']!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    seed = seed if seed is not None else recipe.get("seed", secrets.randbelow(2**31))
    condition_seed = recipe.get("condition_seed", seed) if from_png is not None and seed == recipe.get("seed") else seed
    if recipe and width is None and height is None:
        width, height = recipe.get("width"), recipe.get("height")

    # Cheap checks first (no torch import): images, size, outputs, then the store.
    images = [_read_image(spec) for spec in specs]
    width, height = _size(images[0], width, height)
    targets = _output_paths(out_path, [seed + k for k in range(batch)])
    _check_prep(specs)

    from ctrlora_cli.store.resolve import default_base, load_pipeline
    from ctrlora_cli.store.store import NotInStore, Store

    store = Store()
    try:
        base_name = base or recipe.get("base", {}).get("name") or default_base(store)
        recipe_sd = recipe.get("sd", {}) if not base else {}  # another base: its own SD
        sd = sd or _find(store, "sd", recipe_sd)
        if recipe_sd and not sd:
            warn(f"sd {recipe_sd.get('name')!r} that made the image is not in the store; using the base's")
        base_manifest, cn_dir, sd_dir = _base(store, base_name, sd, recipe)
        adapters = [_adapter(store, spec, base_manifest) for spec in specs]
    except NotInStore as exc:
        raise UsageError(str(exc)) from None
    cond_images = [_prepare(spec, image, width, height) for spec, image in zip(specs, images)]

    pipe, names, dev, precision = load_pipeline(sd_dir, cn_dir, adapters, device, precision, compile_)
    _warn_long_prompts(pipe.sd.tokenizer, prompt, settings["negative_prompt"])
    from engine.images import image_to_tensor
    from engine.generation.sampling import Condition

    conditions = [Condition(names[digest], image_to_tensor(image), spec.weight, spec.start, spec.end)
                  for spec, (_, _, digest), image in zip(specs, adapters, cond_images)]
    load_s = time.perf_counter() - started

    from ctrlora_cli.progress import progress_bars

    with progress_bars(enabled=interactive() and not json_output,
                       describe=lambda e: f"{e.info.get('step_s', 0):.2f} s/step") as callback:
        result = pipe(conditions, prompt, settings["negative_prompt"], steps=settings["steps"],
                      guidance=settings["guidance"], scheduler=settings["scheduler"], seed=seed,
                      condition_seed=condition_seed, width=width, height=height, batch=batch,
                      strength=settings["strength"], callback=callback)

    made = {
        "prompt": prompt, **settings, "condition_seed": condition_seed, "width": width, "height": height,
        "precision": precision, "device": str(dev), "condition_encoding": "sample",
        "base": {"name": base_manifest.name, "digest": entry_digest(base_manifest)},
        "sd": {"name": Path(sd_dir).name, "digest": entry_digest(store.get(Path(sd_dir).name))},
        "conditions": [{"adapter": spec.name, "digest": digest, "condition": meta.get("condition"),
                        "weight": spec.weight, "start": spec.start, "end": spec.end, "image": spec.image,
                        "prep": spec.prep} for spec, (_, meta, digest) in zip(specs, adapters)],
    }
    written, grid_path = _write_outputs(targets, result, made, cond_images, grid)
    if json_output:
        timings = result.timings
        summary = {"images": written, "grid": grid_path, "seeds": result.seeds, "condition_seed": condition_seed,
                   "width": width, "height": height, **settings, "device": str(dev), "precision": precision,
                   "seconds": {"load": load_s, "encode": timings["encode"], "denoise": timings["denoise"],
                               "decode": timings["decode"], "per_step": timings["denoise"] / settings["steps"]}}
        typer.echo(json.dumps(summary, indent=2))
        return
    for path in written + ([grid_path] if grid_path else []):
        out.print(path, highlight=False, soft_wrap=True)
    if interactive():
        err.print(f"{settings['steps']} steps in {result.timings['denoise']:.1f} s "
                  f"({result.timings['denoise'] / settings['steps']:.2f} s/step)", highlight=False)


def _warn_long_prompts(tokenizer, prompt: str, negative: str) -> None:
    from engine.generation.sampling import prompt_overflow

    for label, text in (("prompt", prompt), ("negative prompt", negative)):
        extra = prompt_overflow(tokenizer, text)
        if extra:
            warn(f"the {label} is {extra} tokens longer than the text encoder reads "
                 f"({tokenizer.model_max_length}); its end is cut off")


def _write_outputs(targets: list[Path], result, made: dict, cond_images, grid: bool) -> tuple[list[str], str | None]:
    """Each image with its recipe (its own seed), and the grid; atomically, file by file."""
    from engine.images import image_grid as make_grid
    from engine.generation.png_recipe import save_png

    written, grid_path = [], None
    try:
        for target, image, image_seed in zip(targets, result.images, result.seeds):
            written.append(str(save_png(target, image, {**made, "seed": image_seed}, cond_images)))
        if grid:
            grid_path = str(save_png(targets[0].with_name(targets[0].stem + "-grid.png"),
                                     make_grid(cond_images + list(result.images))))
    except OSError as exc:
        raise UsageError(f"cannot write the output: {exc}") from None
    return written, grid_path


# -- inputs -------------------------------------------------------------------------------------

def _recipe_specs(recipe: dict, images) -> list[CondSpec]:
    specs = []
    for entry, image in zip(recipe.get("conditions", []), images):
        spec = CondSpec(entry["adapter"], entry.get("image", "(from recipe)"), float(entry["weight"]),
                        float(entry["start"]), float(entry["end"]), prep=entry.get("prep"), digest=entry.get("digest"))
        spec.loaded = image  # the exact condition image used (already prepared and sized)
        specs.append(spec)
    return specs


def _apply_prep(specs: list[CondSpec], preps: list[str]) -> None:
    for item in preps:
        name, sep, kind = item.rpartition("=")
        chosen = [s for s in specs if s.name == name] if sep else specs
        if sep and not chosen:
            raise UsageError(f"--prep {item!r}: no --cond names adapter {name!r}")
        if not kind:
            raise UsageError(f"--prep {item!r}: expected [NAME=]KIND, e.g. canny")
        chosen = [s for s in chosen if s.loaded is None]  # a recipe's images are stored prepared
        for spec in chosen:
            if spec.prep is None or sep:
                spec.prep = kind


def _check_prep(specs: list[CondSpec]) -> None:
    from engine.demo.extractors import EXTRACTORS, extract

    for spec in specs:
        if spec.prep and spec.loaded is None and spec.prep not in EXTRACTORS:
            extract(spec.prep, None)  # raises the registry's one-line explanation


def _read_image(spec: CondSpec):
    from PIL import Image, UnidentifiedImageError

    if spec.loaded is not None:
        return spec.loaded
    path = Path(spec.image)
    if not path.is_file():
        raise UsageError(f"condition image {spec.image!r} not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"condition image {spec.image!r} is not a readable image ({exc})") from None


def _size(first, width: int | None, height: int | None) -> tuple[int, int]:
    """Both given; or one, the other keeping the first image's aspect; or the image's own size,
    rounded down to multiples of 8."""
    for label, value in (("--width", width), ("--height", height)):
        if value is not None and value % 8:
            raise UsageError(f"{label} {value} is not a multiple of 8")
    if width is None and height is None:
        width, height = first.width, first.height
    elif width is None:
        width = round(first.width * height / first.height)
    elif height is None:
        height = round(first.height * width / first.width)
    width, height = width - width % 8, height - height % 8
    if width < 8 or height < 8:
        raise UsageError(f"the condition image is too small ({first.width}x{first.height}); give --width/--height")
    return width, height


def _prepare(spec: CondSpec, image, width: int, height: int):
    from engine.images import resize_center_crop

    if image.size != (width, height):
        image = resize_center_crop(image, (width, height))
    if spec.prep and spec.loaded is None:  # a recipe's image is stored already prepared
        from engine.demo.extractors import extract

        image = extract(spec.prep, image).convert("RGB")
        if image.size != (width, height):
            image = resize_center_crop(image, (width, height))
    return image


# -- the store --------------------------------------------------------------------------------

def _base(store, name: str, sd: str | None, recipe: dict):
    """(manifest, ControlNet folder, SD folder) of the base; for a recipe, the very base that
    made the image when the store still holds it (found by digest)."""
    from ctrlora_cli.store.resolve import base_folders

    if recipe.get("base", {}).get("name") == name:
        name = _find(store, "base", recipe["base"]) or name
    return base_folders(store, name, sd)


def _find(store, kind: str, wanted: dict) -> str | None:
    """A recipe's entry ({"name", "digest"}): the named entry if its digest matches, else any
    entry of that kind with the digest, else the named one with a warning, else None."""
    name, digest = wanted.get("name"), wanted.get("digest")
    if not name:
        return None
    if store.exists(name) and entry_digest(store.get(name)) == digest:
        return name
    same = [m.name for m in store.list() if m.kind == kind and entry_digest(m) == digest]
    if same:
        return same[0]
    if store.exists(name):
        warn(f"{kind} {name!r} differs from the one that made the image; the result will differ")
        return name
    return None


def _adapter(store, spec: CondSpec, base_manifest):
    """(path, metadata, digest) of a condition's adapter, checked against the base."""
    from ctrlora_cli.store.resolve import adapter_file
    from engine.files import sha256_file

    if spec.digest:  # from a recipe: the very adapter the image was made with, wherever it is now
        for m in store.list():
            if m.kind == "adapter" and any(f.path == "adapter.safetensors" and f.digest == spec.digest for f in m.files):
                spec.name = m.name
                break
        else:
            if _exists(store, spec.name):
                warn(f"adapter {spec.name!r} differs from the one that made the image; the result will differ")
            else:
                raise UsageError(f"adapter {spec.name!r} ({spec.digest[:19]}) that made the image is not in the store")
    if not _exists(store, spec.name):
        raise UsageError(f"unknown adapter {spec.name!r}: not in the store and not an adapter file "
                         "(list adapters with: ctrlora list)")
    path, meta = adapter_file(store, spec.name, base_manifest)
    if Path(spec.name).is_file():
        return path, meta, sha256_file(Path(path))
    record = next(f for f in store.get(spec.name).files if f.path == "adapter.safetensors")
    # The entry's view: the blob itself has no .safetensors suffix, which the loader goes by.
    return store.folder(spec.name) / "adapter.safetensors", meta, record.digest


def _exists(store, name: str) -> bool:
    path = Path(name)
    if path.suffix == ".safetensors" or "/" in name:
        return path.is_file()
    try:
        return store.exists(name)
    except UsageError:  # not a valid store name
        return False


def entry_digest(manifest) -> str:
    """One digest for a whole store entry (its files' paths and digests)."""
    import hashlib

    lines = "\n".join(f"{f.path} {f.digest}" for f in sorted(manifest.files, key=lambda f: f.path))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


# -- outputs ----------------------------------------------------------------------------------

def _output_paths(out_path: Path | None, seeds: list[int]) -> list[Path]:
    """Where each image goes: ``x.png`` (``x-K.png`` for a batch), or new names in a folder."""
    if out_path is not None and out_path.suffix:
        if out_path.suffix.lower() != ".png":
            raise UsageError(f"--out {out_path}: give a .png file or a folder (the recipe lives in PNG text)")
        if out_path.is_dir():
            raise UsageError(f"--out {out_path} is a folder; drop the .png suffix or pick a file name")
        if len(seeds) == 1:
            return [out_path]
        return [out_path.with_name(f"{out_path.stem}-{k}.png") for k in range(len(seeds))]
    folder = out_path or Path.cwd()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} exists and is not a folder")
    paths = []
    for s in seeds:
        path, n = folder / f"ctrlora-{s}.png", 1
        while path.exists() or path in paths:
            path, n = folder / f"ctrlora-{s}-{n}.png", n + 1
        paths.append(path)
    return paths
