"""The demo's "toy SD": the ``demo`` preset's VAE, text encoder and UNet, trained on the demo world.

The demo Base ControlNet and its adapters need a Stable Diffusion that draws world scenes; this
trains one from scratch in minutes on a CPU. Two stages, both seeded and deterministic (for a given
seed and thread count):

1. The VAE reconstructs world scenes (in [-1, 1], as SD pipelines encode images) and world
   condition images of every kind (in [0, 1], as CtrLoRA's condition encoder feeds them), so its
   encoder gives edges and masks a latent too. MSE plus a small KL term. Its ``scaling_factor`` is
   then set to 1 / std of the scenes' latents, the way SD1.5's 0.18215 was chosen, so that the
   UNet sees latents of unit variance.
2. The text encoder and the UNet learn together on the SD1.5 schedule, with v-prediction (as
   SD2 does) rather than SD1.5's epsilon: a small UNet trained briefly never learns to copy its
   noisy input exactly, and with epsilon that residual error at the noisiest steps (where the
   layout is decided) outweighs what it knows about the image, so control and captions barely
   took hold (build 2); v asks for the image there instead. A caption is replaced by "" with
   probability 0.1 so classifier-free guidance works. Sampling uses an exponential moving
   average of their weights, which is what gets saved.

``sample`` draws with the generation pipeline (no ControlNet), to check that the result draws world scenes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusers.training_utils import EMAModel

from engine.training.objective import add_noise, prediction_target
from engine.demo.settings import VAE_FACTOR, ToySDSettings  # its defaults and ranges; imported from here too
from engine.files import write_atomic
from engine.models.encoders import tokenize
from engine.models.presets import SDComponents, build_sd
from engine.progress import ProgressCallback, report

PRESET = "demo"


@dataclass
class WorldImages:
    """Rendered training data: uint8 (N, 3, H, W) scenes and one condition image per scene."""

    scenes: torch.Tensor
    conditions: torch.Tensor
    captions: list[str]
    condition_kinds: list[str] = field(default_factory=list)


def render_world(count: int, size: int = 64, seed: int = 0, progress: ProgressCallback | None = None) -> WorldImages:
    """Scenes 0..count-1 of world ``seed``; scene i also gives condition i mod len(CONDITIONS) of
    the world, so every condition is seen equally often."""
    from engine.demo.world import CONDITIONS, make_scene

    scenes = torch.empty((count, 3, size, size), dtype=torch.uint8)
    conditions = torch.empty_like(scenes)
    captions, kinds = [], []
    for i in range(count):
        scene = make_scene(i, seed, size)
        image = scene.image()
        kind = CONDITIONS[i % len(CONDITIONS)]
        scenes[i] = _to_uint8_tensor(image)
        conditions[i] = _to_uint8_tensor(scene.condition(kind, image))
        captions.append(scene.caption)
        kinds.append(kind)
        if (i + 1) % 100 == 0 or i + 1 == count:
            report(progress, "world", i + 1, count)
    return WorldImages(scenes, conditions, captions, kinds)


def _to_uint8_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Stage 1: the VAE


def vae_inputs(images: torch.Tensor, is_scene: torch.Tensor) -> torch.Tensor:
    """uint8 images -> what the VAE is fed: scenes in [-1, 1], condition images in [0, 1]."""
    x = images.float() / 255
    return torch.where(is_scene[:, None, None, None], x * 2 - 1, x)


def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None):
    """(loss, reconstruction MSE): MSE of the decoded posterior sample plus ``kl_weight`` times
    the KL to N(0, 1) per latent element."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    mse = F.mse_loss(vae.decode(z).sample, x)
    kl = posterior.kl().mean() / z[0].numel()
    return mse + kl_weight * kl, mse


