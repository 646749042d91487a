"""What every sampler here shares: conditions and their windows, schedulers, seeded noise and the
VAE decoder (the text encoder is ``engine.models.encoders.encode_text``). ``engine.generation.pipeline``
(the fast path) and ``engine.generation.reference`` (the plain baseline) both build on these, so
they differ only in how a step is computed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from engine.checks import multiple_of, one_of
from engine.errors import UsageError
from engine.generation.settings import MAX_SIDE, SCHEDULERS, check_condition
from engine.images import tensor_to_image



@dataclass
class Condition:
    """One condition of a generation: which loaded adapter (None: the bare Base ControlNet, its
    own zero convs and norms), its image, how strongly and when.

    ``image``: (3, H, W) in [0, 1] at the output size, or (N, 3, H, W): one image per image of
    the batch (N = batch). ``start``/``end``: the fraction of the steps during which it acts
    (diffusers' ``control_guidance_start/end``)."""

    adapter: str | None
    image: torch.Tensor
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def validate(self) -> None:
        check_condition("conditions", f"condition {self.adapter!r}", self.weight, self.start, self.end)
        if self.image.ndim not in (3, 4) or self.image.shape[-3] != 3:
            raise UsageError(f"condition {self.adapter!r}: image must be (3, H, W) or (N, 3, H, W), "
                             f"not {tuple(self.image.shape)}")

    def acts_at(self, step: int, steps: int) -> bool:
        """Whether the condition acts at ``step`` (0-based) of ``steps``: diffusers' rule, so
        windows mean the same as ``control_guidance_start/end`` there."""
        return self.weight != 0 and not (step / steps < self.start or (step + 1) / steps > self.end)


def make_scheduler(name: str, config):
    """A fresh scheduler (they hold per-run state) from the SD scheduler's config."""
    import diffusers

    one_of("scheduler", name, SCHEDULERS)
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(dict(config), **extra)


def step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    """Keyword arguments of ``scheduler.step``: eta 0 for DDIM, the per-image generators for the
    stochastic ones (euler-a)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def generators(seed: int, batch: int) -> list[torch.Generator]:
    """Image k of a batch draws from its own CPU generator seeded ``seed + k``: any image can be
    made again alone, on any device."""
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(batch)]


def initial_latents(gens: list[torch.Generator], shape: tuple[int, ...], device, init_noise_sigma) -> torch.Tensor:
    """(batch, *shape) float32 noise, drawn on the CPU per image (identical on every device)."""
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens])
    return noise.to(device) * init_noise_sigma


def prompt_overflow(tokenizer, prompt: str) -> int:
    """How many tokens of ``prompt`` the text encoder cannot read (0 when it fits)."""
    return max(0, len(tokenizer(prompt).input_ids) - tokenizer.model_max_length)


def generation_size(conditions: list[Condition], width: int | None, height: int | None, unet, vae) -> tuple[int, int]:
    """(width, height): given, else the first condition image's, else the UNet's native size.
    Both must be multiples of the VAE's downsampling (8 for SD)."""
    factor = vae_scale_factor(vae)
    if conditions:
        default_h, default_w = conditions[0].image.shape[-2:]
    else:
        default_h = default_w = unet.config.sample_size * factor
    width, height = width or default_w, height or default_h
    multiple_of("width", int(width), factor, factor, MAX_SIDE)
    multiple_of("height", int(height), factor, factor, MAX_SIDE)
    for c in conditions:
        if tuple(c.image.shape[-2:]) != (height, width):
            raise UsageError(f"condition {c.adapter!r}: image is {c.image.shape[-1]}x{c.image.shape[-2]}, "
                             f"the generation {width}x{height}; resize it first")
    return int(width), int(height)


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (B, 3, H, W) float32 in [0, 1], one image at a time (bounded memory)."""
    images = []
    for latent in latents:
        latent = latent[None].to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        images.append((vae.decode(latent).sample.float() / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(images)


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> B PIL images."""
    return [tensor_to_image(image) for image in images]
