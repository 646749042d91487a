"""The condition embedding: the frozen SD VAE encoder on images in [0, 1].

CtrLoRA feeds the condition image scaled to [0, 1] (not SD's usual [-1, 1]) through the VAE,
samples the posterior and multiplies by the VAE's scaling factor (0.18215 for SD1.5).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def encode_condition(vae, images: torch.Tensor, generator: torch.Generator | None = None,
                     mode: str = "sample") -> torch.Tensor:
    """``images``: (B, 3, H, W) in [0, 1]. ``mode='sample'`` draws from the posterior (the
    reference); ``mode='mode'`` takes its mean, deterministic."""
    if mode not in ("sample", "mode"):
        raise ValueError(f"mode must be 'sample' or 'mode', not {mode!r}")
    images = images.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(images).latent_dist
    latent = posterior.sample(generator=generator) if mode == "sample" else posterior.mode()
    return latent * vae.config.scaling_factor


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (3, H, W) float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """The reference preprocessing: resize the short side, then crop the centre.
    ``size`` is a square side or ``(width, height)``."""
    width, height = (size, size) if isinstance(size, int) else size
    scale = max(width / image.width, height / image.height)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(new, Image.BICUBIC)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    return image.crop((left, top, left + width, top + height))
