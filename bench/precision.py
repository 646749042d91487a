"""How far bf16 generation is from fp32 on the CPU, on random weights of a preset's shape (SD1.5 by
default): the relative error of the Base ControlNet's residuals (one forward, every adapter
routed) and of the final latents of a short multi-condition generation, and the PSNR of the decoded
images, bf16 against fp32. Also the seconds of each run (one process, one run each: a ratio, not a
benchmark; bench/gen.py times steps). Prints JSON.

The model is made once (seeded), run in fp32, then cast in place to bf16 and run again with the
same seeds and inputs, so only the precision differs. Relative error: ||bf16 - fp32|| / ||fp32||
over the whole tensor (the worst residual is reported beside the mean).

    python bench/precision.py [--preset sd15] [--size 256] [--steps 4] [--conditions 2]
    python bench/precision.py --demo [--size 32] [--steps 20]   # the demo model (`ctrlora pull demo`)

``--demo``: the demo's SD, base and demo-seg adapter from the store (CTRLORA_HOME), one
condition; the images' PSNR and each precision's best time of 3 alternating runs.

``--crossover``: where bf16 starts to pay on this CPU, the figures behind ``engine.runtime``'s
``CPU_BF16_MIN_WIDTH``: SD1.5-layout UNets (random weights) of first-block widths 32 (the demo's
widths), 64, 128 and 320 (SD1.5), each timed in fp32 and in bf16 (best of 3 alternating runs after
a warm-up) for one guided forward (batch 2) and for one training step (forward and backward,
bf16 autocast, batch 8 at 16 x 16 latents; SD1.5 width left out: minutes per step). Prints fp32
over bf16 time (above 1: bf16 faster).

    python bench/precision.py --crossover --threads 1

tests/test_precision.py runs ``compare`` on the tiny preset and holds it to the tolerances there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.generation.pipeline import CtrLoraPipeline  # noqa: E402
from engine.generation.sampling import Condition  # noqa: E402
from engine.models import adapters  # noqa: E402
from engine.models.controlnet import BaseControlNetModel  # noqa: E402
from engine.models.presets import build_sd, build_tiny_tokenizer  # noqa: E402
from engine.runtime import DTYPES  # noqa: E402

RANK = 128
PROMPT, NEGATIVE = "a red circle above a blue square", "green"


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    value, exact = value.double(), exact.double()
    return float((value - exact).norm() / exact.norm().clamp_min(1e-30))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def build(preset: str, conditions: int, rank: int, seed: int = 0):
    sd = build_sd(preset, seed=seed)
    if sd.tokenizer is None:  # sd15 ships none: any CLIP tokenizer (ids only index the random embedding)
        sd.tokenizer = build_tiny_tokenizer()
    controlnet = BaseControlNetModel.from_unet(sd.unet)
    for i in range(conditions):
        adapters.add_adapter(controlnet, f"c{i}", rank=rank)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # every part of each adapter (zero convs included) non-zero and distinct
            for param in adapters.adapter_parameters(controlnet, f"c{i}").values():
                param.add_(torch.randn(param.shape, generator=g) * 0.02)
    return sd, controlnet


def _residuals(controlnet, conditions: int, size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cross = controlnet.config.cross_attention_dim
    cond = torch.randn(conditions, 4, size // 8, size // 8, generator=g)
    text = torch.randn(conditions, 77, cross, generator=g)
    plan = [(f"c{i}", 1) for i in range(conditions)]
    with torch.no_grad(), controlnet.routing.use(plan):
        down, mid = controlnet(cond.to(dtype), torch.tensor([500] * conditions), text.to(dtype), return_dict=False)
    return [r.float() for r in (*down, mid)]


def _generate(sd, controlnet, dtype: torch.dtype, conditions: int, size: int, steps: int):
    g = torch.Generator().manual_seed(7)
    conds = [Condition(f"c{i}", torch.rand(3, size, size, generator=g), 1.0) for i in range(conditions)]
    pipe = CtrLoraPipeline(sd, controlnet, dtype=dtype)  # casts the modules in place
    started = time.perf_counter()
    result = pipe(conds, PROMPT, NEGATIVE, steps=steps, seed=3, width=size, height=size)
    return result, time.perf_counter() - started


def compare(preset: str = "sd15", size: int = 256, steps: int = 4, conditions: int = 2, rank: int = RANK) -> dict:
    """bf16 against fp32 for one model of ``preset``: residual and latent relative errors, PSNR."""
    sd, controlnet = build(preset, conditions, rank)
    runs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.nn.Module.to(controlnet, dtype=dtype)  # (diffusers' .to warns about a cast that applies here)
        residuals = _residuals(controlnet, conditions, size, dtype)
        result, seconds = _generate(sd, controlnet, dtype, conditions, size, steps)
        runs[name] = (residuals, result, seconds)
    (res32, out32, s32), (res16, out16, s16) = runs["fp32"], runs["bf16"]
    errors = [relative_error(b, a) for a, b in zip(res32, res16)]
    images = [psnr(np.asarray(a), np.asarray(b)) for a, b in zip(out32.images, out16.images)]
    return {"preset": preset, "size": size, "steps": steps, "conditions": conditions, "rank": rank,
            "threads": torch.get_num_threads(),
            "residual_rel_error_mean": sum(errors) / len(errors), "residual_rel_error_max": max(errors),
            "latent_rel_error": relative_error(out16.latents, out32.latents),
            "image_psnr_db": min(images),
            "seconds": {"fp32": s32, "bf16": s16}, "bf16_speedup": s32 / s16}


def compare_demo(size: int = 32, steps: int = 20, rounds: int = 3) -> dict:
    """fp32 against bf16 on the demo model in the store: PSNR and best seconds per generation."""
    from ctrlora_cli.store.store import Store
    from engine.formats.adapter_file import load_adapter_file
    from engine.models.storage import load_base, load_sd

    store = Store()
    state, meta = load_adapter_file(store.file("demo-seg", "adapter.safetensors"))
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    pipes = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        pipe = CtrLoraPipeline(load_sd(store.folder("demo-sd"), dtype=dtype),
                               load_base(store.folder("demo") / "controlnet", dtype=dtype), dtype=dtype)
        pipe.load_adapter("seg", state, alpha=meta["alpha"])
        pipes[name] = pipe
    best, images = {}, {}
    for _ in range(rounds):
        for name, pipe in pipes.items():
            started = time.perf_counter()
            result = pipe([Condition("seg", image)], PROMPT, steps=steps, seed=1, width=size, height=size)
            best[name] = min(best.get(name, math.inf), time.perf_counter() - started)
            images[name] = np.asarray(result.images[0])
    return {"model": "demo", "size": size, "steps": steps, "threads": torch.get_num_threads(),
            "image_psnr_db": psnr(images["fp32"], images["bf16"]), "seconds_best_of": rounds,
            "seconds": best, "bf16_speedup": best["fp32"] / best["bf16"]}


CROSSOVER_SHAPES = (  # (first-block width, latent side of the forward): the demo at 32 and 64 px, SD at 256 px
    (32, 8), (32, 16), (64, 16), (128, 16), (320, 32))


def _unet(width: int, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    from engine.models.presets import unet_config

    widths = (32, 64, 64, 64) if width == 32 else (width, 2 * width, 4 * width, 4 * width)  # 32: the demo's
    context = 768 if width >= 320 else 64
    torch.manual_seed(0)
    config = dict(unet_config("sd15"), block_out_channels=widths, cross_attention_dim=context,
                  attention_head_dim=8 if width >= 320 else 2)
    return UNet2DConditionModel(**config).requires_grad_(False).to(dtype), context


def _best_of(runs: dict, rounds: int = 3) -> dict:
    """Best seconds of each named callable over ``rounds`` alternating rounds, after one warm-up."""
    times = {name: [] for name in runs}
    for _ in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(values[1:]) for name, values in times.items()}


def crossover() -> list[dict]:
    rows = []
    for width, side in CROSSOVER_SHAPES:
        models = {name: _unet(width, dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        context = models["fp32"][1]

        def forward(name):
            unet, dtype = models[name][0].eval(), DTYPES[name]
            with torch.no_grad():
                unet(torch.randn(2, 4, side, side, dtype=dtype), torch.tensor([500, 500]),
                     torch.randn(2, 77, context, dtype=dtype))

        def train_step(name):
            unet, dtype = models[name][0].train(), DTYPES[name]
            x = torch.randn(8, 4, 16, 16, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                out = unet(x.to(dtype), torch.full((8,), 500), torch.randn(8, 77, context, dtype=dtype)).sample
            out.float().square().mean().backward()

        gen = _best_of({name: (lambda n=name: forward(n)) for name in models})
        row = {"width": width, "latent": side, "forward_fp32_over_bf16": round(gen["fp32"] / gen["bf16"], 2),
               "forward_seconds": {k: round(v, 4) for k, v in gen.items()}}
        if width < 320:
            train = _best_of({name: (lambda n=name: train_step(n)) for name in models})
            row.update(train_fp32_over_bf16=round(train["fp32"] / train["bf16"], 2),
                       train_seconds={k: round(v, 4) for k, v in train.items()})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd15", choices=("sd15", "tiny"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--conditions", type=int, default=2)
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--demo", action="store_true", help="the demo model in the store instead (sizes default "
                                                            "to 32 x 32, 20 steps)")
    parser.add_argument("--crossover", action="store_true", help="fp32 against bf16 time by UNet width")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crossover:
        from engine.runtime import CPU_BF16_MIN_WIDTH

        result = {"min_width_for_bf16": CPU_BF16_MIN_WIDTH, "threads": torch.get_num_threads(), "rows": crossover()}
    elif args.demo:
        result = compare_demo(args.size if args.size != 256 else 32, args.steps if args.steps != 4 else 20)
    else:
        result = compare(args.preset, args.size, args.steps, args.conditions, args.rank)
    print(json.dumps({"bench": "precision", "cpu_native_bf16": _native(), **result}, indent=2))


def _native() -> bool:
    from engine.runtime import native_cpu_bf16

    return native_cpu_bf16()


if __name__ == "__main__":
    main()
