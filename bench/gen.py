"""Seconds per denoising step and peak memory of multi-condition generation at the SD1.5 shape
(random weights), for 1, 2 and 4 conditions:

  (a) ours: engine.generation.pipeline.CtrLoraPipeline (one batched ControlNet forward for all conditions
      and both guidance branches, conditions encoded once, one UNet pass);
  (b) reference: engine.generation.reference (the reference algorithm written plainly: each branch,
      each condition one after another, the condition re-encoded through the VAE every time);
  (c) diffusers: StableDiffusionControlNetPipeline with a MultiControlNetModel of as many
      random-weight ControlNetModels (SD1.5 configuration).

CPU: 256 x 256, 2 timed steps; ours in fp32 and, where the CPU computes bf16 natively
(AVX512-BF16, AMX), in bf16 too (``--precisions``), each with and without the prepacked
convolutions if ``--prepack both``; the baselines in fp32, as their code runs on a CPU. CUDA: 512 x 512 fp16, 20 steps, and the fraction of the GPU's
measured bf16 matmul peak that a step achieves. Each (method, conditions) runs in its own process
(peak memory is per process: CUDA max allocated, or the CPU's peak RSS after loading); the weights
are made once and cached. The first step of each run warms up and is not counted. Prints JSON.

    python bench/gen.py [--conditions 1,2,4] [--methods ours,reference,diffusers] [--steps N]
                        [--size S] [--cache DIR] [--precisions fp32,bf16] [--prepack on|off|both]
"""


from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("ours", "reference", "diffusers")

ACCEPTANCE = """the CPU acceptance comparison (SD1.5 shape, 256 x 256, 2 conditions, 2 threads; ours in the
default precision against the reference and diffusers, peak RSS beside):
  python bench/gen.py --threads 2 --conditions 2 --size 256 --precisions auto,fp32
what prepacking costs and buys in each precision:
  python bench/gen.py --threads 2 --conditions 2 --methods ours --precisions fp32,bf16 --prepack both"""
