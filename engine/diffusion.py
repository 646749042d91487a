"""The training objective shared by ``fit`` and ``train-base``: epsilon-prediction MSE on SD1.5's
schedule, with the Base ControlNet's residuals added to the frozen UNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_noise(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None):
    """(noisy latents, noise, timesteps) with timesteps uniform over the training schedule."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def controlled_eps(unet, controlnet, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                   cond_latents: torch.Tensor, conditioning_scale: float = 1.0) -> torch.Tensor:
    """The UNet's noise prediction with the ControlNet's residuals (routing is the caller's)."""
    down, mid = controlnet(cond_latents, timesteps, text, conditioning_scale=conditioning_scale, return_dict=False)
    return unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


def diffusion_loss(unet, controlnet, scheduler, latents: torch.Tensor, cond_latents: torch.Tensor,
                   text: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    noisy, noise, timesteps = add_noise(scheduler, latents, generator)
    eps = controlled_eps(unet, controlnet, noisy, timesteps, text, cond_latents)
    return F.mse_loss(eps.float(), noise.float())
