"""Seconds per training step and peak memory of fitting one condition, at SD1.5 shape with random
weights. Prints JSON.

    python bench/fit.py [--steps 2] [--rounds 2] [--size 256] [--variants ours,reference,diffusers]

Three ways to train a new condition, each in its own process (clean peak memory):

- ``ours``: ``engine.training.fit.AdapterTrainer``: latents and text embeddings from the cache (the
  posterior is sampled per step), gradients for the adapter only, SDPA attention, bf16 autocast
  with fp32 master weights on CUDA (fp32 on CPU). ``ours-bf16``: the same in bf16 autocast on the
  CPU (what ``--precision auto`` picks on a CPU with native bf16; run by default on such a CPU).
- ``reference``: the reference recipe (CtrLoRA's train_ctrlora_finetune.py with its rank-128
  config): fp32, batch 1, the VAE encodes target and condition and CLIP encodes the prompt at every
  step; gradient checkpointing on (``use_checkpoint: True``); attention computed as
  softmax(q k^T) v (no SDPA); every UNet and ControlNet weight left with ``requires_grad`` (only
  the adapter is in the optimizer, so the other gradients are computed and never used).
- ``diffusers``: full ControlNet training as diffusers' examples/controlnet/train_controlnet.py
  does it: ``ControlNetModel.from_unet`` (hint network included), every ControlNet weight trained
  with AdamW, VAE and CLIP at every step, SDPA, frozen parts in bf16 and autocast on CUDA (fp32 on
  CPU), no gradient checkpointing (its default).

CPU: 256 x 256; CUDA: 512 x 512 and, for each, the fraction of the measured bf16 matmul peak a
step achieves (FLOPs counted by torch.utils.flop_counter). On a shared machine the variants run in
``--rounds`` alternating rounds and each keeps its best round; the process CPU time per step is
reported beside the wall time, as it suffers less from other jobs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("ours", "reference", "diffusers")
BF16_ON_CPU = "ours-bf16"  # ours in bf16 autocast on the CPU


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- the three step functions ------------------------------------------------------------------

def setup_ours(sd, size, device, precision):
    from engine.models.controlnet import BaseControlNetModel
    from engine.training.pairs import EncodedPairs
    from engine.training.fit import AdapterTrainer, FitConfig

    controlnet = BaseControlNetModel.from_unet(sd.unet)
    n, h = 4, size // 8
    g = torch.Generator().manual_seed(0)
    # Cache contents as the encoders would leave them: posterior mean and log-variance.
    moments = lambda: torch.cat([torch.randn(n, 4, h, h, generator=g), torch.full((n, 4, h, h), -8.0)], 1)  # noqa: E731
    width = sd.unet.config.cross_attention_dim  # 768 for SD1.5
    data = EncodedPairs(target=moments(), cond=moments(), text=torch.randn(n, 77, width, generator=g),
                        text_index=torch.arange(n), empty=torch.randn(77, width, generator=g), scaling_factor=0.18215)
    trainer = AdapterTrainer(sd.unet, controlnet, sd.scheduler, data,
                             FitConfig(rank=128, batch=1, resolution=size, precision=precision, device=str(device),
                                       drop_prompt=0.3))
    return trainer.train_step  # bound: bench/gpu.py reaches the trainer through its __self__


def _pixels(size, device, g):
    return torch.rand(1, 3, size, size, generator=g).to(device)


def setup_reference(sd, size, device, precision):
    from diffusers.models.attention_processor import AttnProcessor

    from engine.models import adapters
    from engine.models.controlnet import BaseControlNetModel
    from engine.training.objective import diffusion_loss

    unet, vae, text_encoder, scheduler = sd.unet.to(device), sd.vae.to(device), sd.text_encoder.to(device), sd.scheduler
    controlnet = BaseControlNetModel.from_unet(unet)
    adapters.add_adapter(controlnet, "new", rank=128)
    controlnet.to(device)
    for model in (unet, controlnet, vae):
        for module in model.modules():
            if hasattr(module, "set_processor") and hasattr(module, "processor"):
                module.set_processor(AttnProcessor())  # softmax(q k^T) v, as ldm's attention
    # Lightning trains what the optimizer holds, but nothing turns requires_grad off.
    unet.requires_grad_(True)
    controlnet.requires_grad_(True)
    unet.enable_gradient_checkpointing()
    controlnet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(list(adapters.adapter_parameters(controlnet, "new").values()), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    gd = torch.Generator(device).manual_seed(0)
    sf = vae.config.scaling_factor

    def step():
        target, hint = _pixels(size, device, g), _pixels(size, device, g)
        ids = torch.randint(0, text_encoder.config.vocab_size, (1, 77), generator=g).to(device)
        with torch.no_grad():
            latents = vae.encode(target * 2 - 1).latent_dist.sample(gd) * sf
            cond = vae.encode(hint).latent_dist.sample(gd) * sf
            text = text_encoder(ids)[0]
        with controlnet.routing.use("new"):  # backward too: checkpointing reruns forward pieces
            loss = diffusion_loss(unet, controlnet, scheduler, latents, cond, text, generator=gd)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def setup_diffusers(sd, size, device, precision):
    import torch.nn.functional as F
    from diffusers import ControlNetModel

    unet, vae, text_encoder, scheduler = sd.unet, sd.vae, sd.text_encoder, sd.scheduler
    controlnet = ControlNetModel.from_unet(unet).to(device).train()
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for model in (unet, vae, text_encoder):
        model.to(device, weight_dtype).requires_grad_(False)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    sf = vae.config.scaling_factor
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        target, hint = _pixels(size, device, g), _pixels(size, device, g)
        ids = torch.randint(0, text_encoder.config.vocab_size, (1, 77), generator=g).to(device)
        with autocast:
            latents = vae.encode((target * 2 - 1).to(weight_dtype)).latent_dist.sample() * sf
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            text = text_encoder(ids, return_dict=False)[0]
            down, mid = controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=hint.to(weight_dtype),
                                   return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=text,
                        down_block_additional_residuals=[r.to(weight_dtype) for r in down],
                        mid_block_additional_residual=mid.to(weight_dtype), return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


# -- measuring ---------------------------------------------------------------------------------

def matmul_peak_tflops(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    repeats = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def run_variant(name: str, size: int, steps: int, device: torch.device, count_flops: bool,
                preset: str = "sd15") -> dict:
    from engine.models.presets import build_sd

    # The reference recipe is fp32 everywhere; the other two use bf16 autocast on CUDA.
    precision = "bf16" if (device.type == "cuda" and name != "reference") or name == BF16_ON_CPU else "fp32"
    sd = build_sd(preset, seed=0)
    step = {"ours": setup_ours, BF16_ON_CPU: setup_ours, "reference": setup_reference,
            "diffusers": setup_diffusers}[name](
        sd, size, device, precision)
    step()  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result = {"variant": name, "size": size, "precision": precision, "steps_timed": steps,
              "seconds_per_step": sum(times) / len(times), "seconds_per_step_min": min(times),
              "cpu_seconds_per_step": sum(cpu_times) / len(cpu_times),
              "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                 else peak_rss_gb()),
              "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS"}
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        result["tflop_per_step"] = counter.get_total_flops() / 1e12
        result["achieved_tflops"] = result["tflop_per_step"] / result["seconds_per_step_min"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default: 2 on CPU, 1 on CUDA)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--variants", default=None, help=f"comma-separated: {', '.join(VARIANTS)}, {BF16_ON_CPU} "
                        f"(default: all; {BF16_ON_CPU} beside them on a CPU with native bf16)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in this process
    parser.add_argument("--flops", action="store_true", help="count FLOPs (always on CUDA)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or (512 if cuda else 256)
    if args.variant:
        print(json.dumps(run_variant(args.variant, size, args.steps, device, args.flops or cuda)))
        return

    from engine.runtime import native_cpu_bf16

    names = (args.variants or ",".join(VARIANTS[:1] + ((BF16_ON_CPU,) if not cuda and native_cpu_bf16() else ())
                                        + VARIANTS[1:])).split(",")
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds or (1 if cuda else 2)):
        for name in names:
            cmd = [sys.executable, __file__, "--variant", name, "--size", str(size), "--steps", str(args.steps)]
            if args.flops:
                cmd.append("--flops")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                lines = done.stderr.strip().splitlines()
                rounds[name].append({"error": lines[-1] if lines else done.returncode})
            else:
                rounds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {}
    for name, runs in rounds.items():
        good = [r for r in runs if "error" not in r]
        best = min(good, key=lambda r: r["seconds_per_step"]) if good else runs[-1]
        results[name] = {**best, "seconds_per_step_by_round": [r.get("seconds_per_step") for r in runs]}
    report = {"bench": "fit", "device": torch.cuda.get_device_name() if cuda else "cpu", "size": size,
              "threads": torch.get_num_threads(), "results": results}
    if cuda:
        peak = matmul_peak_tflops(device, torch.bfloat16, 8192)
        report["bf16_matmul_peak_tflops"] = peak
        for r in results.values():
            if "achieved_tflops" in r:
                r["fraction_of_bf16_matmul_peak"] = r["achieved_tflops"] / peak
    ours = results.get("ours", {}).get("seconds_per_step")
    for name, r in results.items():
        if "seconds_per_step" in r:
            r["minutes_per_1000_steps"] = r["seconds_per_step"] * 1000 / 60
            if ours and not name.startswith("ours"):
                r["ours_over_this"] = ours / r["seconds_per_step"]
                r["ours_over_this_cpu_time"] = results["ours"]["cpu_seconds_per_step"] / r["cpu_seconds_per_step"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
