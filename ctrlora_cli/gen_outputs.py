"""What ``ctrlora gen`` writes: where each image goes, the recipe each PNG carries, the files
themselves, and the ``--json`` summary."""

from __future__ import annotations

from pathlib import Path

from engine.errors import UsageError


def output_paths(out_path: Path | None, seeds: list[int]) -> list[Path]:
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


def write_outputs(targets: list[Path], result, recipe: dict, cond_images, grid: bool) -> tuple[list[str], str | None]:
    """Each image with its recipe (its own seed), and the grid; atomically, file by file."""
    from engine.images import image_grid as make_grid
    from engine.generation.png_recipe import save_png

    written, grid_path = [], None
    try:
        for target, image, image_seed in zip(targets, result.images, result.seeds):
            written.append(str(save_png(target, image, {**recipe, "seed": image_seed}, cond_images)))
        if grid:
            grid_path = str(save_png(targets[0].with_name(targets[0].stem + "-grid.png"),
                                     make_grid(cond_images + list(result.images))))
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
