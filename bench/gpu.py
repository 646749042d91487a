"""Every GPU figure in one run, within a time budget. SD1.5-shaped random weights built from config:
nothing is downloaded. Writes one JSON file and prints a table.

- generation (``bench/gen.py``'s cases): 1, 2 and 4 conditions; ours, the plain reference and
  diffusers; fp16 and bf16; ``torch.compile`` once (ours, 2 conditions, fp16). Each case: seconds
  per denoising step, one whole 512 x 512 image (20 steps, CFG, decoded) and its peak memory;
- fit (``bench/fit.py``'s steps): ours and diffusers' full ControlNet step, bf16, peak memory;
- train-base (``bench/train_base.py``'s run): one process, samples/s, peak memory;
- each as a fraction of the bf16 matmul peak measured first on the same GPU;
- correctness: generation in fp16 against fp32 on the same seed (relative error), and a few fit
  steps (loss finite, and lower after than before on fixed samples and noise).

    bash bench/gpu.sh [--wheels DIR] [--out FILE] [--budget 480] [--stages a,b] [--dry-run]

Each stage runs in its own process under its own time cap (and what is left of the budget), so a
stage that fails or hangs is recorded as such and the others still run; a stage writes each
result as it gets it, so one cut off keeps what it measured. ``--dry-run``: the same stages on the
CPU at the tiny preset (64 x 64, 2 steps), in this process, to check the plumbing (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

PROMPT = "a red circle above a blue square"
CHECK_LR = 1e-4  # the fit check's learning rate: a visible change within a few steps
# Generation in fp16 against fp32: random weights and CFG 7.5 amplify rounding, so the bar is loose;
# it catches a wrong dtype or device path (errors of order 1), not rounding.
CHECK_TOLERANCE = 0.1
TARGETS = {"gen": {"seconds": 0.4, "memory_gb": 5.0}, "fit": {"minutes_per_1000_steps": 2.0, "memory_gb": 12.0}}


@dataclass
class Plan:
    """What every stage needs to know, passed to stage processes as JSON."""

    dry_run: bool
    device: str
    preset: str
    size: int
    steps: int  # denoising steps of one generation
    half: str  # what the fp16 stages compute in: fp16 (fp32 in the dry run: the CPU's fp16 is slow)
    check: str  # what the generation check compares with fp32: fp16 (bf16 in the dry run)
    conditions: tuple[int, ...]
    methods: tuple[str, ...]
    bf16_methods: tuple[str, ...]
    flops_methods: tuple[str, ...]  # counting FLOPs costs seconds per case on a CPU
    warmup: int  # untimed steps before a generation case is timed
    fit_steps: int  # timed fit steps
    train_steps: int  # train-base steps
    check_steps: int  # fit steps of the correctness check
    rank: int  # train-base's LoRA rank
    peak_n: int  # side of the square bf16 matmul that measures the peak
    cache: str

    @classmethod
    def make(cls, dry_run: bool, cache: str | None) -> "Plan":
        methods = ("ours", "reference", "diffusers")
        if dry_run:  # every stage's code at the least work: the tiny preset, 2 conditions, 1-2 steps
            return cls(dry_run=True, device="cpu", preset="tiny", size=64, steps=2, half="fp32", check="bf16",
                       conditions=(2,), methods=methods, bf16_methods=("ours",), flops_methods=("ours",), warmup=1,
                       fit_steps=1, train_steps=2, check_steps=2, rank=8, peak_n=256,
                       cache=cache or os.path.join(tempfile.gettempdir(), "ctrlora-bench-tiny"))
        return cls(dry_run=False, device="cuda", preset="sd15", size=512, steps=20, half="fp16", check="fp16",
                   conditions=(1, 2, 4), methods=methods, bf16_methods=methods, flops_methods=methods, warmup=2,
                   fit_steps=10, train_steps=12, check_steps=10, rank=128, peak_n=8192,
                   cache=cache or os.environ.get("CTRLORA_BENCH_CACHE", "/tmp/ctrlora-bench-sd15"))


# -- the stages (run in a stage process; ``emit`` records one result) -------------------------

def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _guarded(labels: dict, fn) -> dict:
    """``fn()``'s result, or ``labels`` with the error: one case's failure leaves the others."""
    try:
        return {**labels, **fn()}
    except Exception as exc:  # noqa: BLE001 - any failure is a finding to record
        lines = str(exc).strip().splitlines()
        return {**labels, "error": f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]}
    finally:
        _free()


def _images(plan: Plan, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, plan.size, plan.size, generator=g) for _ in range(n)]


def gen_case(plan: Plan, method: str, n: int, precision: str, compile_: bool = False,
             count_flops: bool = False) -> dict:
    """One generation case: a warm-up of 2 steps, then one whole image (``plan.steps`` steps,
    decoded) timed step by step; peak memory from after loading (weights included)."""
    import statistics

    import gen
    from engine.runtime import DTYPES

    device, dtype, cache = _device(plan), DTYPES[precision], Path(plan.cache)
    sd = gen.load_components(cache, device, dtype)
    if method == "diffusers":
        run = gen._diffusers(sd, _images(plan, n), cache, n, device, dtype, PROMPT)
    else:
        run = gen._ours(sd, _images(plan, n), cache, n, device, dtype, PROMPT, method, compile_)
    del sd
    start = time.perf_counter()
    run(plan.warmup)  # lazily initialised kernels, cuDNN's autotuning, compilation
    warmup = time.perf_counter() - start
    memory = gen._reset_peak(device.type == "cuda")
    start = time.perf_counter()
    steps = run(plan.steps, decode=True)
    _sync(device)
    total = time.perf_counter() - start
    walls = [wall for wall, _ in steps]
    result = {"seconds_per_step": statistics.mean(walls[1:] or walls), "one_image_seconds": total,
              "steps": plan.steps, "peak_memory_gb": memory() / 1024, "warmup_seconds": warmup,
              "memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS"}
    if count_flops:
        result["flops_per_step"] = gen._flops_per_step(run)
    return result


def _device(plan: Plan):
    import torch

    return torch.device(plan.device)


def stage_peak(plan: Plan, emit) -> None:
    import torch

    import fit

    emit({"bf16_matmul_tflops": fit.matmul_peak_tflops(_device(plan), torch.bfloat16, plan.peak_n),
          "n": plan.peak_n})


def stage_weights(plan: Plan, emit) -> None:
    import gen

    start = time.perf_counter()
    gen.make_weights(Path(plan.cache), plan.preset)
    emit({"cache": plan.cache, "preset": plan.preset, "seconds": time.perf_counter() - start})


def _gen_stage(precision: str, compile_: bool = False):
    def stage(plan: Plan, emit) -> None:
        # The target's case (2 conditions) first; FLOPs once per case (they do not depend on the dtype).
        conditions = (2,) if compile_ else sorted(plan.conditions, key=lambda n: (n != 2, n))
        methods = ("ours",) if compile_ else plan.bf16_methods if precision == "bf16" else plan.methods
        dtype = plan.half if precision == "fp16" else precision
        for n in conditions:
            for method in methods:
                labels = {"method": method, "conditions": n, "precision": dtype, "compile": compile_}
                flops = precision == "fp16" and not compile_ and method in plan.flops_methods
                emit(_guarded(labels, lambda: gen_case(plan, method, n, dtype, compile_, count_flops=flops)))
    return stage


def _fit_stage(variant: str):
    def stage(plan: Plan, emit) -> None:
        import fit

        labels = {"variant": variant}
        emit(_guarded(labels, lambda: fit.run_variant(variant, plan.size, plan.fit_steps, _device(plan), True,
                                                      plan.preset)))
    return stage


def sd_folder(cache: Path, folder: Path) -> Path:
    """A diffusers-layout SD folder (what ``train-base --sd`` reads) from ``gen.make_weights``'s cache:
    its networks linked, an offline tokenizer and SD1.5's scheduler saved beside them."""
    from diffusers import DDIMScheduler

    from engine.models.presets import SCHEDULER_CONFIG, build_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        (folder / name).symlink_to(cache.absolute() / name, target_is_directory=True)
    build_tiny_tokenizer().save_pretrained(folder / "tokenizer")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    return folder