RANK = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=ACCEPTANCE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conditions", default="1,2,4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--size", type=int, default=None, help="default: 256 on CPU, 512 on CUDA")
    parser.add_argument("--cache", default=os.environ.get("CTRLORA_BENCH_CACHE", "/tmp/ctrlora-bench-sd15"))
    parser.add_argument("--flops", action="store_true", help="also count FLOPs per step (always on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--precisions", default=None,
                        help="ours' precisions, comma-separated; auto: what `ctrlora gen` picks here (default: "
                             "fp32 and bf16 on a CPU with native bf16, fp32 on other CPUs, fp16 on CUDA)")
    parser.add_argument("--prepack", choices=("on", "off", "both"), default="on",
                        help="ours with the CPU's prepacked convolutions, without, or both (default: on)")
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)  # a worker's
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    args.steps = args.steps or (20 if cuda else 2)
    args.size = args.size or (512 if cuda else 256)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args, cuda)))
        return

    cache = Path(args.cache)
    started = time.perf_counter()
    make_weights(cache)
    results = []
    for n in [int(c) for c in args.conditions.split(",")]:
        for method, precision, prepack in runs(args, cuda):
            cmd = [sys.executable, __file__, "--worker", method, str(n), "--steps", str(args.steps), "--size",
                   str(args.size), "--cache", str(cache), "--precision", precision, "--prepack", prepack] + \
                  (["--flops"] if args.flops else []) + \
                  (["--compile"] if args.compile else []) + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                results.append({"method": method, "conditions": n, "precision": precision,
                                "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {"bench": "gen", "device": "cuda" if cuda else "cpu", "gpu": torch.cuda.get_device_name() if cuda else None,
              "baseline_dtype": "float16" if cuda else "float32", "size": args.size, "timed_steps": args.steps,
              "threads": torch.get_num_threads(), "results": results, "ratios": ratios(results),
              "bench_seconds": round(time.perf_counter() - started, 1)}
    if cuda:
        report["bf16_matmul_peak_tflops"] = round(matmul_peak() / 1e12, 1)
    else:  # the CPU's own ceiling at the bench's threads: a step's FLOPs (--flops) over it is its floor
        report["cpu_matmul_gflops"] = {name: round(matmul_peak(2048, 10, "cpu", dtype) / 1e9)
                                       for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        for r in results:
            if "flops_per_step" in r and r.get("precision") in report["cpu_matmul_gflops"]:
                r["fraction_of_matmul_peak"] = round(r["flops_per_step"] / r["seconds_per_step"] /
                                                     (report["cpu_matmul_gflops"][r["precision"]] * 1e9), 3)
    if cuda:
        for r in results:
            if "flops_per_step" in r:
                r["fraction_of_bf16_peak"] = round(r["flops_per_step"] / r["seconds_per_step"] /
                                                   (report["bf16_matmul_peak_tflops"] * 1e12), 3)
    print(json.dumps(report, indent=2))


def runs(args, cuda: bool) -> list[tuple[str, str, str]]:
    """(method, precision, prepack "on"/"off") of each worker: ours in each of ``--precisions`` (and
    with and without prepacking if asked), the baselines in the precision their code runs in."""
    from engine.runtime import native_cpu_bf16, resolve_precision

    import torch

    default = "fp16" if cuda else ("fp32,bf16" if native_cpu_bf16() else "fp32")
    device = torch.device("cuda" if cuda else "cpu")
    ours = []
    for name in (args.precisions or default).split(","):
        name = resolve_precision(name, device)
        if name not in ours:
            ours.append(name)
    prepacks = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}[args.prepack]
    out = []
    for method in args.methods.split(","):
        if method == "ours":
            out += [(method, p, k) for p in ours for k in prepacks]
        else:
            out.append((method, "fp16" if cuda else "fp32", "on"))
    return out


def ratios(results: list[dict]) -> dict:
    """ours (each precision; prepacked) / reference and / diffusers per number of conditions
    (seconds per step and peak memory)."""
    out = {}
    for key in ("seconds_per_step", "cpu_seconds_per_step", "peak_memory_mb"):
        by = {(r["method"], r["conditions"]): r.get(key) for r in results if r.get("prepacked", True)}
        for n in sorted({r["conditions"] for r in results}):
            for r in results:
                if r["method"] != "ours" or r["conditions"] != n or not r.get(key) or not r.get("prepacked", True):
                    continue
                for other in ("reference", "diffusers"):
                    if by.get((other, n)):
                        out.setdefault(str(n), {})[f"ours {r['precision']}/{other} ({key})"] = \
                            round(r[key] / by[(other, n)], 3)
    return out


def make_weights(cache: Path, preset: str = "sd15") -> None:
    """Random SD1.5-shape weights (or another preset's), saved once: UNet, VAE, text encoder, our Base
    ControlNet and a diffusers ControlNetModel (both initialised from the UNet, as their authors do)."""
    if (cache / "done").is_file():
        return
    from diffusers import ControlNetModel

    from engine.models.controlnet import BaseControlNetModel
    from engine.models.storage import save_base
    from engine.models.presets import build_sd

    sd = build_sd(preset, seed=0)
    for name in ("unet", "vae", "text_encoder"):
        getattr(sd, name).save_pretrained(cache / name)
    save_base(BaseControlNetModel.from_unet(sd.unet), cache / "base")
    ControlNetModel.from_unet(sd.unet).save_pretrained(cache / "controlnet")
    (cache / "done").write_text("ok")


def worker(method: str, n: int, args, cuda: bool) -> dict:
    import torch

    from engine.runtime import DTYPES

    cache = Path(args.cache)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.precision]
    sd = load_components(cache, device, dtype)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.size, args.size, generator=g) for _ in range(n)]
    prompt, steps = "a red circle above a blue square", args.steps + 1  # + the warm-up step

    if method == "diffusers":
        run = _diffusers(sd, images, cache, n, device, dtype, prompt)
    elif method in ("ours", "reference"):
        run = _ours(sd, images, cache, n, device, dtype, prompt, method, args.compile, args.prepack == "on")
    else:
        raise SystemExit(f"unknown method {method}")

    if cuda:
        run(1)  # lazily-initialised kernels (and compilation); not timed
    memory = _reset_peak(cuda)
    step_times = run(steps)[1:]  # the first step warms up
    result = {"method": method, "conditions": n, "precision": args.precision,
              "seconds_per_step": round(statistics.mean(wall for wall, _ in step_times), 4),
              "cpu_seconds_per_step": round(statistics.mean(cpu for _, cpu in step_times), 4),
              "step_seconds": [round(wall, 4) for wall, _ in step_times], "peak_memory_mb": round(memory(), 1),
              "memory_kind": "cuda max allocated" if cuda else "process peak RSS (weights included)"}
    if method == "ours":
        result["prepacked"] = args.prepack == "on"
    if cuda or args.flops:
        result["flops_per_step"] = _flops_per_step(run)
    if cuda:
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(20, decode=True)
        torch.cuda.synchronize()
        result["one_image_20_steps_seconds"] = round(time.perf_counter() - start, 3)
    return result


