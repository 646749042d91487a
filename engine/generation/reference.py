"""The reference algorithm, written plainly: the baseline the fast path is tested and measured
against (tests/test_pipeline_equivalence.py, bench/gen.py (b)).

This is what the published CtrLoRA code computes per denoising step: each guidance branch on its
own; within a branch, each condition one after another, its image re-encoded through the VAE,
its adapter switched in, the ControlNet run and the residuals scaled by the condition's weight
and summed; then one UNet pass for that branch. The unconditional branch keeps the conditions.
Conditions act within their start/end windows like the fast path (``Condition.acts_at``).

It is deliberately slow. It shares with the fast path only what both must agree on (noise,
schedulers, text encoder, decoder; ``engine.generation.sampling``).
"""

from __future__ import annotations

import time

import torch

from engine.models.encoders import encode_condition, encode_text
from engine.progress import ProgressCallback, report
from engine.generation.sampling import (Condition, decode, generation_size, generators, initial_latents,
                                        make_scheduler, step_kwargs, to_pil, vae_scale_factor)


@torch.no_grad()
def reference_sample(sd, controlnet, conditions: list[Condition], prompt: str, negative_prompt: str = "", *,
                     steps: int = 20, guidance: float = 7.5, scheduler: str = "ddim", seed: int = 0,
                     condition_seed: int | None = None, width: int | None = None, height: int | None = None,
                     batch: int = 1, strength: float = 1.0, condition_encoding: str = "sample",
                     output_type: str = "pil", callback: ProgressCallback | None = None):
    """Returns (images or None, final latents float32 on the CPU, per-step seconds).

    ``condition_encoding="sample"`` draws a fresh posterior sample at every encode, as the
    reference does; ``"mode"`` makes every encode identical (what the equivalence test uses)."""
    device, dtype = sd.unet.device, sd.unet.dtype
    width, height = generation_size(conditions, width, height, sd.unet, sd.vae)
    sched = make_scheduler(scheduler, sd.scheduler.config)
    sched.set_timesteps(steps, device=device)
    gens = generators(seed, batch)
    factor = vae_scale_factor(sd.vae)
    latents = initial_latents(gens, (sd.unet.config.in_channels, height // factor, width // factor), device,
                              sched.init_noise_sigma)
    cond_gen = torch.Generator("cpu").manual_seed(seed if condition_seed is None else condition_seed)
    text_cond = encode_text(sd.text_encoder, sd.tokenizer, [prompt]).to(dtype).expand(batch, -1, -1)
    text_uncond = encode_text(sd.text_encoder, sd.tokenizer, [negative_prompt]).to(dtype).expand(batch, -1, -1)
    cfg = guidance > 1.0
    extra = step_kwargs(sched, gens)
    step_times = []
    for i, t in enumerate(sched.timesteps):
        start = time.perf_counter()
        model_in = sched.scale_model_input(latents, t).to(dtype)
        branch_eps = []
        for text in ([text_uncond, text_cond] if cfg else [text_cond]):
            down_sum, mid_sum = None, None
            for c in conditions:
                if not c.acts_at(i, len(sched.timesteps)):
                    continue
                images = c.image[None].expand(batch, -1, -1, -1)
                cond_latent = encode_condition(sd.vae, images, generator=cond_gen, mode=condition_encoding)
                with controlnet.routing.use(c.adapter):
                    down, mid = controlnet(cond_latent.to(dtype), t, text, conditioning_scale=c.weight * strength,
                                           return_dict=False)
                if down_sum is None:
                    down_sum, mid_sum = list(down), mid
                else:
                    down_sum = [a + b for a, b in zip(down_sum, down)]
                    mid_sum = mid_sum + mid
            eps = sd.unet(model_in, t, encoder_hidden_states=text, down_block_additional_residuals=down_sum,
                          mid_block_additional_residual=mid_sum, return_dict=False)[0]
            branch_eps.append(eps.float())
        eps = branch_eps[0] + guidance * (branch_eps[1] - branch_eps[0]) if cfg else branch_eps[0]
        latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
        step_times.append(time.perf_counter() - start)
        report(callback, "denoise", i + 1, len(sched.timesteps), step_s=step_times[-1])
    images = None
    if output_type != "latent":
        images = decode(sd.vae, latents)
        if output_type == "pil":
            images = to_pil(images)
    return images, latents.float().cpu(), step_times