def stage_train_base(plan: Plan, emit) -> None:
    import shutil

    import train_base
    from engine.training.launcher import METRICS

    work = Path(tempfile.mkdtemp(prefix="ctrlora-gpu-train-base-"))
    try:
        sd = sd_folder(Path(plan.cache), work / "sd")
        data = train_base.make_data(work / "data", count=2 if plan.dry_run else 8, size=plan.size)
        args = SimpleNamespace(steps=plan.train_steps, rank=plan.rank, resolution=plan.size)
        try:
            result = train_base.run(1, os.cpu_count() or 1, args, str(sd), data, work / "run")
        except subprocess.CalledProcessError as exc:
            lines = [line for line in (exc.stderr or b"").decode(errors="replace").splitlines() if line.strip()]
            raise RuntimeError(f"train-base exited {exc.returncode}: {lines[-1] if lines else ''}") from None
        records = [json.loads(line) for line in (work / "run" / METRICS).read_text().splitlines()]
        memory = [r["gpu_mem_gb"] for r in records if "gpu_mem_gb" in r]
        emit({**result, "steps": plan.train_steps, "resolution": plan.size, "rank": plan.rank,
              "peak_memory_gb": max(memory) if memory else None,
              "memory_kind": "cuda max allocated" if memory else "not measured on the CPU"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def stage_check_gen(plan: Plan, emit) -> None:
    """The same generation (2 conditions, same seeds and adapters) in fp32 and in fp16 (bf16 in the
    dry run)."""
    import torch

    import gen
    from engine.runtime import DTYPES

    device, cache, out = _device(plan), Path(plan.cache), {}
    for precision in ("fp32", plan.check):
        torch.manual_seed(0)  # the adapters' LoRA initial values
        sd = gen.load_components(cache, device, DTYPES[precision])
        run = gen._ours(sd, _images(plan, 2), cache, 2, device, DTYPES[precision], PROMPT, "ours", False)
        result = run.pipe(run.conditions, PROMPT, steps=plan.steps, seed=0, output_type="pt")
        out[precision] = (result.latents, result.images.float().cpu())
        del sd, run, result
        _free()
    (lat32, img32), (lat16, img16) = out["fp32"], out[plan.check]
    finite = bool(torch.isfinite(lat16).all() and torch.isfinite(img16).all())
    latent_error = _relative_error(lat16, lat32)
    emit({"check": f"generation {plan.check} vs fp32", "precision": plan.check, "conditions": 2, "steps": plan.steps, "finite": finite,
          "latents_relative_error": latent_error, "image_relative_error": _relative_error(img16, img32),
          "image_max_abs_error": float((img16 - img32).abs().max()), "tolerance": CHECK_TOLERANCE,
          "ok": finite and latent_error <= CHECK_TOLERANCE})


def stage_check_fit(plan: Plan, emit) -> None:
    """A few steps of ours in bf16: every loss finite, and the loss on fixed samples and noise lower
    after than before."""
    import torch

    import fit
    import gen

    torch.manual_seed(0)
    sd = gen.load_components(Path(plan.cache), torch.device("cpu"), torch.float32)
    trainer = fit.setup_ours(sd, plan.size, _device(plan), "bf16").__self__
    for group in trainer.optimizer.param_groups:
        group["lr"] = CHECK_LR
    samples = torch.arange(len(trainer.data))
    before = trainer.loss_on(samples, seed=1)
    losses = [trainer.train_step() for _ in range(plan.check_steps)]
    after = trainer.loss_on(samples, seed=1)
    finite = all(math.isfinite(x) for x in (before, after, *losses))
    emit({"check": "fit loss finite and falling", "precision": "bf16", "steps": plan.check_steps, "lr": CHECK_LR,
          "losses": losses, "fixed_loss_before": before, "fixed_loss_after": after, "finite": finite,
          "ok": finite and after < before})


@dataclass
class Stage:
    name: str
    cap_s: int  # its own time limit
    min_s: int  # not started with less time than this left
    run: object
    dry: bool = True  # part of the dry run


# In order of what matters most when the budget runs short.
STAGES = [
    Stage("peak", 60, 10, stage_peak),
    Stage("weights", 180, 60, stage_weights),
    Stage("gen-fp16", 150, 40, _gen_stage("fp16")),
    Stage("fit-ours", 90, 30, _fit_stage("ours")),
    Stage("fit-diffusers", 90, 30, _fit_stage("diffusers")),
    Stage("check-gen", 60, 20, stage_check_gen),
    Stage("check-fit", 60, 20, stage_check_fit),
    Stage("train-base", 120, 40, stage_train_base),
    Stage("gen-bf16", 120, 40, _gen_stage("bf16")),
    Stage("gen-compile", 180, 60, _gen_stage("fp16", compile_=True), dry=False),  # minutes on a CPU
]
BY_NAME = {s.name: s for s in STAGES}


# -- running stages ----------------------------------------------------------------------------

class StageTimeout(BaseException):
    """A stage's time cap, in the dry run (not an Exception: a case's guard must not swallow it)."""


def _read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line torn by a kill
            pass
    return out


def _emitter(path: Path):
    def emit(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"  {json.dumps(record)}", file=sys.stderr, flush=True)
    return emit


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (a stage's processes, torchrun's)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def run_isolated(command: list[str], cap: float, results: Path, log: Path) -> dict:
    """Run one stage's process (its own process group) for at most ``cap`` seconds; its output is
    appended to ``log``. Returns the stage's record: status ok, failed or timeout, its results."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and what it started (torchrun, its workers)
            proc.wait()
            code = None
    record = {"status": "ok" if code == 0 else "timeout" if code is None else "failed",
              "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu, "cap_s": cap,
              "results": _read_results(results)}
    if code is None:
        record["error"] = f"stopped at its time cap ({cap:.0f} s)"
    elif code:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        record["error"] = f"exit {code}: {lines[-1].strip() if lines else 'no output'}"[:400]
    return record


def run_in_process(stage: Stage, plan: Plan, cap: float, results: Path) -> dict:
    """The dry run's way: the stage in this process, its cap an alarm."""
    def alarm(*_):
        raise StageTimeout

    start, cpu = time.perf_counter(), _cpu_seconds()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, math.ceil(cap)))
    error = None
    try:
        stage.run(plan, _emitter(results))
        status = "ok"
    except StageTimeout:
        status, error = "timeout", f"stopped at its time cap ({cap:.0f} s)"
    except Exception as exc:  # noqa: BLE001
        status, error = "failed", f"{type(exc).__name__}: {exc}"[:400]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    record = {"status": status, "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu,
              "cap_s": cap, "results": _read_results(results)}
    if error:
        record["error"] = error
    return record