def _ours(sd, images, cache, n, device, dtype, prompt, method, compile_, prepack=True):
    import torch

    from engine.models import adapters
    from engine.models.storage import load_base
    from engine.generation.pipeline import CtrLoraPipeline
    from engine.generation.reference import reference_sample
    from engine.generation.sampling import Condition

    controlnet = load_base(cache / "base")
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        adapters.add_adapter(controlnet, f"c{i}", rank=RANK)
        with torch.no_grad():  # a trained adapter's values, roughly: LoRA up and zero convs non-zero
            for key, p in adapters.adapter_parameters(controlnet, f"c{i}").items():
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    pipe = CtrLoraPipeline(sd, controlnet, device=device, dtype=dtype, compile=compile_, prepack=prepack)
    conditions = [Condition(f"c{i}", image) for i, image in enumerate(images)]

    def run(steps: int, decode: bool = False) -> list[tuple[float, float]]:
        clock = StepClock(device)
        kw = dict(steps=steps, seed=0, output_type="pil" if decode else "latent")
        clock.start()
        if method == "ours":
            pipe(conditions, prompt, callback=clock.tick, **kw)
        else:
            reference_sample(pipe.sd, pipe.controlnet, conditions, prompt, callback=clock.tick, **kw)
        return clock.times

    run.pipe, run.conditions = pipe, conditions  # bench/gpu.py's correctness pass calls the pipeline itself
    return run


def _diffusers(sd, images, cache, n, device, dtype, prompt):
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from diffusers.models.controlnets import MultiControlNetModel

    from engine.models.encoders import encode_text

    nets = [ControlNetModel.from_pretrained(cache / "controlnet", torch_dtype=dtype).to(device).eval()
            for _ in range(n)]
    controlnet = nets[0] if n == 1 else MultiControlNetModel(nets)
    pipe = StableDiffusionControlNetPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                             unet=sd.unet, controlnet=controlnet, scheduler=sd.scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    text = encode_text(sd.text_encoder, sd.tokenizer, ["", prompt])
    hint = [image[None] for image in images]

    def run(steps: int, decode: bool = False) -> list[tuple[float, float]]:
        clock = StepClock(device)

        def tick(pipeline, i, t, kwargs):
            clock.tick()
            return {}

        clock.start()
        with torch.no_grad():
            pipe(prompt_embeds=text[1:], negative_prompt_embeds=text[:1], image=hint[0] if n == 1 else hint,
                 num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                 output_type="pil" if decode else "latent", callback_on_step_end=tick,
                 height=images[0].shape[-2], width=images[0].shape[-1])
        return clock.times

    return run


class StepClock:
    """(wall seconds, process CPU seconds) of each step, from the samplers' step callbacks. CPU
    seconds say what a step costs on a machine that other work shares."""

    def __init__(self, device):
        self.device, self.times = device, []

    def _now(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def start(self) -> None:
        self.last = self._now()

    def tick(self, *_) -> None:
        now = self._now()
        self.times.append((now[0] - self.last[0], now[1] - self.last[1]))
        self.last = now


def _reset_peak(cuda: bool):
    """Start measuring peak memory from now (weights loaded); returns a reader in MiB."""
    import gc

    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return lambda: torch.cuda.max_memory_allocated() / 2**20
    try:  # Linux: reset the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass

    def peak_rss() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    return peak_rss


def _flops_per_step(run) -> float:
    """FLOPs of a 2-step run minus a 1-step run (what is done once per generation cancels)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter:
            run(steps)
        counts.append(counter.get_total_flops())
    return float(counts[1] - counts[0])


def matmul_peak(n: int = 8192, repeats: int = 20, device: str = "cuda", dtype=None) -> float:
    """Measured matmul FLOP/s of this GPU in bf16 (or of ``device`` in ``dtype``): the best of a few
    square products."""
    import torch

    dtype = dtype or torch.bfloat16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def load_components(cache: Path, device, dtype):
    """The cached random SD components (``make_weights``) on ``device`` in ``dtype``, frozen."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from engine.models.presets import SCHEDULER_CONFIG, SDComponents, build_tiny_tokenizer

    sd = SDComponents(UNet2DConditionModel.from_pretrained(cache / "unet", torch_dtype=dtype),
                      AutoencoderKL.from_pretrained(cache / "vae", torch_dtype=dtype),
                      CLIPTextModel.from_pretrained(cache / "text_encoder", dtype=dtype),
                      build_tiny_tokenizer(),  # any CLIP tokenizer: ids only index the random embedding
                      DDIMScheduler(**SCHEDULER_CONFIG))
    for m in (sd.unet, sd.vae, sd.text_encoder):
        m.to(device).eval().requires_grad_(False)
    return sd


if __name__ == "__main__":
    main()
