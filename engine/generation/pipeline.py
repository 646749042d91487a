"""Multi-condition CtrLoRA generation, the fast path.

Per generation: the text is encoded once and each condition image once (a VAE posterior sample
drawn from a seeded generator, or the posterior's mode). Per denoising step:

1. every condition acting at this step, for both guidance branches, goes through ONE batched
   ControlNet forward; ``controlnet.routing`` gives each condition's adapter (LoRA, zero convs,
   transformer norms) its own slice of the batch. Conditions outside their window are left out.
   The ControlNet never sees the noisy latent, so its residuals are the same for every image of
   the batch: it runs on one sample per (condition, branch) whatever the batch size (unless the
   images of the batch have their own prompts or condition images, as ``ctrlora eval`` asks);
2. each branch's residuals are weighted and summed over the conditions;
3. one UNet pass covers both guidance branches (the unconditional branch keeps the conditions;
   only its text differs).

With a single condition its LoRA is fused into the base weights; with several, the layers where
LoRA costs most use per-condition merged weights (``engine.generation.premerge``); on the CPU the wide
low-resolution convolutions reuse weights reordered once (``engine.generation.prepacked``). This computes what the
reference does (``engine.generation.reference``, the plain baseline) up to float rounding.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from engine.models import adapters as adapters_lib
from engine.models.encoders import encode_condition, encode_text
from engine.errors import UsageError
from engine.generation.premerge import premerged
from engine.generation.settings import check_sampling
from engine.generation.prepacked import available as prepacked_available
from engine.generation.prepacked import prepacked_convs
from engine.progress import ProgressCallback, report
from engine.generation.sampling import (Condition, decode, generation_size, generators, initial_latents,
                                        make_scheduler, step_kwargs, to_pil, vae_scale_factor)


@dataclass
class GenerationResult:
    images: list | torch.Tensor  # PIL images ("pil"), (B, 3, H, W) in [0, 1] ("pt"), or None ("latent")
    latents: torch.Tensor  # final latents, float32, on the CPU
    seeds: list[int]  # the noise seed of each image
    condition_seed: int  # the seed of the condition latents' posterior sample
    width: int
    height: int
    timings: dict = field(default_factory=dict)  # seconds: encode, denoise, decode, steps (list)


class CtrLoraPipeline:
    """SD components + a Base ControlNet with adapters loaded, on one device and dtype.

    ``controlnet=None``: plain SD sampling, no conditions (how the demo's toy SD checks that it
    draws). ``borrow=True``: the modules are used where and as they are, and nothing touches their
    weights (no moving or casting, fusing, premerging, prepacking or channels_last): how ``fit``
    draws validation images from the model it is training, whose frozen weights may be bf16 (run
    under the caller's autocast) beside the adapter's fp32 master weights. ``device`` must then be
    theirs."""

    def __init__(self, sd, controlnet, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 channels_last: bool | None = None, compile: bool = False, fuse_single: bool = True,
                 premerge: bool = True, prepack: bool = True, borrow: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.sd = sd
        self.controlnet = controlnet
        # channels_last helps convolutions on GPUs; on CPUs it is measured slower for these shapes.
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.fuse_single = fuse_single  # one adapter: fuse its LoRA into the base weights
        # Several: merged weights per adapter where LoRA costs most (engine.generation.premerge). Not under
        # torch.compile, whose graphs would keep the patched layers' closures.
        self.premerge = premerge and not compile
        # CPU fp32/bf16: wide low-resolution convolutions with weights reordered once (engine.generation.prepacked).
        self.prepack = prepack and not compile and prepacked_available(self.device, dtype)
        if borrow:
            # Fusing and unfusing would leave the base weights off by rounding; a model in training
            # must compute exactly as it trains.
            self.channels_last = self.fuse_single = self.premerge = self.prepack = compile = False
        else:
            for module in (sd.unet, sd.vae, sd.text_encoder, controlnet):
                if module is not None:
                    _move(module, self.device, dtype)
        if self.channels_last:
            for module in (sd.unet, controlnet, sd.vae):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self._unet, self._controlnet = sd.unet, controlnet
        if compile:
            self._unet = torch.compile(sd.unet)
            self._controlnet = torch.compile(controlnet) if controlnet is not None else None

    @classmethod
    def from_pretrained(cls, folder=None, *, sd=None, base=None, adapters=None, device=None,
                        precision: str | None = None, **options) -> "CtrLoraPipeline":
        """A pipeline from files, as diffusers' ``from_pretrained``: a folder holding SD, the Base
        ControlNet (``controlnet/``) and adapters (``adapters/NAME.safetensors``) as the store lays
        them out, and/or explicit ``sd=``, ``base=`` and ``adapters=`` paths
        (``engine.generation.pretrained``). Adapters are loaded under their names."""
        from engine.generation.pretrained import find_paths, load

        return load(cls, find_paths(folder, sd=sd, base=base, adapters=adapters), device, precision, **options)

    @classmethod
    def from_store(cls, *adapters: str, resolver, base: str | None = None, sd: str | None = None, device=None,
                   precision: str | None = None, **options) -> "CtrLoraPipeline":
        """A pipeline from store names: ``resolver(list(adapters), base=, sd=)`` gives the paths
        (``PretrainedPaths``). The engine never imports the store (it is ``ctrlora_cli``'s), so the
        caller hands the resolver in: ``ctrlora_cli.store.paths.store_paths`` for the user's store,
        which picks the base the adapters were made for and its SD, as ``ctrlora gen`` does::

            from ctrlora_cli.store.paths import CtrLoraPipeline, store_paths
            pipe = CtrLoraPipeline.from_store("canny", resolver=store_paths)
            pipe.generate("a cosy cabin", {"canny": "edges.png"}, seed=42).images[0].save("cabin.png")
        """
        from engine.generation.pretrained import load

        return load(cls, resolver(list(adapters), base=base, sd=sd), device, precision, **options)

    def generate(self, prompt: str | list[str], conditions: dict | None = None, negative_prompt: str = "", *,
                 width: int | None = None, height: int | None = None, **settings) -> GenerationResult:
        """``__call__`` with images as people have them: ``conditions`` maps a loaded adapter's name
        to an image (a file path, a PIL image or a tensor) or ``(image, weight)``; images are
        resized to the output size (default: the first image's). ``settings`` as ``__call__``
        (``seed``, ``steps``, ``guidance``, ``batch``, ...)."""
        from engine.generation.pretrained import conditions_from

        found, width, height = conditions_from(conditions or {}, width, height, vae_scale_factor(self.sd.vae))
        return self(found, prompt, negative_prompt, width=width, height=height, **settings)

    def load_adapter(self, name: str, state_dict: dict[str, torch.Tensor], alpha: float | None = None) -> None:
        adapters_lib.load_adapter(self.controlnet, name, state_dict, alpha=alpha)
        _move(self.controlnet, self.device, self.dtype)

    @torch.no_grad()
    def encode_conditions(self, conditions: list[Condition], generator: torch.Generator | list[torch.Generator] | None,
                          mode: str = "sample", count: int = 1) -> list[torch.Tensor]:
        """One (count, 4, h, w) latent per condition, in order, drawn from ``generator`` (a list:
        latent k from ``generator[k]``); a single image is encoded ``count`` times."""
        latents = []
        for c in conditions:
            images = c.image if c.image.ndim == 4 else c.image[None].expand(count, -1, -1, -1)
            latent = encode_condition(self.sd.vae, images, generator=generator, mode=mode)
            latents.append(latent.to(self.device, self.dtype))
        return latents

    @torch.no_grad()
    def __call__(self, conditions: list[Condition], prompt: str | list[str], negative_prompt: str = "", *,
                 steps: int = 20, guidance: float = 7.5, scheduler: str = "ddim", seed: int = 0,
                 condition_seed: int | None = None, width: int | None = None, height: int | None = None,
                 batch: int = 1, strength: float = 1.0, condition_encoding: str = "sample", output_type: str = "pil",
                 callback: ProgressCallback | None = None) -> GenerationResult:
        """``batch`` images, image k from noise seed ``seed + k``. A list of prompts, or condition
        images with a batch dimension, give each image its own; image k then equals the same call
        made for it alone with ``seed + k`` and ``condition_seed + k`` (up to float rounding)."""
        check_sampling(steps=steps, guidance=guidance, strength=strength, batch=batch, scheduler=scheduler)
        for c in conditions:
            c.validate()
        per_image = isinstance(prompt, list) or any(c.image.ndim == 4 for c in conditions)
        per = batch if per_image else 1  # rows per guidance branch that differ in text or conditions
        prompts = prompt if isinstance(prompt, list) else [prompt] * per
        if len(prompts) != per or any(c.image.ndim == 4 and len(c.image) != batch for c in conditions):
            raise UsageError(f"give one prompt and one condition image per image of the batch ({batch})")
        if conditions and self.controlnet is None:
            raise UsageError("this pipeline has no ControlNet: it takes no conditions")
        loaded = set(adapters_lib.adapter_names(self.controlnet)) if self.controlnet is not None else set()
        for c in conditions:
            if c.adapter is not None and c.adapter not in loaded:
                raise UsageError(f"adapter {c.adapter!r} is not loaded")
        width, height = generation_size(conditions, width, height, self.sd.unet, self.sd.vae)
        condition_seed = seed if condition_seed is None else condition_seed
        t0 = time.perf_counter()

        sched = make_scheduler(scheduler, self.sd.scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        gens = generators(seed, batch)
        factor = vae_scale_factor(self.sd.vae)
        shape = (self.sd.unet.config.in_channels, height // factor, width // factor)
        latents = initial_latents(gens, shape, self.device, sched.init_noise_sigma)

        cfg = guidance > 1.0
        texts = [negative_prompt] * per + prompts if cfg else prompts
        text = encode_text(self.sd.text_encoder, self.sd.tokenizer, texts)  # (branches * per, 77, D)
        text = text.to(self.device, self.dtype)  # a borrowed text encoder may sit elsewhere
        branches = 2 if cfg else 1
        unet_text = text.repeat_interleave(batch // per, dim=0)  # [uncond x batch, cond x batch]
        cond_gen = generators(condition_seed, per) if per_image else torch.Generator("cpu").manual_seed(condition_seed)
        cond_latents = self.encode_conditions(conditions, cond_gen, condition_encoding, count=per)
        if self.channels_last:
            cond_latents = [x.contiguous(memory_format=torch.channels_last) for x in cond_latents]
        extra = step_kwargs(sched, gens)
        used = sorted({c.adapter for c in conditions if c.adapter is not None})
        # Fusing changes the base weights, so not when a condition uses the bare base (adapter None).
        fused = self.fuse_single and len(used) == 1 and all(c.adapter is not None for c in conditions)
        t_encode = time.perf_counter() - t0

        step_times = []
        with contextlib.ExitStack() as stack:
            if fused:
                adapters_lib.fuse_adapter(self.controlnet, used[0])
                stack.callback(adapters_lib.unfuse_adapters, self.controlnet)
            elif self.premerge:
                stack.enter_context(premerged(self.controlnet, used))
            if self.prepack:
                stack.enter_context(prepacked_convs([m for m in (self.sd.unet, self.controlnet) if m is not None]))
            for i, t in enumerate(sched.timesteps):
                start = time.perf_counter()
                active = [k for k, c in enumerate(conditions) if c.acts_at(i, len(sched.timesteps))]
                model_in = sched.scale_model_input(torch.cat([latents] * branches), t).to(self.dtype)
                if self.channels_last:
                    model_in = model_in.contiguous(memory_format=torch.channels_last)
                down, mid = self._residuals(conditions, active, cond_latents, text, t, strength, branches,
                                            batch // per, model_in)
                eps = self._unet(model_in, t, encoder_hidden_states=unet_text, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid, return_dict=False)[0].float()
                if cfg:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + guidance * (cond - uncond)
                latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
                step_times.append(time.perf_counter() - start)
                report(callback, "denoise", i + 1, len(sched.timesteps), step_s=step_times[-1],
                       conditions=len(active))

        t1 = time.perf_counter()
        images = None
        if output_type != "latent":
            images = decode(self.sd.vae, latents)
            if output_type == "pil":
                images = to_pil(images)
        timings = {"encode": t_encode, "denoise": sum(step_times), "decode": time.perf_counter() - t1,
                   "steps": step_times}
        return GenerationResult(images, latents.float().cpu(), [seed + k for k in range(batch)], condition_seed,
                                width, height, timings)

    def _residuals(self, conditions, active, cond_latents, text, t, strength, branches, repeat, sample):
        """The weighted sum over the active conditions of their ControlNet residuals, for each
        guidance branch and distinct image (``text`` rows), repeated ``repeat`` times for the
        images of the batch that share them: (down list, mid), or (None, None). ``sample``: the
        UNet's input at this step (the Base ControlNet never sees it; a standard ControlNet does)."""
        if not active:
            return None, None
        k, rows = len(active), len(text)
        cn_in = torch.cat([cond_latents[j].repeat(branches, 1, 1, 1) for j in active])  # [c0: u, c; c1: u, c ...]
        cn_text = text.repeat(k, 1, 1)
        plan = [(conditions[j].adapter, rows) for j in active]
        with self.controlnet.routing.use(plan):
            down, mid = self._controlnet(cn_in, t, cn_text, return_dict=False)
        weights = [conditions[j].weight * strength for j in active]
        w = torch.tensor(weights, dtype=mid.dtype).view(k, 1, 1, 1, 1).to(mid.device, non_blocking=True)

        def combine(r: torch.Tensor) -> torch.Tensor:
            if k == 1:
                r = r * weights[0] if weights[0] != 1.0 else r
            else:
                r = (r.view(k, rows, *r.shape[1:]) * w).sum(0)
            return r.repeat_interleave(repeat, dim=0) if repeat > 1 else r

        return [combine(r) for r in down], combine(mid)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # Every parameter (adapters' too) to the device and dtype; frozen, eval mode. Plain
    # nn.Module.to: diffusers' ModelMixin.to warns about dtype casts that do not apply here.
    torch.nn.Module.to(module, device=device, dtype=dtype)
    module.eval().requires_grad_(False)
