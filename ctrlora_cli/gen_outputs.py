"""What ``ctrlora gen`` writes: where each image goes, the recipe each PNG carries, the files
themselves, and the ``--json`` summary."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from engine.errors import SettingError, UsageError


@dataclass(frozen=True)
class Target:
    """An output file: ``name`` numbered ``n`` (``numbered``); a name taken while generating
    moves it on to the next free number."""

    name: Path
    n: int = 0

    @property
    def path(self) -> Path:
        return numbered(self.name, self.n)


@dataclass
class Outputs:
    """Where a generation's files go, decided before any model loads."""

    images: list[Target]  # one per image of the batch
    grid: Target | None  # with --grid
    named: bool  # named by --out FILE (else new names in a folder)
    replace: bool  # --force: named files are replaced


def output_paths(out_path: Path | None, seeds: list[int], grid: bool = False, force: bool = False) -> Outputs:
    """``--out x.png`` (``x-K.png`` for a batch, ``x-grid.png``): refused when one exists, unless
    ``force``. A folder (default: the current one): ``ctrlora-<seed>.png`` and
    ``<first>-grid.png``, each taking the next free number (``ctrlora-42-1.png``) when taken."""
    if out_path is not None and out_path.suffix:
        if out_path.suffix.lower() != ".png":
            raise UsageError(f"--out {out_path}: give a .png file or a folder (the recipe lives in PNG text)")
        if out_path.is_dir():
            raise UsageError(f"--out {out_path} is a folder; drop the .png suffix or pick a file name")
        images = [out_path] if len(seeds) == 1 else [out_path.with_name(f"{out_path.stem}-{k}.png")
                                                     for k in range(len(seeds))]
        grid_path = out_path.with_name(f"{out_path.stem}-grid.png") if grid else None
        taken = [p for p in images + [grid_path] if p is not None and os.path.lexists(p)]
        if taken and not force:
            also = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
            raise SettingError("out", f"{taken[0]} already exists{also}; pass --force to replace it, or pick "
                                      "another name")
        return Outputs([Target(p) for p in images], Target(grid_path) if grid else None, named=True, replace=force)
    folder = out_path or Path.cwd()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} exists and is not a folder")
    images: list[Target] = []
    for s in seeds:
        images.append(first_free(Target(folder / f"ctrlora-{s}.png"), images))
    grid_target = first_free(Target(images[0].path.with_name(f"{images[0].path.stem}-grid.png"))) if grid else None
    return Outputs(images, grid_target, named=False, replace=False)


def numbered(path: Path, n: int) -> Path:
    """``path`` itself for 0, else ``stem-n.png`` beside it."""
    return path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")


def first_free(target: Target, taken=()) -> Target:
    """``target``, or the first later number, whose file neither exists nor is in ``taken``."""
    paths = {t.path for t in taken}
    while os.path.lexists(target.path) or target.path in paths:
        target = Target(target.name, target.n + 1)
    return target


def recipe_of(request, models, precision: str, device) -> dict:
    """The recipe every PNG carries (``engine.generation.png_recipe``), less each image's seed."""
    return {
        "prompt": request.prompt, **request.settings, "condition_seed": request.condition_seed,
        "width": request.width, "height": request.height, "precision": precision, "device": str(device),
        "condition_encoding": "sample", **models.made_with,
        "conditions": [{"adapter": spec.name, "digest": digest, "condition": meta.get("condition"),
                        "weight": spec.weight, "start": spec.start, "end": spec.end, "image": spec.image,
                        "prep": spec.prep} for spec, (_, meta, digest) in zip(request.specs, models.adapters)],
    }


def write_outputs(outputs: Outputs, result, recipe: dict, cond_images, warn) -> tuple[list[str], str | None]:
    """Each image with its recipe (its own seed), and the grid; atomically, file by file, and never
    over a file that appeared while generating (the next free name instead; a named one warns)."""
    from engine.images import image_grid as make_grid
    from engine.generation.png_recipe import save_png

    def write(target: Target, image, *args) -> str:
        if outputs.replace:
            return str(save_png(target.path, image, *args))
        for n in itertools.count(target.n):
            try:
                written = save_png(numbered(target.name, n), image, *args, replace=False)
            except FileExistsError:
                continue
            if n != target.n and outputs.named:
                warn(f"{target.path} appeared while generating; wrote {written} instead")
            return str(written)

    try:
        written = [write(target, image, {**recipe, "seed": image_seed}, cond_images)
                   for target, image, image_seed in zip(outputs.images, result.images, result.seeds)]
        # The grid carries the recipe too (its first image's seed; "seeds": every image's).
        grid_path = write(outputs.grid, make_grid(cond_images + list(result.images)),
                          {**recipe, "seed": result.seeds[0], "seeds": list(result.seeds)},
                          cond_images) if outputs.grid else None
    except OSError as exc:
        raise UsageError(f"cannot write the output: {exc}") from None
    return written, grid_path


def summary(request, result, written: list[str], grid_path: str | None, precision: str, device,
            load_s: float) -> dict:
    """``--json``: the files, the settings used and where the time went."""
    timings, steps = result.timings, request.settings["steps"]
    return {"images": written, "grid": grid_path, "seeds": result.seeds, "condition_seed": request.condition_seed,
            "width": request.width, "height": request.height, **request.settings, "device": str(device),
            "precision": precision,
            "seconds": {"load": load_s, "encode": timings["encode"], "denoise": timings["denoise"],
                        "decode": timings["decode"], "per_step": timings["denoise"] / steps}}
