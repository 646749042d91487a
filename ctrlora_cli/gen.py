"""``ctrlora gen``: generate images from any number of conditions, each with its own adapter."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ctrlora_cli.completion import cond_values, extractor_kinds
from ctrlora_cli.console import ask, err, go_on_despite, interactive, out, warn
from engine.generation.settings import SCHEDULERS
from ctrlora_cli.options import BaseOpt, DeviceOpt, JsonOpt, PrecisionOpt, SdOpt, SeedOpt, StepsOpt
from ctrlora_cli.options import YesOpt, examples, print_json, retold

GenBaseOpt = retold(BaseOpt, "Base in the store (default: the image's with --from, else the one the adapters were "
                             "made for, else the only one, or 'base').")
GenStepsOpt = retold(StepsOpt, "Denoising steps (default: 20).", optional=True)
GenPrecisionOpt = retold(PrecisionOpt, "auto: fp16 on GPU; on CPU bf16 where it is native (AVX512-BF16, AMX), "
                                       "else fp32 (default: the image's with --from, else auto).", optional=True)
GenSeedOpt = retold(SeedOpt, "Seed of the first image (image k: seed + k) (default: random).", optional=True)


def register(app: typer.Typer) -> None:
    app.command("gen", epilog=examples(
        'ctrlora gen --cond canny=edges.png -p "a cosy cabin"',
        'ctrlora gen -c canny=edges.png:0.8 -c depth=depth.png:1:0-0.6 -p "a cabin"',
        'ctrlora gen -c canny=photo.jpg --prep canny -p "a lake" --negative blurry',
        'ctrlora gen --from cabins/ctrlora-43.png --steps 30 --batch 4 --json',
    ))(gen)


def gen(
    cond: list[str] = typer.Option(None, "--cond", "-c", metavar="NAME=IMAGE[:WEIGHT[:START-END]]",
                                   help="A condition: adapter (store name or .safetensors file) and its image; "
                                        "WEIGHT (default 1.0) and the fraction of steps START-END (default 0-1). "
                                        "Repeat for several.", autocompletion=cond_values),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="What to draw."),
    negative: str | None = typer.Option(None, "--negative", help="What to avoid (default: empty)."),
    base: GenBaseOpt = None,
    sd: SdOpt = None,
    steps: GenStepsOpt = None,
    guidance: float | None = typer.Option(None, "--guidance", help="Classifier-free guidance, at least 0 (default: 7.5)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help=f"{' | '.join(SCHEDULERS)} (default: ddim)."),
    seed: GenSeedOpt = None,
    width: int | None = typer.Option(None, "--width", help="Width, a multiple of 8 up to 4096 (default: the first "
                                                          "condition image's)."),
    height: int | None = typer.Option(None, "--height", help="Height, a multiple of 8 up to 4096 (default: the first "
                                                            "condition image's)."),
    batch: int = typer.Option(1, "--batch", help="Images to make."),
    strength: float | None = typer.Option(None, "--strength", help="Global control scale (default: 1.0)."),
    out_path: Path | None = typer.Option(None, "--out", "-o", help="A .png file, or a folder (default: the current "
                                                                   "folder; new names there never replace a file)."),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists."),
    precision: GenPrecisionOpt = None,
    device: DeviceOpt = "auto",
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the UNet and ControlNet (slow first step)."),
    grid: bool = typer.Option(False, "--grid", help="Also write a sheet with the condition images beside the results."),
    from_png: Path | None = typer.Option(None, "--from", help="Make again from a PNG made by ctrlora gen (options given override)."),
    prep: list[str] = typer.Option(None, "--prep", metavar="[NAME=]KIND",
                                   help="Extract the condition from the image first (e.g. canny); NAME= picks one condition.",
                                   autocompletion=extractor_kinds),
    yes: YesOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Generate images from one or more conditions."""
    from ctrlora_cli.gen_request import build_request, read_conditions

    started = time.perf_counter()
    recipe, specs = read_conditions(from_png, cond or [], prep or [])
    # Cheap checks first (no torch import): ranges, images, size, outputs; then the prompt, the store.
    request = build_request(recipe, specs, None, dict(negative_prompt=negative, steps=steps, guidance=guidance,
                                                      scheduler=scheduler, strength=strength),
                            seed, width, height, batch, out_path, grid, force)
    prompt = prompt if prompt is not None else recipe.get("prompt")
    if prompt is None:
        prompt = ask("Prompt", "give a prompt with -p/--prompt", batch=json_output)
    request.prompt = prompt

    from ctrlora_cli.gen_conditions import prepare
    from ctrlora_cli.store.lookup import find_models
    from ctrlora_cli.store.resolve import load_pipeline
    from ctrlora_cli.store.store import Store

    store = Store()
    models = find_models(store, request.specs, base, sd, recipe, warn=warn)
    go_on_despite(models.base_warnings, yes, batch=json_output)
    cond_images = [prepare(spec, image, request.width, request.height)
                   for spec, image in zip(request.specs, request.images)]

    pipe, names, dev, precision = load_pipeline(models.sd_dir, models.controlnet_dir, models.adapters,
                                                device, precision and precision.value, compile_,
                                                recorded_precision=recipe.get("precision"))
    settings = request.settings
    _warn_long_prompts(pipe.sd.tokenizer, prompt, settings["negative_prompt"])
    load_s = time.perf_counter() - started

    from ctrlora_cli.gen_outputs import recipe_of, summary, write_outputs
    from ctrlora_cli.gen_request import sample
    from ctrlora_cli.progress import progress_bars

    with progress_bars(enabled=interactive() and not json_output,
                       describe=lambda e: f"{e.info.get('step_s', 0):.2f} s/step") as callback:
        result = sample(pipe, names, request, models, cond_images, batch, callback)

    written, grid_path = write_outputs(request.outputs, result, recipe_of(request, models, precision, dev),
                                       cond_images, warn)
    if json_output:
        print_json(summary(request, result, written, grid_path, precision, dev, load_s))
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
