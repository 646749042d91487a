"""The frozen encoders' inputs: the prompt through SD's text encoder, the condition image through
its VAE. Generation, training and the demo's toy SD all encode with these, so a cached text
embedding or condition latent means the same thing wherever it is used.

Text: CLIP's last hidden states of the prompt padded (and cut) to the tokenizer's length, 77 for
SD1.5, as SD's pipelines and the reference feed the UNet.

Condition: CtrLoRA feeds the condition image scaled to [0, 1] (not SD's usual [-1, 1]) through the
VAE, samples the posterior and multiplies by the VAE's scaling factor (0.18215 for SD1.5).
"""

from __future__ import annotations

import torch


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (len(prompts), model_max_length), padded to the length and cut at it. Training
    that updates the text encoder (the toy SD) calls the encoder on these itself, with gradients."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden states (len(prompts), 77, width) in the encoder's dtype, on its device."""
    return text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device))[0]


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
