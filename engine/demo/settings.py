"""The settings of the demo's toy SD (``world train-sd``) and of ``eval``: each one's default and
range in one place, without torch, so the CLI checks them before anything loads (as
``engine.training.settings`` does for ``fit`` and ``train-base``). Ranges are worded by
``engine.checks``."""

from __future__ import annotations

from dataclasses import dataclass

from engine.checks import above, at_least, between, finite, multiple_of, one_of, seed as check_seed
from engine.generation.settings import check_sampling

VAE_FACTOR = 4  # the demo VAE's downsampling (three blocks)


@dataclass
class ToySDSettings:
    """Everything that decides the result (also written next to it as ``toy_sd.json``)."""

    size: int = 32  # image side; latents are size / 4
    count: int = 4000  # world scenes drawn (and as many condition images for the VAE)
    vae_steps: int = 800
    unet_steps: int = 1000
    batch: int = 64  # UNet steps: at these sizes a step costs little more at 64 than at 16
    vae_batch: int = 32
    seed: int = 0  # world seed and training seed
    vae_lr: float = 2e-3
    vae_crop: int = 32  # VAE windows for the first 4/5 of its steps (0, or the size or more: whole images)
    unet_lr: float = 1e-3
    warmup: int = 50  # steps of linear learning-rate warm-up (then cosine decay to a tenth)
    kl_weight: float = 1e-4  # on the KL per latent element, next to the per-pixel MSE
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    snr_gamma: float | None = 5.0  # Min-SNR loss weighting (None: plain MSE)
    prediction: str = "v_prediction"  # or "epsilon" (SD1.5's); the scheduler config carries it

    def check(self) -> "ToySDSettings":
        multiple_of("size", self.size, 32, 32, 256)
        for name in ("count", "batch", "vae_batch"):
            at_least(name, getattr(self, name), 1)
        for name in ("vae_steps", "unet_steps", "warmup", "vae_crop"):
            at_least(name, getattr(self, name), 0)
        if self.vae_crop:
            multiple_of("vae_crop", self.vae_crop, VAE_FACTOR)  # windows start on latent pixels
        check_seed("seed", self.seed)
        above("vae_lr", self.vae_lr, 0)
        above("unet_lr", self.unet_lr, 0)
        at_least("kl_weight", self.kl_weight, 0)
        between("caption_dropout", self.caption_dropout, 0, 1)
        between("ema_decay", self.ema_decay, 0, 1)
        if self.snr_gamma is not None:
            above("snr_gamma", self.snr_gamma, 0)
        from engine.training.objective import PREDICTION_TYPES  # last: it loads torch

        one_of("prediction", self.prediction, PREDICTION_TYPES)
        return self


@dataclass
class EvalSettings:
    steps: int = 20
    guidance: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0  # image i uses seed + i
    weight: float = 1.0
    batch: int = 16  # pairs per pipeline call (the scores do not depend on it)

    def check(self) -> "EvalSettings":
        check_sampling(steps=self.steps, guidance=self.guidance, batch=self.batch, seed=self.seed,
                       scheduler=self.scheduler)
        finite("weight", self.weight)
        return self
