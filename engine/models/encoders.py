"""The condition embedding: the frozen SD VAE encoder on images in [0, 1].

CtrLoRA feeds the condition image scaled to [0, 1] (not SD's usual [-1, 1]) through the VAE,
samples the posterior and multiplies by the VAE's scaling factor (0.18215 for SD1.5).
"""

from __future__ import annotations

import torch


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