# -- the report --------------------------------------------------------------------------------

def environment(plan: Plan) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available() and not plan.dry_run
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if cuda else None, "cpus": os.cpu_count(),
            **{name: ver(name) for name in ("diffusers", "peft", "transformers")}}


def summarise(report: dict) -> None:
    """Fractions of the measured bf16 matmul peak, and the issue's targets."""
    stages = report["stages"]
    peak = next((r.get("bf16_matmul_tflops") for r in stages.get("peak", {}).get("results", [])), None)
    report["bf16_matmul_peak_tflops"] = peak
    gen = [r for name, s in stages.items() if name.startswith("gen-") for r in s.get("results", [])]
    flops = {(r["method"], r["conditions"]): r["flops_per_step"] for r in gen if "flops_per_step" in r}
    for r in gen:
        f = flops.get((r["method"], r["conditions"]))
        if peak and f and r.get("seconds_per_step"):
            r["fraction_of_bf16_peak"] = f / r["seconds_per_step"] / (peak * 1e12)
    fit_ours = None
    for name in ("fit-ours", "fit-diffusers"):
        for r in stages.get(name, {}).get("results", []):
            if "seconds_per_step" in r:
                r["minutes_per_1000_steps"] = r["seconds_per_step"] * 1000 / 60
                if peak and r.get("achieved_tflops"):
                    r["fraction_of_bf16_peak"] = r["achieved_tflops"] / peak
                if name == "fit-ours":
                    fit_ours = r
    for r in stages.get("train-base", {}).get("results", []):
        if peak and fit_ours and r.get("samples_per_s") and fit_ours.get("tflop_per_step"):
            # A lower bound: train-base's step is fit's plus the base's own weight gradients.
            r["fraction_of_bf16_peak_lower_bound"] = r["samples_per_s"] * fit_ours["tflop_per_step"] / peak
    target_gen = next((r for r in stages.get("gen-fp16", {}).get("results", [])
                       if r.get("method") == "ours" and r.get("conditions") == 2 and "one_image_seconds" in r), None)
    applies = not report["dry_run"]
    report["targets"] = {
        "gen: one 512 x 512 image, 20 steps, 2 conditions, CFG, fp16": _target(
            applies, target_gen, "one_image_seconds", TARGETS["gen"]["seconds"], TARGETS["gen"]["memory_gb"]),
        "fit: 1,000 steps at 512 x 512, batch 1, bf16": _target(
            applies, fit_ours, "minutes_per_1000_steps", TARGETS["fit"]["minutes_per_1000_steps"],
            TARGETS["fit"]["memory_gb"]),
    }


