"""A Stable Diffusion model in diffusers layout, as the store keeps it: which files of a
repository or folder to take, and those files ready for the store (pickled weights rewritten as
safetensors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ctrlora_cli.store.store import Staged
from engine.errors import UsageError

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_PICKLED = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "pytorch_model"}


def select_sd_files(paths, variant: str | None, where: str) -> dict[str, str]:
    """{path in the entry: path in the source} for a diffusers-layout SD: each part's configs and
    tokenizer files, and one set of weights (the ``variant`` where published, saved under the
    plain name so loaders need no variant; pickled ``.bin`` only when no safetensors exist)."""
    paths = set(paths)
    chosen = {"model_index.json": "model_index.json"} if "model_index.json" in paths else {}
    for part in SD_PARTS:
        inside = sorted(p for p in paths if p.startswith(part + "/") and "/" not in p[len(part) + 1:])
        if not inside:
            raise UsageError(f"{where}: no {part}/ folder: not a Stable Diffusion model in diffusers layout")
        for p in inside:
            if p.endswith((".json", ".txt")) and not p.endswith(".index.json"):
                chosen[p] = p
        if part not in _WEIGHTS:
            continue
        plain = f"{part}/{_WEIGHTS[part]}.safetensors"
        pickled = f"{part}/{_PICKLED[part]}"
        options = ([f"{part}/{_WEIGHTS[part]}.{variant}.safetensors"] if variant else []) + [plain]
        options += ([f"{pickled}.{variant}.bin"] if variant else []) + [f"{pickled}.bin"]
        pick = next((o for o in options if o in paths), None)
        if pick:
            chosen[plain] = pick
            continue
        shards = sorted(p for p in inside if re.fullmatch(rf"{re.escape(part)}/{_WEIGHTS[part]}-\d+-of-\d+\.safetensors", p))
        index = f"{plain}.index.json"
        if shards and index in paths:
            chosen.update({p: p for p in shards + [index]})
            continue
        raise UsageError(f"{where}: no weights for {part}/ (looked for {', '.join(options)})")
    return chosen


def entry_files(chosen: dict[str, str], paths: dict[str, Path], digests: dict[str, str] | None,
                tmp: Path) -> dict:
    """Entry files for a chosen SD layout ({path in the entry: file}): pickled weights rewritten
    as safetensors in ``tmp``, the rest as is (``Staged`` when ``digests`` says they are verified
    downloads)."""
    files = {}
    for dest, src in chosen.items():
        if src.endswith(".bin"):
            from engine.formats.detect import bin_to_safetensors

            out_path = tmp / dest
            out_path.parent.mkdir(parents=True, exist_ok=True)
            bin_to_safetensors(paths[dest], out_path)
            files[dest] = out_path
        elif digests is not None:
            files[dest] = Staged(paths[dest], digests[dest])
        else:
            files[dest] = paths[dest]
    return files


def used_variant(chosen: dict[str, str]) -> str:
    return "fp16" if any(".fp16." in src for src in chosen.values()) else "default"


def unet_arch(files: dict) -> str:
    """The architecture id of the SD whose entry files are ``files``."""
    from engine.models.arch import arch_id

    config = files["unet/config.json"]
    path = config.path if isinstance(config, Staged) else config
    return arch_id(json.loads(Path(path).read_text()))
