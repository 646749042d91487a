"""The baseline a CtrLoRA adapter is measured against: a standard ControlNet trained for the condition.

What a user without CtrLoRA would train: diffusers' ``ControlNetModel.from_unet(unet)`` (a copy of the
UNet's encoder and middle block, zero convs on its outputs, and a small conditioning network that
turns the PIXEL condition image into a feature map at the latent size), every ControlNet weight
trained, the UNet frozen, as diffusers' ``examples/controlnet/train_controlnet.py`` trains it. Unlike
CtrLoRA's Base ControlNet it sees the noisy latent (its input is the noisy sample plus the embedded
condition), and its condition is the image in [0, 1], not the image's VAE latent.

For a fair comparison with ``ctrlora fit``'s ``AdapterTrainer`` the trainer below IS that trainer with
other hooks: the same data order (a pure function of the seed), the same generator draws (target
posterior, condition posterior, prompt dropout, noise, timesteps: the condition latent is drawn and
not used, so every other draw matches), the same objective (``engine.training.objective``, prediction
type from the scheduler's config), AdamW with torch's defaults, the same precision handling. Only what
trains and what the ControlNet is fed differ. ``StandardControlNetPipeline`` draws with it through
the generation pipeline's sampler, so ``engine.demo.evaluate.evaluate(pipe, None, ...)`` scores it as
it scores adapters.
"""

from __future__ import annotations

import contextlib
import math

import torch

from engine.generation.pipeline import CtrLoraPipeline
from engine.training.fit import AdapterTrainer, FitConfig
from engine.training.pairs import EncodedPairs

# diffusers' ControlNetModel default: three stride-2 convolutions, 8x, SD's VAE factor.
DIFFUSERS_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The conditioning network's widths for a VAE that downsamples by ``vae_scale_factor``:
    diffusers' defaults, cut to log2(factor) stride-2 steps (SD, 8: all four widths; the demo, 4:
    (16, 32, 96))."""
    steps = round(math.log2(vae_scale_factor)) if vae_scale_factor > 0 else -1
    if steps < 1 or 2**steps != vae_scale_factor or steps >= len(DIFFUSERS_EMBEDDING_CHANNELS):
        raise ValueError(f"VAE factor {vae_scale_factor}: a power of two from 2 to "
                         f"{2 ** (len(DIFFUSERS_EMBEDDING_CHANNELS) - 1)} is needed")
    return DIFFUSERS_EMBEDDING_CHANNELS[:steps + 1]


def build_standard_controlnet(unet, vae_scale_factor: int, seed: int = 0):
    """``diffusers.ControlNetModel.from_unet(unet)`` with diffusers' defaults (UNet weights copied,
    zero convs, RGB condition), fp32, on the UNet's device. Only the conditioning network's depth
    follows the VAE: it downsamples the pixel condition by one stride-2 convolution per width
    after the first, and its output is added to the UNet's first feature map, which sits at the
    latent size; diffusers' (16, 32, 96, 256) downsamples by 8, SD's VAE factor, so the demo's
    4x VAE needs one step less. ``seed``: the conditioning network's initial weights (the global
    random state is left as it was)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=embedding_channels(vae_scale_factor), conditioning_channels=3)
    return torch.nn.Module.to(controlnet, device=unet.device, dtype=torch.float32)  # (diffusers' .to warns of dtypes)


def pixel_controlled_prediction(unet, controlnet, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                                cond_pixels: torch.Tensor) -> torch.Tensor:
    """``engine.training.objective.controlled_eps`` for a standard ControlNet: it sees the noisy
    latent and the condition image (in [0, 1], as diffusers' pipelines feed ``controlnet_cond``)."""
    down, mid = controlnet(noisy, timesteps, text, controlnet_cond=cond_pixels, return_dict=False)
    return unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


class StandardControlNetTrainer(AdapterTrainer):
    """``AdapterTrainer`` for a standard ControlNet (``build_standard_controlnet``): every weight of
    ``controlnet`` trains (zero convs and the conditioning network included), the UNet is frozen,
    and the ControlNet is fed ``data.cond_pixels`` (``encode_pairs(..., condition_pixels=True)``).
    ``config``: a ``FitConfig``; ``rank`` is not used. Interface as ``AdapterTrainer``: ``step``,
    ``train_step()``, ``trainable_parameters()``, ``indices``, ``loss_on``, ``state_dict``."""

    predict = staticmethod(pixel_controlled_prediction)

    def __init__(self, unet, controlnet, scheduler, data: EncodedPairs, config: FitConfig):
        if data.cond_pixels is None:
            raise ValueError("a standard ControlNet is fed condition images: encode the pairs with "
                             "encode_pairs(..., condition_pixels=True)")
        super().__init__(unet, controlnet, scheduler, data, config)

    def _add_trainable(self, controlnet, config: FitConfig) -> dict[str, torch.nn.Parameter]:
        controlnet.train()  # as train_controlnet.py (the model has no dropout: no change in what it computes)
        return dict(controlnet.named_parameters())

    def _batch(self, indices: torch.Tensor, generator: torch.Generator, drop_prompt: float):
        # The condition latent is drawn and dropped, so that every other draw is AdapterTrainer's.
        latents, _, text = self.data.sample_batch(indices, generator, drop_prompt)
        return latents, self.data.cond_pixels[indices.to(self.data.cond_pixels.device)], text

    def _routing(self):
        return contextlib.nullcontext()


class StandardControlNetPipeline(CtrLoraPipeline):
    """Generation with a standard ControlNet in place of the Base ControlNet and its adapters: the
    same sampler, seeds, guidance and steps as ``CtrLoraPipeline``. Conditions name no adapter
    (``Condition(None, image, weight)``); each image in [0, 1] goes to the ControlNet as it is, with
    ``conditioning_scale`` = its weight x strength, and the residuals of several conditions add up.
    The modules are borrowed (used where and as they are, as ``fit``'s validation draws): a model
    in training can be scored between steps."""

    def __init__(self, sd, controlnet, *, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(sd, controlnet, device=device or sd.unet.device, dtype=dtype, borrow=True)

    @torch.no_grad()
    def encode_conditions(self, conditions, generator=None, mode: str = "sample", count: int = 1):
        """The condition images themselves, (count, 3, H, W), on the pipeline's device and dtype."""
        images = []
        for c in conditions:
            if c.adapter is not None:
                raise ValueError(f"a standard ControlNet has no adapters (condition {c.adapter!r}); name None")
            image = c.image if c.image.ndim == 4 else c.image[None].expand(count, -1, -1, -1)
            images.append(image.to(self.device, self.dtype))
        return images

    def _residuals(self, conditions, active, cond_images, text, t, strength, branches, repeat, sample):
        if not active:
            return None, None
        # One row per UNet row: [unconditional x batch, conditional x batch], as ``sample``.
        rows_text = text.repeat_interleave(repeat, dim=0)
        down = mid = None
        for j in active:
            image = cond_images[j].repeat(branches, 1, 1, 1).repeat_interleave(repeat, dim=0)
            d, m = self._controlnet(sample, t, rows_text, controlnet_cond=image,
                                    conditioning_scale=conditions[j].weight * strength, return_dict=False)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        return list(down), mid
