"""One ``ctrlora gen`` request: the options, over the ``--from`` recipe, over the defaults; with
the conditions' images read and the outputs' paths decided, all checked before any model loads."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from ctrlora_cli.gen_conditions import CondSpec, apply_prep, check_prep, output_size, parse_cond, read_image, recipe_specs
from ctrlora_cli.gen_outputs import Outputs, output_paths
from engine.errors import UsageError
from engine.generation.settings import check_sampling

DEFAULTS = dict(negative_prompt="", steps=20, guidance=7.5, scheduler="ddim", strength=1.0)


def read_conditions(from_png: Path | None, cond: list[str], prep: list[str]) -> tuple[dict, list[CondSpec]]:
    """(the recipe of ``--from``, or {}; the conditions): ``--cond`` given replaces the recipe's."""
    recipe, specs = {}, []
    if from_png is not None:
        from engine.generation.png_recipe import read_recipe

        recipe, recipe_images = read_recipe(from_png)
        if recipe.get("format") == "a1111":
            _note_a1111(from_png, recipe, recipe.pop("ignored"))
        if not cond:
            specs = recipe_specs(recipe, recipe_images)
    specs = specs or [parse_cond(c) for c in cond]
    if not specs:
        if recipe.get("format") == "a1111":
            raise UsageError(f"{from_png} holds AUTOMATIC1111 parameters but no CtrLoRA conditions; give them with "
                             "--cond NAME=IMAGE")
        raise UsageError("give at least one condition: --cond NAME=IMAGE (or --from IMAGE.png)")
    apply_prep(specs, prep)
    return recipe, specs


def _note_a1111(path: Path, recipe: dict, ignored: list[str]) -> None:
    """What ``--from`` took from an AUTOMATIC1111 image, and what it left out, as one note."""
    from ctrlora_cli.console import err

    words = {"prompt": "prompt", "negative_prompt": "negative prompt", "seed": "seed", "steps": "steps",
             "width": "size", "guidance": "CFG scale", "scheduler": "sampler"}
    taken = ", ".join(word for key, word in words.items() if recipe.get(key) not in (None, ""))
    left_out = f"; left out {'; '.join(ignored)}" if ignored else ""
    err.print(f"note: {path} holds AUTOMATIC1111 parameters: using its {taken or 'nothing'}{left_out}",
              markup=False, highlight=False, soft_wrap=True)


@dataclass
class GenRequest:
    specs: list[CondSpec]
    images: list  # each condition's image as read, before sizing and --prep
    prompt: str | None  # None until asked for (after every other check)
    settings: dict  # DEFAULTS' keys, decided
    seed: int  # of the first image; image k: seed + k
    condition_seed: int  # of the conditions' latents (a recipe's, when it is made again)
    width: int
    height: int
    outputs: Outputs


def build_request(recipe: dict, specs: list[CondSpec], prompt: str, given: dict, seed: int | None,
                  width: int | None, height: int | None, batch: int, out_path: Path | None, grid: bool = False,
                  force: bool = False) -> GenRequest:
    """``given``: the options among DEFAULTS' keys (None: not given)."""
    settings = {k: recipe.get(k, v) for k, v in DEFAULTS.items()}
    settings.update({k: v for k, v in given.items() if v is not None})
    seed = seed if seed is not None else recipe.get("seed", secrets.randbelow(2**31))
    check_sampling(steps=settings["steps"], guidance=settings["guidance"], strength=settings["strength"],
                   batch=batch, seed=seed, scheduler=settings["scheduler"])
    # The recipe's own image made again: its conditions' latents as they were.
    condition_seed = recipe.get("condition_seed", seed) if recipe and seed == recipe.get("seed") else seed
    if recipe and width is None and height is None:
        width, height = recipe.get("width"), recipe.get("height")
    images = [read_image(spec) for spec in specs]
    width, height = output_size(images[0], width, height)
    outputs = output_paths(out_path, [seed + k for k in range(batch)], grid, force)
    check_prep(specs)
    return GenRequest(specs, images, prompt, settings, seed, condition_seed, width, height, outputs)


def sample(pipe, names: dict, request: GenRequest, models, cond_images, batch: int, callback=None):
    """Run the pipeline for ``request``: each condition's prepared image on its adapter (``names``:
    adapter digest -> name in the pipeline, as ``store.resolve.load_pipeline`` gives them)."""
    from engine.images import image_to_tensor
    from engine.generation.sampling import Condition

    conditions = [Condition(names[digest], image_to_tensor(image), spec.weight, spec.start, spec.end)
                  for spec, (_, _, digest), image in zip(request.specs, models.adapters, cond_images)]
    settings = request.settings
    return pipe(conditions, request.prompt, settings["negative_prompt"], steps=settings["steps"],
                guidance=settings["guidance"], scheduler=settings["scheduler"], seed=request.seed,
                condition_seed=request.condition_seed, width=request.width, height=request.height,
                batch=batch, strength=settings["strength"], callback=callback)