def _target(applies: bool, result: dict | None, key: str, bar: float, memory_bar: float) -> dict:
    out = {key.replace("one_image_", ""): result.get(key) if result else None,
           "bar": bar, "peak_memory_gb": result.get("peak_memory_gb") if result else None, "memory_bar_gb": memory_bar}
    out["met"] = (None if not applies or result is None or result.get(key) is None
                  else result[key] <= bar and result["peak_memory_gb"] <= memory_bar)
    return out


def _f(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def table_rows(report: dict) -> list[list[str]]:
    rows = [["stage", "case", "prec", "s/step", "result", "mem GB", "of peak", "status"]]
    for name, s in report["stages"].items():
        results = s.get("results", [])
        for r in results:
            status = "ok" if "error" not in r else r["error"]
            if "method" in r:
                case = f"{r['method']} x{r['conditions']}" + (" compiled" if r.get("compile") else "")
                rows.append([name, case, r["precision"], _f(r.get("seconds_per_step"), ".4f"),
                             f"{_f(r.get('one_image_seconds'), '.3f')} s/image" if "one_image_seconds" in r else "",
                             _f(r.get("peak_memory_gb"), ".2f"), _f(r.get("fraction_of_bf16_peak"), ".1%"), status])
            elif "variant" in r:
                rows.append([name, r["variant"], r.get("precision", ""), _f(r.get("seconds_per_step"), ".4f"),
                             f"{_f(r.get('minutes_per_1000_steps'), '.2f')} min/1000 steps"
                             if "minutes_per_1000_steps" in r else "",
                             _f(r.get("peak_memory_gb"), ".2f"), _f(r.get("fraction_of_bf16_peak"), ".1%"), status])
            elif "samples_per_s" in r:
                rows.append([name, "1 process", "auto", "", f"{r['samples_per_s']:.2f} samples/s",
                             _f(r.get("peak_memory_gb"), ".2f"), _f(r.get("fraction_of_bf16_peak_lower_bound"),
                                                                    ".1%") + (" (>=)" if r.get(
                                                                        "fraction_of_bf16_peak_lower_bound") else ""),
                             status])
            elif "check" in r:
                value = (f"rel err {r['latents_relative_error']:.2e}" if "latents_relative_error" in r
                         else f"loss {r['fixed_loss_before']:.4f} -> {r['fixed_loss_after']:.4f}")
                rows.append([name, r["check"], r.get("precision", "fp16"), "", value, "", "",
                             "ok" if r["ok"] else "FAILED"])
            elif "bf16_matmul_tflops" in r:
                rows.append([name, f"bf16 matmul {r['n']}", "bf16", "", f"{r['bf16_matmul_tflops']:.1f} TFLOP/s",
                             "", "", "ok"])
            elif "cache" in r:
                rows.append([name, r["preset"], "fp32", "", f"{r['seconds']:.1f} s", "", "", "ok"])
        if s["status"] != "ok" or not results:
            rows.append([name, "", "", "", "", "", "", f"{s['status']}: {s.get('error', 'no results')}"])
    return rows


def print_table(report: dict, file=None) -> None:
    file = file or sys.stdout
    rows = table_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    env = report["environment"]
    print(f"ctrlora GPU bench ({'dry run, CPU, tiny preset' if report['dry_run'] else env['gpu']}; "
          f"torch {env['torch']}, {env['date_utc']} UTC, {report['seconds']:.0f} s)", file=file)
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1][:90], file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  ------", file=file)
    for name, t in report["targets"].items():
        key = next(k for k in t if k not in ("bar", "peak_memory_gb", "memory_bar_gb", "met"))
        verdict = {True: "met", False: "NOT met", None: "not judged"}[t["met"]]
        print(f"target {name}: {_f(t[key], '.3f') or 'n/a'} (bar {t['bar']}), {_f(t['peak_memory_gb'], '.2f') or 'n/a'} GB "
              f"(bar {t['memory_bar_gb']} GB): {verdict}", file=file)


