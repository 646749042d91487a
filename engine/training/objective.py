"""The training objective shared by ``fit``, ``train-base`` and the demo's toy SD: MSE against what
the scheduler says the UNet predicts (SD1.5: the noise, epsilon; v-prediction models such as the
demo's toy SD: the velocity), with the Base ControlNet's residuals added to the frozen UNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_noise(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None):
    """(noisy latents, noise, timesteps) with timesteps uniform over the training schedule."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what prediction_target can teach


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, by ``scheduler.config.prediction_type`` (as diffusers'
    training scripts read it): the noise, or the velocity sqrt(abar) * noise - sqrt(1 - abar) * x0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction type {kind!r} is not supported ({' or '.join(PREDICTION_TYPES)})")


def controlled_eps(unet, controlnet, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                   cond_latents: torch.Tensor, conditioning_scale: float = 1.0) -> torch.Tensor:
    """The UNet's prediction (noise or velocity) with the ControlNet's residuals (routing is the
    caller's)."""
    down, mid = controlnet(cond_latents, timesteps, text, conditioning_scale=conditioning_scale, return_dict=False)
    return unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


def diffusion_loss(unet, controlnet, scheduler, latents: torch.Tensor, cond_latents: torch.Tensor,
                   text: torch.Tensor, generator: torch.Generator | None = None, predict=controlled_eps) -> torch.Tensor:
    """``predict``: how the controlled UNet predicts, ``controlled_eps``'s signature; the
    condition (``cond_latents``) goes to it as given (a standard ControlNet takes pixels there)."""
    noisy, noise, timesteps = add_noise(scheduler, latents, generator)
    prediction = predict(unet, controlnet, noisy, timesteps, text, cond_latents)
    return F.mse_loss(prediction.float(), prediction_target(scheduler, latents, noise, timesteps).float())