def train_vae(vae, data: WorldImages, steps: int, batch: int = 32, lr: float = 2e-3, kl_weight: float = 1e-4,
              warmup: int = 50, crop: int = 0, seed: int = 0, progress: ProgressCallback | None = None) -> list[float]:
    """Train ``vae`` in place on the scenes and condition images; returns the MSE of each step.

    ``crop`` > 0 trains the first four fifths of the steps on random ``crop`` x ``crop`` windows:
    the VAE is convolutional but for its middle attention, so windows teach it nearly as much per
    step at a fraction of the cost; the last fifth, on whole images, fits that attention to the
    full latent grid."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.cat([data.scenes, data.conditions])
    is_scene = torch.arange(len(pool)) < len(data.scenes)
    side = pool.shape[-1]
    cropped_steps = steps - steps // 5 if 0 < crop < side else 0
    vae.train().requires_grad_(True)
    optimizer, schedule = _optimizer(vae.parameters(), lr, warmup, steps)
    history = []
    for step in range(steps):
        idx = torch.randint(0, len(pool), (batch,), generator=generator)
        images = pool[idx]
        if step < cropped_steps:
            top, left = (int(v) * VAE_FACTOR for v in torch.randint(0, (side - crop) // VAE_FACTOR + 1, (2,),
                                                                       generator=generator))
            images = images[..., top:top + crop, left:left + crop]
        loss, mse = vae_loss(vae, vae_inputs(images, is_scene[idx]), kl_weight, generator)
        _step(optimizer, schedule, loss)
        history.append(mse.item())
        report(progress, "vae", step + 1, steps, loss=_recent(history))
    vae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor, is_scene: bool = True, batch: int = 256) -> torch.Tensor:
    """Posterior parameters (mean and log-variance, (N, 8, h, w)) of uint8 images."""
    flags = torch.full((batch,), is_scene)
    return torch.cat([vae.encode(vae_inputs(chunk, flags[:len(chunk)])).latent_dist.parameters
                      for chunk in images.split(batch)])


def sample_latents(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments).sample(generator=generator)


def set_scaling_factor(vae, scene_moments: torch.Tensor, seed: int = 0) -> float:
    """Store 1 / std of the scenes' sampled latents as the VAE's ``scaling_factor``."""
    z = sample_latents(scene_moments, torch.Generator().manual_seed(seed))
    factor = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


def trivial_mse(data: WorldImages) -> float:
    """The reconstruction MSE of always answering the data's per-channel mean (what a VAE that
    learnt nothing about the image would reach): the figure the VAE's MSE should fall well below."""
    pool = torch.cat([vae_inputs(data.scenes, torch.ones(len(data.scenes), dtype=torch.bool)),
                      vae_inputs(data.conditions, torch.zeros(len(data.conditions), dtype=torch.bool))])
    return float(pool.var(dim=(0, 2, 3), unbiased=False).mean())


# ---------------------------------------------------------------------------------------------
# Stage 2: text encoder and UNet


def denoising_loss(unet, text_encoder, scheduler, latents: torch.Tensor, ids: torch.Tensor,
                   generator: torch.Generator | None = None, snr_gamma: float | None = None) -> torch.Tensor:
    """SD's training loss at a uniform random timestep, against the scheduler's prediction type.

    ``snr_gamma``: Min-SNR weighting (Hang et al., 2023): each sample's MSE times
    min(SNR(t), gamma) / SNR(t) for epsilon, / (SNR(t) + 1) for v-prediction. Nearly-clean
    timesteps then weigh less, which makes a short training spend its steps on the shapes and
    colours rather than on fine noise."""
    text = text_encoder(ids)[0]
    noisy, noise, timesteps = add_noise(scheduler, latents, generator)
    target = prediction_target(scheduler, latents, noise, timesteps)
    error = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=text).sample, target, reduction="none")
    if snr_gamma is None:
        return error.mean()
    alpha_bar = scheduler.alphas_cumprod.to(latents.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr.clamp(max=snr_gamma) / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)
    return (error.mean(dim=(1, 2, 3)) * weight).mean()


def train_unet(sd: SDComponents, scene_moments: torch.Tensor, captions: list[str], steps: int, batch: int = 32,
               lr: float = 1e-3, warmup: int = 50, caption_dropout: float = 0.1, ema_decay: float = 0.995,
               snr_gamma: float | None = 5.0, seed: int = 0, progress: ProgressCallback | None = None) -> list[float]:
    """Train ``sd.text_encoder`` and ``sd.unet`` together in place (their weights end as the EMA
    of the run); returns the loss of each step."""
    generator = torch.Generator().manual_seed(seed)
    ids = tokenize(sd.tokenizer, captions)
    empty = tokenize(sd.tokenizer, [""])
    scaling = sd.vae.config.scaling_factor
    modules = torch.nn.ModuleList([sd.unet, sd.text_encoder]).train().requires_grad_(True)
    params = list(modules.parameters())
    # diffusers' EMA: its decay ramps up as (1 + t) / (10 + t) to ``ema_decay``, so the average
    # never holds much of the random initialisation, even in a short run.
    ema = EMAModel(params, decay=ema_decay, foreach=True)
    optimizer, schedule = _optimizer(params, lr, warmup, steps)
    history = []
    for step in range(steps):
        idx = torch.randint(0, len(scene_moments), (batch,), generator=generator)
        latents = sample_latents(scene_moments[idx], generator) * scaling
        drop = torch.rand(batch, generator=generator) < caption_dropout
        loss = denoising_loss(sd.unet, sd.text_encoder, sd.scheduler, latents,
                              torch.where(drop[:, None], empty, ids[idx]), generator, snr_gamma)
        _step(optimizer, schedule, loss)
        ema.step(params)
        history.append(loss.item())
        report(progress, "unet", step + 1, steps, loss=_recent(history))
    ema.copy_to(params)
    modules.eval().requires_grad_(False)
    return history


