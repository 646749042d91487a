"""Turning checkpoint files into what the store keeps: a Base ControlNet folder, an adapter file,
or a Stable Diffusion folder in diffusers layout, all safetensors (no later load unpickles).

Which kind a file is and which architecture it has are read from its keys and shapes: every
preset is tried and the first whose key-by-key check passes is taken.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.errors import CheckpointError
from engine.formats.official import LDM_CONTROL_PREFIX, LDM_UNET_PREFIX, convert_ldm_unet, convert_official_adapter, \
    convert_official_base
from engine.models.state import check_keys
from engine.models.presets import PRESETS, SCHEDULER_CONFIG, text_encoder_config, unet_config, vae_config

LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
WEIGHTS = "diffusion_pytorch_model.safetensors"


def classify(state: dict[str, torch.Tensor]) -> str:
    """``official-base`` | ``official-adapter`` | ``ldm-sd`` | ``unknown``, from the key names."""
    keys = list(state)
    if keys and all(k.startswith(LDM_CONTROL_PREFIX) for k in keys):
        # Only a whole ControlNet has the first conv; adapter files carry LoRA, zero convs and norms.
        return "official-base" if LDM_CONTROL_PREFIX + "input_blocks.0.0.weight" in state else "official-adapter"
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return "ldm-sd"
    return "unknown"


def controlnet_config(preset: str) -> dict:
    from engine.models.controlnet import BaseControlNetModel

    return BaseControlNetModel.config_from_unet(unet_config(preset))


def _first_fit(convert, configs: list[tuple[str, dict]], what: str):
    """``(arch, config, result)`` for the first config ``convert(config)`` accepts."""
    errors = []
    for arch, config in configs:
        try:
            return arch, config, convert(config)
        except (CheckpointError, KeyError, IndexError, ValueError, RuntimeError) as exc:
            errors.append(f"{arch}: {exc}")
    names = ", ".join(arch for arch, _ in configs)
    detail = errors[0] if len(errors) == 1 else f"{errors[0]} ..."
    raise CheckpointError(f"{what}: fits no known architecture ({names}); {detail}")


def preset_configs() -> list[tuple[str, dict]]:
    return [(preset, controlnet_config(preset)) for preset in PRESETS]


def import_official_base(state, folder: str | Path, configs: list[tuple[str, dict]], what: str = "base"):
    """Write an official base file as a Base ControlNet folder (config.json + safetensors).
    Returns ``(arch, config, embedded_rank)``; the condition the base file also carries is not
    kept (every adapter brings its own)."""
    from engine.models.adapters import adapter_rank
    from engine.models.controlnet import BaseControlNetModel

    arch, config, (base, embedded) = _first_fit(lambda cfg: convert_official_base(state, cfg, what), configs, what)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        BaseControlNetModel(**config).save_config(folder)  # config.json exactly as save_pretrained writes it
    save_file({k: v.contiguous() for k, v in base.items()}, str(folder / WEIGHTS), metadata={"format": "pt"})
    return arch, config, (adapter_rank(embedded) if embedded else None)


def import_official_adapter(state, configs: list[tuple[str, dict]], what: str = "adapter"):
    """An official adapter file in our keys: ``(arch, config, state_dict, rank)``."""
    from engine.models.adapters import adapter_rank

    arch, config, mapped = _first_fit(lambda cfg: convert_official_adapter(state, cfg, what), configs, what)
    return arch, config, mapped, adapter_rank(mapped)


def import_ldm_sd(state, folder: str | Path, tokenizer_dir: str | Path | None = None,
                  presets: tuple[str, ...] = PRESETS, what: str = "checkpoint") -> str:
    """Write a single-file ldm Stable Diffusion checkpoint (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.transformer.*``) as a diffusers-layout folder.
    Configs come from the presets (nothing is fetched); diffusers' single-file converters map the
    keys. ``tokenizer_dir`` holds the CLIP tokenizer's files (the ``tiny`` preset builds its own).
    Returns the preset's name."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    if any(k.startswith("cond_stage_model.model.") for k in state):
        raise CheckpointError(f"{what}: an OpenCLIP text encoder (Stable Diffusion 2.x): CtrLoRA runs on SD1.5")
    for prefix, part in ((LDM_VAE_PREFIX, "VAE"), (LDM_CLIP_PREFIX, "text encoder")):
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{what}: no {part} ('{prefix}*' keys): not a complete single-file SD1.5 checkpoint")
    configs = [(p, unet_config(p)) for p in presets]
    preset, ucfg, unet_sd = _first_fit(lambda cfg: convert_ldm_unet(state, cfg, what), configs, what)

    vcfg = vae_config(preset)
    vae_sd = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_VAE_PREFIX)}, vcfg)
    tcfg = CLIPTextConfig(**text_encoder_config(preset))
    text_sd = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_CLIP_PREFIX)})
    with torch.device("meta"):
        unet, vae, text = UNet2DConditionModel(**ucfg), AutoencoderKL(**vcfg), CLIPTextModel(tcfg)
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); the files keep the
    # published layout with the prefix, which every version loads.
    flat = not hasattr(text, "text_model")
    text_keys = {("text_model." + k if flat else k): tuple(v.shape) for k, v in text.state_dict().items()}
    text_sd = {k: v for k, v in text_sd.items() if k in text_keys or not k.endswith("position_ids")}
    check_keys(vae_sd, {k: tuple(v.shape) for k, v in vae.state_dict().items()}, f"{what} (VAE)")
    check_keys(text_sd, text_keys, f"{what} (text encoder)")

    folder = Path(folder)
    for name, model, weights, sd in (("unet", unet, WEIGHTS, unet_sd), ("vae", vae, WEIGHTS, vae_sd),
                                     ("text_encoder", text, "model.safetensors", text_sd)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        if name == "text_encoder":
            model.config.save_pretrained(folder / name)
        else:
            model.save_config(folder / name)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name / weights), metadata={"format": "pt"})
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    if preset == "tiny":
        from engine.models.presets import build_tiny_tokenizer

        build_tiny_tokenizer().save_pretrained(folder / "tokenizer")
    elif tokenizer_dir is None:
        raise CheckpointError(f"{what}: a CLIP tokenizer folder is needed for {preset}")
    else:
        shutil.copytree(tokenizer_dir, folder / "tokenizer", dirs_exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    return preset


def model_index() -> dict:
    """A ``model_index.json`` that lets diffusers' pipelines load the folder (no safety checker)."""
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False}


def bin_to_safetensors(src: str | Path, dst: str | Path) -> None:
    """A pickled weights file (``.bin``), opened safely, rewritten as safetensors."""
    from engine.formats.tensors import load_tensor_file

    state = load_tensor_file(src)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata={"format": "pt"})
