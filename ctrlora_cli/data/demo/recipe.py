"""The recipe of the demo model that ships with ctrlora (``ctrlora pull demo``), and of the
paper's claim measured at toy scale (docs/claim.json, docs/claim.png): every stage is one of the
project's own commands or engine functions.

1. ``ctrlora world train-sd``: a toy Stable Diffusion (VAE, text encoder, v-prediction UNet of
   the ``demo`` preset) trained on 32 x 32 world scenes; or, with ``--continue-shipped``, the
   shipped build's toy SD and base pulled from the package folder.
2. ``ctrlora world make``: 1,000 pairs for each base condition and each held-out one, and a
   held-out evaluation set per held-out condition from another world seed (unseen scenes).
3. ``ctrlora train-base``: the demo Base ControlNet on the world's eight base conditions with one
   adapter each (from the toy SD's UNet, or continuing the shipped base); and ``demo-5``, the same
   training on the first builds' five conditions, to measure what the other three buy.
4. The claim (``engine.demo.claim``, ``claim_report.py``): on each held-out condition, (a) the bare
   base, (b) a CtrLoRA adapter (``ctrlora fit``'s trainer), (c) a standard diffusers ControlNet
   from the UNet, (d) our base architecture from the UNet, (e) the base fully fine-tuned; a
   learning-rate sweep for every arm, then every arm at its best rate on every seed and data size,
   scored by ``ctrlora eval``'s protocol after each step count of the curve. Written to
   ``docs/claim.json`` and ``docs/claim.png`` (``--docs``).
5. ``ctrlora fit``: the shipped held-out adapters (demo-sketch, demo-palette) at the adapter arm's rate.
6. ``preview.png``: condition | generated | scene, for every adapter on unseen scenes.
7. Export: fp16 weights, ``demo.json`` (names, sizes, the verdict) and the preview into the
   package folder beside this file (or ``--export``).

    python ctrlora_cli/data/demo/recipe.py [--work build/demo] [--continue-shipped] [--quick]

Every stage is skipped when its result exists in the work folder, and every claim run when its
result file exists, so an interrupted recipe continues where it stopped. ``--quick`` runs every
stage with tiny settings (the CI test), each command in the recipe's own process (``main()`` with
its arguments: no start-up per stage). Timings: docs/claim.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # run as a script from a checkout: the project beside it

from engine.files import atomic_path, write_json  # noqa: E402  (write_json: whole or absent, the recipe resumes from these)


FULL = dict(
    size=32, sd_count=4000, vae_steps=800, unet_steps=1000, sd_batch=64, vae_batch=32,
    pairs=1000, eval_pairs=64, rank=16, batch=8,
    base_steps=1500, base_batch=32, base_lr=3e-4, continue_steps=1000,
    held=("sketch", "palette"), eval_steps=20, guidance=5.0,
    # The claim (engine.demo.claim): every arm, held-out condition, data size and seed. The lr sweep
    # first: short runs of every arm at each rate (seed 0, the full data), the best by the mean score
    # over sweep_curve; then every arm at its rate on every seed and size over the whole curve.
    arms=("adapter", "controlnet", "scratch", "full"), sizes=(1000, 100), seeds=(0, 1), lrs=(1e-4, 3e-4, 1e-3),
    sweep_curve=(50, 100), sweep_grow=2, curve=(25, 50, 100, 200, 400), ablation_curve=(100, 200, 400),
    ablation_lr=3e-4, jobs=2,
)
QUICK = dict(
    size=32, sd_count=64, vae_steps=3, unet_steps=3, sd_batch=8, vae_batch=8,
    pairs=8, eval_pairs=2, rank=4, batch=4,
    base_steps=2, base_batch=4, base_lr=3e-4, continue_steps=2,
    held=("sketch", "palette"), eval_steps=2, guidance=5.0,
    arms=("adapter", "controlnet", "scratch", "full"), sizes=(8, 4), seeds=(0,), lrs=(1e-4, 3e-4),
    # The sweep's runs double as seed 0's main runs (fewer runs in CI).
    sweep_curve=(1, 2), sweep_grow=0, curve=(1, 2), ablation_curve=(2,), ablation_lr=3e-4, jobs=2,
)
QUICK_BASE_CONDITIONS = ("canny", "seg")
ORIGINAL_BASE_CONDITIONS = ("canny", "seg", "depth", "bbox", "outpainting")  # the first builds' five (ablation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("build/demo"), help="work folder (store, data, runs)")
    parser.add_argument("--export", type=Path, default=HERE, help="where the weights and demo.json go")
    parser.add_argument("--docs", type=Path, default=HERE.parents[2] / "docs", help="where claim.json and claim.png go")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks every stage in a minute")
    parser.add_argument("--continue-shipped", action="store_true",
                        help="start from the shipped build (the package's demo-sd and base) instead of training the "
                             "toy SD: the base is the shipped one trained on for continue_steps over every base condition")
    parser.add_argument("--jobs", type=int, default=None, help="claim runs at once (default: the settings', 2)")
    parser.add_argument("--arms", default=None, help="comma-separated claim arms (default: all; (e) 'full' may "
                                                     "be dropped to save time)")
    parser.add_argument("--no-export", action="store_true", help="stop after the claim and the preview")
    args = parser.parse_args()
    s = dict(QUICK if args.quick else FULL)
    if args.jobs:
        s["jobs"] = args.jobs
    if args.arms:
        s["arms"] = tuple(args.arms.split(","))
    from engine.demo.world import BASE_CONDITIONS

    conditions = QUICK_BASE_CONDITIONS if args.quick else BASE_CONDITIONS
    recipe = Recipe(args.work.resolve(), s, in_process=args.quick)
    started = time.time()

    if args.continue_shipped:
        source = args.export if (args.export / "demo.json").is_file() else HERE
        recipe.stage("shipped SD", recipe.has("demo-sd"), "pull", source / "sd", "--name", "demo-sd", "--kind", "sd")
        recipe.stage("shipped base", recipe.has("demo-shipped"), "pull", source / "base" / "controlnet", "--name",
                     "demo-shipped", "--kind", "base", "--sd", "demo-sd")
    else:
        recipe.stage("toy SD", recipe.has("demo-sd"), "world", "train-sd", "--name", "demo-sd", "--size", s["size"],
                     "--count", s["sd_count"], "--vae-steps", s["vae_steps"], "--unet-steps", s["unet_steps"],
                     "--batch", s["sd_batch"], "--vae-batch", s["vae_batch"], "--json")
    for condition in (*conditions, *s["held"]):
        recipe.make_data(condition, condition, s["pairs"], seed=0)
    for held in s["held"]:
        recipe.make_data(f"eval-{held}", held, s["eval_pairs"], seed=1)
    init, steps = ("demo-shipped", s["continue_steps"]) if args.continue_shipped else ("demo-sd", s["base_steps"])
    recipe.train_base("demo", conditions, init, steps)
    bases = ["demo"]
    if not args.quick:  # what the eight conditions buy: the same training on the first builds' five
        recipe.train_base("demo-5", ORIGINAL_BASE_CONDITIONS, init, steps)
        bases = (["demo-shipped"] if args.continue_shipped else []) + ["demo-5", "demo"]

    from claim_report import draw, markdown, summarise

    claim = recipe.claim(bases)
    summary = summarise(claim["runs"], claim["bare"], claim["sweep"],
                        {k: s[k] for k in ("held", "arms", "sizes", "seeds", "lrs", "sweep_curve", "curve", "ablation_lr",
                                           "batch", "rank", "eval_pairs", "eval_steps", "guidance", "size")}
                        | {"conditions": list(s["held"]), "bases": claim["bases"],
                           "base_conditions": list(conditions)})
    summary["wall_seconds"] = _timings(recipe.work)
    args.docs.mkdir(parents=True, exist_ok=True)
    write_json(args.docs / "claim.json", summary, sort_keys=False)
    draw(summary, args.docs / "claim.png")
    print(markdown(summary))

    for held in s["held"]:  # the shipped held-out adapters, fitted with ctrlora fit at the adapter arm's rate
        recipe.fit_adapter(held, claim["chosen"].get(("adapter", held), s["ablation_lr"]))
    preview = recipe.preview((*conditions, *s["held"]))
    if not args.no_export:
        export(recipe, conditions, s, summary, args.export.resolve())
        shutil.copyfile(preview, args.export.resolve() / "preview.png")
    print(f"recipe done in {time.time() - started:.0f} s")


class Recipe:
    def __init__(self, work: Path, settings: dict, in_process: bool = False):
        self.work, self.s, self.in_process = work, settings, in_process
        self.env = dict(os.environ, CTRLORA_HOME=str(work / "store"), CTRLORA_OFFLINE="1")
        self.pool = None  # the claim's worker processes, started at its first run and kept for the rest
        if in_process:  # before the commands' modules load (huggingface_hub reads the offline switch then)
            os.environ.update(self.env)
        work.mkdir(parents=True, exist_ok=True)

    def data(self, name: str) -> Path:
        return self.work / "data" / name

    def run(self, *args, capture: bool = False) -> str:
        command = [sys.executable, "-m", "ctrlora_cli", *map(str, args)]
        print("$ ctrlora " + " ".join(map(str, args)), flush=True)
        if self.in_process:
            code, out = self.run_here(command[3:], capture)
        else:
            done = subprocess.run(command, env=self.env, text=True, stdout=subprocess.PIPE if capture else None)
            code, out = done.returncode, done.stdout
        if code != 0:
            raise SystemExit(f"stage failed (exit {code}): ctrlora {' '.join(map(str, args))}")
        return out or ""

    def run_here(self, args: list[str], capture: bool) -> tuple[int, str]:
        """``ctrlora ARGS`` through the command's own ``main()`` (its parsing, checks and error
        handling) in this process, whose environment is the recipe's; (exit code, captured stdout).
        The signal handlers a command sets (train-base's SIGTERM) are put back after it."""
        import contextlib
        import io
        import signal

        from ctrlora_cli.app import main

        out = io.StringIO()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
                main(args)
            code = 0
        except SystemExit as exc:  # main() ends with sys.exit(code)
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        sys.stdout.flush()
        return code, out.getvalue()

    def has(self, name: str) -> bool:
        return (self.work / "store" / "manifests" / f"{name}.json").is_file()

    def stage(self, label: str, done: bool, *args) -> None:
        if done:
            print(f"[{label}] done earlier")
            return
        t0 = time.time()
        self.run(*args)
        self.log(label, time.time() - t0)

    def log(self, label: str, seconds: float) -> None:
        with open(self.work / "timings.jsonl", "a") as f:
            f.write(json.dumps({"stage": label, "seconds": round(seconds, 1)}) + "\n")

    def make_data(self, name: str, condition: str, count: int, seed: int) -> None:
        folder = self.data(name)
        if (folder / "prompt.json").is_file():
            return
        self.run("world", "make", folder, "--condition", condition, "--count", count, "--size", self.s["size"],
                 "--seed", seed, "--force")

    def folder(self, name: str) -> Path:
        from ctrlora_cli.store.store import Store

        return Store(self.work / "store").folder(name)

    def train_base(self, name: str, conditions, init: str, steps: int) -> None:
        s = self.s
        data = [f"{c}={self.data(c)}" for c in conditions]
        # --force: the stage starts over from what an interrupted attempt left (it saves no checkpoint to resume).
        self.stage(f"base {name}", self.has(name), "train-base", *data, "--init", init, "--out", name,
                   "--steps", steps, "--batch", s["base_batch"], "--lr", s["base_lr"], "--rank", s["rank"],
                   "--resolution", s["size"], "--save-every", 0, "--run-dir", self.work / "runs" / name, "--json",
                   "--force")

    def fit_adapter(self, held: str, lr: float) -> None:
        s = self.s
        self.stage(f"fit demo-{held}", self.has(f"demo-{held}"), "fit", self.data(held), "--name", f"demo-{held}",
                   "--base", "demo", "--steps", s["curve"][-1], "--batch", s["batch"], "--lr", lr, "--rank",
                   s["rank"], "--resolution", s["size"], "--save-every", 0, "--run-dir",
                   self.work / "runs" / f"fit-{held}", "--force")

    def claim(self, bases: list[str]) -> dict:
        """The paper's claim (engine.demo.claim): the bare base per held-out condition, what each
        base buys (the adapter arm on the first held-out condition), the lr sweep, then every arm at
        its rate on every seed and data size. Each run's result is a file: an interrupted stage
        redoes only the runs it had not finished."""
        try:
            return self._claim(bases)
        finally:
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None

    def _claim(self, bases: list[str]) -> dict:
        from engine.demo.claim import ArmRun
        from engine.demo.settings import EvalSettings

        s, folder = self.s, self.work / "claim"
        sd_dir = self.folder("demo-sd")
        base_dir = lambda name: self.folder(name) / "controlnet"  # noqa: E731
        ev = EvalSettings(steps=s["eval_steps"], guidance=s["guidance"])

        def arm_run(arm, held, pairs, seed, lr, curve, base=""):
            return ArmRun(arm, str(self.data(held)), str(self.data(f"eval-{held}")), held, pairs, tuple(curve), lr,
                          seed=seed, batch=s["batch"], rank=s["rank"], resolution=s["size"], eval=ev,
                          eval_pairs=s["eval_pairs"], base=base)

        bare = {}
        for held in s["held"]:
            bare[held] = self.cached(folder / f"bare-{held}.json", "bare", held, lambda h=held: _bare(
                sd_dir, base_dir("demo"), self.data(f"eval-{h}"), h, ev, s["eval_pairs"]))
        # What each base buys: the adapter arm, first held-out condition, one seed, the full data.
        held0 = s["held"][0]
        ablation = {b: (arm_run("adapter", held0, s["pairs"], 0, s["ablation_lr"], s["ablation_curve"], b), base_dir(b))
                    for b in bases}
        done = self.runs(folder / "bases", list(ablation.values()), sd_dir, "what each base buys")
        base_rows = {}
        for b, (run, _) in ablation.items():
            result = done[run.key]
            base_rows[b] = {"curve": [(p["steps"], p["value"]) for p in result["curve"]],
                            "bare": self.cached(folder / f"bare-{held0}-{b}.json", "bare", b, lambda b=b: _bare(
                                sd_dir, base_dir(b), self.data(f"eval-{held0}"), held0, ev, s["eval_pairs"]))["value"]}
        # The sweep: short runs of every arm at every rate, seed 0, the full data; the best by the mean
        # over the sweep's curve. Where an arm's best is the highest rate tried, the next rate up
        # (half a decade) runs too, up to sweep_grow times, for every arm alike: no arm is held back
        # by the grid.
        rates = {(a, h): list(s["lrs"]) for h in s["held"] for a in s["arms"]}
        swept, sweep, chosen = {}, {}, {}
        for _ in range(3):
            runs = [(arm_run(a, h, s["sizes"][0], s["seeds"][0], lr, s["sweep_curve"]), base_dir("demo"))
                    for (a, h), lrs in rates.items() for lr in lrs]
            swept.update(self.runs(folder / "sweep", runs, sd_dir, "lr sweep"))
            grown = False
            for (a, h), lrs in rates.items():
                tried = {lr: swept[arm_run(a, h, s["sizes"][0], s["seeds"][0], lr, s["sweep_curve"]).key]
                         for lr in lrs}
                higher = next(iter(tried.values()))["higher_is_better"]
                mean = {lr: sum(p["value"] for p in r["curve"]) / len(r["curve"]) for lr, r in tried.items()}
                best = (max if higher else min)(mean, key=mean.get)
                chosen[(a, h)] = best
                sweep[f"{a}/{h}"] = {"chosen": best, "mean_over_curve": {f"{lr:g}": v for lr, v in mean.items()},
                                     "curves": {f"{lr:g}": [(p["steps"], p["value"]) for p in r["curve"]]
                                                for lr, r in tried.items()}}
                if best == max(lrs) and len(lrs) < len(s["lrs"]) + s["sweep_grow"]:
                    lrs.append(float(f"{best * (3 if f'{best:.0e}'[0] == '1' else 10 / 3):.1g}"))  # 1e-3, 3e-3, 1e-2
                    grown = True
            if not grown:
                break
        main_runs = [(arm_run(a, h, n, seed, chosen[(a, h)], s["curve"]), base_dir("demo"))
                     for h in s["held"] for a in s["arms"] for n in s["sizes"] for seed in s["seeds"]]
        results = self.runs(folder / "runs", main_runs, sd_dir, "arms")
        return {"bare": bare, "runs": [results[r.key] for r, _ in main_runs], "sweep": sweep, "chosen": chosen,
                "bases": base_rows}

    def cached(self, path: Path, label: str, what: str, compute) -> dict:
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.time()
        value = compute()
        write_json(path, value, sort_keys=False)
        self.log(f"{label} {what}", time.time() - t0)
        return value

    def runs(self, folder: Path, runs: list, sd_dir: Path, label: str) -> dict:
        """Every run's result by key: read where a file holds it, else run (``jobs`` at once, each
        with its share of the cores) and written whole as it finishes."""
        from concurrent.futures import ProcessPoolExecutor, as_completed
        import multiprocessing

        from engine.demo.claim import run_to_file

        results, todo = {}, []
        for run, base in runs:
            path = folder / f"{run.key}.json"
            if path.is_file():
                results[run.key] = json.loads(path.read_text())
            elif (copied := self.same_run(run, path)) is not None:  # another stage's, same settings (--quick)
                results[run.key] = copied
            elif run.key not in {r.key for r, _, _ in todo}:
                todo.append((run, base, path))
        if not todo:
            print(f"[{label}] done earlier")
            return results
        jobs = max(1, min(self.s["jobs"], len(todo)))
        threads = max(1, (os.cpu_count() or 2) // jobs)
        t0 = time.time()
        print(f"[{label}] {len(todo)} runs, {jobs} at once, {threads} threads each", flush=True)
        if self.pool is None:  # one pool for every stage of the claim: its workers start (import torch) once
            self.pool = ProcessPoolExecutor(self.s["jobs"], mp_context=multiprocessing.get_context("spawn"))
        futures = {self.pool.submit(run_to_file, run, sd_dir, base, self.work / "cache", path, threads): run
                   for run, base, path in todo}
        for future in as_completed(futures):
            result = future.result()
            results[result["key"]] = result
            print(f"  {result['key']}: " + " ".join(f"{p['value']:.3f}" for p in result["curve"])
                  + f" ({result['seconds']:.0f} s)", flush=True)
        self.log(label, time.time() - t0)
        return results

    def same_run(self, run, path: Path) -> dict | None:
        """The result of a run of exactly ``run``'s settings that another claim stage's folder holds,
        copied to ``path`` (whole, so this stage reads it from its own folder from now on); None if
        there is none."""
        for other in sorted((self.work / "claim").glob(f"*/{run.key}.json")):
            result = json.loads(other.read_text())
            if result["run"] == run.as_dict():
                write_json(path, result, sort_keys=False)
                return result
        return None

    def preview(self, conditions, scenes: int = 3, zoom: int = 4) -> Path:
        """``preview.png``: for every adapter, ``scenes`` unseen scenes (world seed 2) as rows of
        condition | generated | the scene itself, drawn with ``ctrlora eval --save``."""
        from PIL import Image

        path = self.work / "preview.png"
        if path.is_file():
            return path
        s = self.s
        rows = []
        for condition in conditions:
            data, out = self.work / "preview" / condition, self.work / "preview" / f"{condition}-out"
            if not (data / "prompt.json").is_file():
                self.run("world", "make", data, "--condition", condition, "--count", scenes, "--size", s["size"],
                         "--seed", 2, "--force")
            self.run("eval", f"demo-{condition}", data, "--base", "demo", "--steps", s["eval_steps"],
                     "--guidance", s["guidance"], "--save", out, "--json", capture=True)
            for i in range(scenes):
                rows.append([Image.open(data / "source" / f"{i}.png"), Image.open(out / f"{i}.png"),
                             Image.open(data / "target" / f"{i}.png")])
        side, gap = s["size"] * zoom, 4
        columns = 3 * scenes  # scene k: condition, generated, target; a wider gap between scenes
        x = [c * (side + gap) + c // 3 * 3 * gap for c in range(columns)]
        sheet = Image.new("RGB", (x[-1] + side, len(conditions) * (side + gap) - gap), "white")
        for r in range(len(conditions)):
            for c in range(columns):
                image = rows[r * scenes + c // 3][c % 3].convert("RGB").resize((side, side), Image.NEAREST)
                sheet.paste(image, (x[c], r * (side + gap)))
        with atomic_path(path) as tmp:  # whole or absent: the stage is skipped when the file exists
            sheet.save(tmp, format="PNG")
        return path


def _bare(sd_dir, base_dir, eval_data, kind, settings, eval_pairs) -> dict:
    from engine.demo.claim import bare_and_ceiling

    return bare_and_ceiling(sd_dir, base_dir, eval_data, kind, settings, eval_pairs)


def export(recipe: Recipe, conditions, s: dict, summary: dict, target: Path) -> None:
    """fp16 weights of demo-sd, demo and its adapters, plus demo.json, into ``target``."""
    from ctrlora_cli.store.demo import export_demo
    from ctrlora_cli.store.store import Store

    adapters = {c: f"demo-{c}" for c in (*conditions, *s["held"])}
    claim = {"verdict": summary["verdict"], "bases": summary["settings"]["bases"], "details": "docs/claim.json"}
    export_demo(Store(recipe.work / "store"), target, sd="demo-sd", base="demo", adapters=adapters,
                about={"settings": s, "claim": claim, "timings": _timings(recipe.work)})
    print(f"exported the demo to {target}")


def _timings(work: Path) -> list[dict]:
    path = work / "timings.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


if __name__ == "__main__":
    main()