# -- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU, the tiny preset, 1-2 steps: the plumbing")
    parser.add_argument("--out", default="gpu-bench.json", help="the JSON file written (default: gpu-bench.json)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all stages (default: 480)")
    parser.add_argument("--stages", default=",".join(s.name for s in STAGES), help="which, comma-separated")
    parser.add_argument("--cache", default=None, help="random weights, made once (default: a folder in /tmp)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each stage in its own process (default: yes, except with --dry-run)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # run one stage: the stage process
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stage:
        plan = json.loads(args.plan)
        plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan.items()})
        BY_NAME[args.stage].run(plan, _emitter(Path(args.results)))
        return 0

    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or args.budget <= 0:
        parser.error(f"unknown stage {unknown[0]!r}; choose from {', '.join(BY_NAME)}" if unknown
                     else "--budget must be a positive number of seconds")
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, also on a machine with a GPU
        # One thread per process: on a shared CPU, waiting threads make tiny models 40 times slower.
        os.environ["OMP_NUM_THREADS"] = "1"
    else:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU here; run with --dry-run to check the script on the CPU", file=sys.stderr)
            return 2
    plan = Plan.make(args.dry_run, args.cache)
    isolate = (not args.dry_run) if args.isolate is None else args.isolate
    out = Path(args.out)
    log = out.with_suffix(".log")
    log.unlink(missing_ok=True)
    started = time.perf_counter()
    deadline = started + args.budget
    report = {"bench": "gpu", "dry_run": plan.dry_run, "plan": asdict(plan), "budget_s": args.budget,
              "environment": environment(plan), "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (BY_NAME[n] for n in names):
            left = deadline - time.perf_counter()
            if plan.dry_run and not stage.dry:
                report["stages"][stage.name] = {"status": "skipped", "results": [],
                                                "error": "not in the dry run (minutes on a CPU)"}
                continue
            if left < stage.min_s:
                report["stages"][stage.name] = {"status": "skipped", "results": [],
                                                "error": f"budget spent ({max(left, 0):.0f} s left, needs "
                                                         f"{stage.min_s} s)"}
                continue
            cap = min(stage.cap_s, left)
            results = Path(tmp) / f"{stage.name}.jsonl"
            print(f"stage {stage.name} (at most {cap:.0f} s)", file=sys.stderr, flush=True)
            if isolate:
                command = [sys.executable, __file__, "--stage", stage.name, "--plan", json.dumps(asdict(plan)),
                           "--results", str(results)]
                record = run_isolated(command, cap, results, log)
            else:
                record = run_in_process(stage, plan, cap, results)
            report["stages"][stage.name] = record
            print(f"stage {stage.name}: {record['status']} in {record['seconds']:.0f} s "
                  f"({record['cpu_seconds']:.0f} CPU s)"
                  + (f" ({record['error']})" if "error" in record else ""), file=sys.stderr, flush=True)
    report["seconds"] = time.perf_counter() - started
    summarise(report)
    from engine.files import write_json

    write_json(out, report, sort_keys=False)
    print_table(report)
    print(f"written: {out}" + (f" (stage output: {log})" if log.exists() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