def _optimizer(params, lr: float, warmup: int, steps: int):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def factor(step: int) -> float:  # linear warm-up, then cosine from 1 down to 0.1
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _step(optimizer, schedule, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    schedule.step()


def _recent(history: list[float], window: int = 50) -> float:
    tail = history[-window:]
    return sum(tail) / len(tail)


# ---------------------------------------------------------------------------------------------
# Sampling (a check that the result draws world scenes)


def sample(sd: SDComponents, prompts: list[str], steps: int = 25, guidance: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1], one per prompt, at the UNet's native size: the generation
    pipeline with no ControlNet (DDIM, eta 0; classifier-free guidance against ""); image k from
    noise seed ``seed + k``."""
    from engine.generation.pipeline import CtrLoraPipeline

    pipe = CtrLoraPipeline(sd, None, device=sd.unet.device, dtype=sd.unet.dtype)
    return pipe([], list(prompts), steps=steps, guidance=guidance, seed=seed, batch=len(prompts),
                output_type="pt").images


# ---------------------------------------------------------------------------------------------
# The whole recipe


@dataclass
class ToySDResult:
    sd: SDComponents
    summary: dict


def train_toy_sd(settings: ToySDSettings | None = None, out: str | Path | None = None,
                 progress: ProgressCallback | None = None) -> ToySDResult:
    """Render the world, train the VAE, measure the latent scale, train text encoder + UNet; save
    the result in diffusers layout (``engine.models.storage.load_sd`` reads it) when ``out`` is given."""
    s = (settings or ToySDSettings()).check()
    sd = build_sd(PRESET, seed=s.seed)
    sd.scheduler = type(sd.scheduler).from_config(sd.scheduler.config, prediction_type=s.prediction)
    latent = s.size // VAE_FACTOR
    sd.unet.register_to_config(sample_size=latent)  # the UNet's native size is the world's
    sd.vae.register_to_config(sample_size=s.size)

    data = render_world(s.count, s.size, s.seed, progress)
    vae_history = train_vae(sd.vae, data, s.vae_steps, batch=s.vae_batch, lr=s.vae_lr, kl_weight=s.kl_weight,
                            warmup=s.warmup, crop=s.vae_crop, seed=s.seed, progress=progress)
    moments = encode_moments(sd.vae, data.scenes)
    scaling = set_scaling_factor(sd.vae, moments, s.seed)
    unet_history = train_unet(sd, moments, data.captions, s.unet_steps, batch=s.batch, lr=s.unet_lr,
                              warmup=s.warmup, caption_dropout=s.caption_dropout, ema_decay=s.ema_decay,
                              snr_gamma=s.snr_gamma, seed=s.seed + 1, progress=progress)
    summary = {
        "preset": PRESET,
        "settings": asdict(s),
        "scaling_factor": scaling,
        "vae_mse_trivial": trivial_mse(data),
        "vae_mse_first": _mean(vae_history[:20]),
        "vae_mse_last": _mean(vae_history[-50:]),
        "unet_loss_first": _mean(unet_history[:20]),
        "unet_loss_last": _mean(unet_history[-50:]),
    }
    if out is not None:
        save_toy_sd(sd, out, summary)
    return ToySDResult(sd, summary)


def save_toy_sd(sd: SDComponents, out: str | Path, summary: dict) -> Path:
    """The SD folder (diffusers layout) plus ``toy_sd.json`` saying how it was made."""
    from engine.models.storage import save_sd

    out = Path(out)
    save_sd(sd, out)
    write_atomic(out / "toy_sd.json", json.dumps(summary, indent=2) + "\n")
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None

