"""Loading and saving the parts on disk: SD components (diffusers layout) and Base ControlNets."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.files import atomic_path
from engine.models.adapters import base_state_dict
from engine.models.controlnet import BaseControlNetModel
from engine.models.presets import SDComponents

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_sd(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            variant: str | None = None, vae: bool = True) -> SDComponents:
    """SD components from a diffusers-layout folder (the subfolders of ``SD_SUBFOLDERS``);
    ``vae=False``: all but the VAE (None), for training from latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    kw = dict(torch_dtype=dtype)
    if variant:
        kw["variant"] = variant
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw) if vae else None
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    for module in (m for m in (unet, vae, text_encoder) if m is not None):
        module.to(device).eval().requires_grad_(False)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler)


def unet_width(unet_or_folder) -> int:
    """The channels of a UNet's first block (what ``engine.runtime`` weighs for CPU bf16): of a
    loaded UNet, or of an SD folder's ``unet/config.json`` (read without loading weights)."""
    config = getattr(unet_or_folder, "config", None)
    if config is None:
        config = json.loads((Path(unet_or_folder) / "unet" / "config.json").read_text())
    return int(config["block_out_channels"][0])


def save_sd(components: SDComponents, folder: str | Path) -> Path:
    folder = Path(folder)
    for name in SD_SUBFOLDERS:
        getattr(components, name).save_pretrained(folder / name)
    return folder


def load_base(folder: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> BaseControlNetModel:
    model = BaseControlNetModel.from_pretrained(folder, torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def save_base(model: BaseControlNetModel, folder: str | Path) -> Path:
    """Save the base alone (safetensors, diffusers layout), leaving out any loaded adapters."""
    clean = BaseControlNetModel.from_config(model.config)
    clean.load_state_dict(base_state_dict(model))
    clean.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def make_random_model(preset: str, sd_folder: str | Path, base_folder: str | Path, seed: int = 0,
                      any_tokenizer: bool = False) -> dict:
    """Random-weight SD components and a Base ControlNet initialised from that UNet, saved in
    diffusers layout. Only for trying commands without downloads; returns the base's config.
    ``sd15`` has no offline tokenizer: refused, unless ``any_tokenizer`` (benchmarks), which gives
    it the tiny preset's (token ids only index the random embedding)."""
    from engine.models.presets import build_sd, build_tiny_tokenizer

    sd = build_sd(preset, seed=seed)
    if sd.tokenizer is None and any_tokenizer:
        sd.tokenizer = build_tiny_tokenizer()
    if sd.tokenizer is None:
        raise ValueError(f"preset {preset!r} has no offline tokenizer")
    save_sd(sd, sd_folder)
    base = BaseControlNetModel.from_unet(sd.unet)
    save_base(base, base_folder)
    return dict(base.config)


def save_fp16_copy(src: str | Path, dst: str | Path) -> Path:
    """A copy of a safetensors file with its floating-point tensors in fp16 (the header metadata
    kept): how the packaged demo halves its size. Loaders upcast on ``from_pretrained``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {}
        for key in f.keys():
            tensor = f.get_tensor(key)
            tensors[key] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(dst)
