"""The recipe of the demo model that ships with ctrlora (``ctrlora pull demo``), and of the
fidelity table in docs/demo.md: every stage is one of the project's own commands.

1. ``ctrlora world train-sd``: a toy Stable Diffusion (VAE, text encoder, v-prediction UNet of
   the ``demo`` preset) trained on 32 x 32 world scenes.
2. ``ctrlora world make``: 1,000 pairs for each base condition and for the held-out one, and a
   held-out evaluation set drawn from another world seed (scenes never seen in training).
3. ``ctrlora train-base``: the demo Base ControlNet and one adapter per base condition.
4. The paper's claim at toy scale, on the held-out condition, with the same data and steps:
   (b) ``ctrlora fit``: a CtrLoRA adapter on the base, scored by ``ctrlora eval`` after each
   stage of the schedule; (c) ``ctrlora train-base`` on that condition alone from the UNet: a
   ControlNet of the same architecture trained from scratch, scored the same way; (a) the base
   with no adapter (``ctrlora eval none``).
5. ``preview.png``: condition | generated | scene, for every adapter on unseen scenes.
6. Export: fp16 weights, ``demo.json`` (names, sizes, the table) and the preview into the
   package folder beside this file (or ``--export``).

    python ctrlora_cli/data/demo/recipe.py [--work build/demo] [--export DIR] [--quick]

Every stage is skipped when its result exists in the work folder, so an interrupted recipe
continues where it stopped. ``--quick`` runs every stage with tiny settings (the CI test).
The full settings take about an hour on 2 quiet CPU cores (docs/demo.md, "The demo model").
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
    pairs=1000, eval_pairs=64, rank=16, batch=16,
    base_steps=1500, base_batch=32, base_lr=3e-4,
    held="sketch", curve=[50, 100, 200, 400], lr=3e-4,
    eval_steps=20, guidance=5.0, threshold=None,
)
QUICK = dict(
    size=32, sd_count=64, vae_steps=3, unet_steps=3, sd_batch=8, vae_batch=8,
    pairs=8, eval_pairs=2, rank=4, batch=4,
    base_steps=2, base_batch=4, base_lr=3e-4,
    held="sketch", curve=[2], lr=3e-4,
    eval_steps=2, guidance=5.0, threshold=None,
)
BASE_CONDITIONS = ("canny", "seg", "depth", "bbox", "outpainting")
QUICK_BASE_CONDITIONS = ("canny", "seg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("build/demo"), help="work folder (store, data, runs)")
    parser.add_argument("--export", type=Path, default=HERE, help="where the weights and demo.json go")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks every stage in a minute")
    parser.add_argument("--no-export", action="store_true", help="stop after the fidelity table")
    args = parser.parse_args()
    s = dict(QUICK if args.quick else FULL)
    conditions = QUICK_BASE_CONDITIONS if args.quick else BASE_CONDITIONS
    recipe = Recipe(args.work.resolve(), s)
    started = time.time()

    recipe.stage("toy SD", recipe.has("demo-sd"), "world", "train-sd", "--name", "demo-sd", "--size", s["size"],
                 "--count", s["sd_count"], "--vae-steps", s["vae_steps"], "--unet-steps", s["unet_steps"],
                 "--batch", s["sd_batch"], "--vae-batch", s["vae_batch"], "--json")
    for condition in (*conditions, s["held"]):
        recipe.make_data(condition, condition, s["pairs"], seed=0)
    recipe.make_data("eval", s["held"], s["eval_pairs"], seed=1)
    data = [f"{c}={recipe.data(c)}" for c in conditions]
    # --force: the stage starts over from what an interrupted attempt left (it saves no checkpoint to resume).
    recipe.stage("base", recipe.has("demo"), "train-base", *data, "--init", "demo-sd", "--out", "demo",
                 "--steps", s["base_steps"], "--batch", s["base_batch"], "--lr", s["base_lr"], "--rank", s["rank"],
                 "--resolution", s["size"], "--save-every", 0, "--run-dir", recipe.work / "runs" / "base", "--json",
                 "--force")

    table = recipe.compare(s)
    write_json(recipe.work / "fidelity.json", table, sort_keys=False)
    print(markdown_table(table))
    preview = recipe.preview((*conditions, s["held"]))
    if not args.no_export:
        export(recipe, conditions, s, table, args.export.resolve())
        shutil.copyfile(preview, args.export.resolve() / "preview.png")
    print(f"recipe done in {time.time() - started:.0f} s")


class Recipe:
    def __init__(self, work: Path, settings: dict):
        self.work, self.s = work, settings
        self.env = dict(os.environ, CTRLORA_HOME=str(work / "store"), CTRLORA_OFFLINE="1")
        work.mkdir(parents=True, exist_ok=True)

    def data(self, name: str) -> Path:
        return self.work / "data" / name

    def run(self, *args, capture: bool = False) -> str:
        command = [sys.executable, "-m", "ctrlora_cli", *map(str, args)]
        print("$ ctrlora " + " ".join(map(str, args)), flush=True)
        done = subprocess.run(command, env=self.env, text=True, stdout=subprocess.PIPE if capture else None)
        if done.returncode != 0:
            raise SystemExit(f"stage failed (exit {done.returncode}): ctrlora {' '.join(map(str, args))}")
        return done.stdout or ""

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

    def evaluate(self, adapter: str, base: str) -> dict:
        s = self.s
        out = self.run("eval", adapter, self.data("eval"), "--base", base, "--kind", s["held"], "--steps",
                       s["eval_steps"], "--guidance", s["guidance"], "--json", capture=True)
        return json.loads(out)

    def compare(self, s: dict) -> dict:
        """The held-out condition: the bare base, a fitted adapter and a ControlNet from scratch,
        scored after each stage of the same step schedule."""
        results_file = self.work / "compare.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}

        def save():
            write_json(results_file, results, sort_keys=False)

        held = s["held"]
        if "bare" not in results:
            results["bare"] = self.evaluate("none", "demo")
            save()
        for method in ("ctrlora", "scratch"):
            for i, steps in enumerate(s["curve"]):
                key = f"{method}@{steps}"
                if key in results:
                    continue
                t0 = time.time()
                resume = ["--resume"] if i else []
                if method == "ctrlora":
                    name = f"demo-{held}" if steps == s["curve"][-1] else f"fit-{held}-{steps}"
                    # --force: a stage interrupted after its fit (the entry made, its score not saved)
                    # is done again; without --resume it also starts the run over.
                    self.run("fit", self.data(held), "--name", name, "--base", "demo", "--steps", steps,
                             "--batch", s["batch"], "--lr", s["lr"], "--rank", s["rank"], "--resolution", s["size"],
                             "--save-every", 0, "--run-dir", self.work / "runs" / "fit", "--force", *resume)
                    adapter, base = name, "demo"
                else:
                    base = f"scratch-{steps}"
                    # --force: the first stage starts over from what an interrupted attempt left; a later
                    # one resumes the run's last checkpoint and replaces an entry an interrupted attempt stored.
                    self.run("train-base", f"{held}={self.data(held)}", "--init", "demo-sd", "--out", base,
                             "--steps", steps, "--batch", s["batch"], "--lr", s["lr"], "--rank", s["rank"],
                             "--resolution", s["size"], "--save-every", 0, "--run-dir", self.work / "runs" / "scratch",
                             "--json", "--force", *resume)
                    adapter = f"{base}-{held}"
                trained = time.time() - t0
                results[key] = {**self.evaluate(adapter, base), "train_seconds": round(trained, 1)}
                save()
                self.log(key, time.time() - t0)
        return summarise(results, s)

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


def summarise(results: dict, s: dict) -> dict:
    bare = results["bare"]
    metric, higher = bare["metric"], bare["higher_is_better"]
    ceiling = bare["ceiling"][metric]
    rows = {"bare": {"steps": 0, "value": bare["value"]}}
    curves = {m: [(n, results[f"{m}@{n}"]["value"]) for n in s["curve"]] for m in ("ctrlora", "scratch")}
    # The fixed fidelity of "steps to reach": half-way from the bare base to the data's own targets.
    threshold = s["threshold"] if s["threshold"] is not None else bare["value"] + 0.5 * (ceiling - bare["value"])
    for method, curve in curves.items():
        reached = [n for n, v in curve if (v >= threshold if higher else v <= threshold)]
        rows[method] = {"value": curve[-1][1], "curve": curve, "steps_to_threshold": reached[0] if reached else None,
                        "train_seconds": sum(results[f"{method}@{n}"]["train_seconds"] for n in s["curve"])}
    return {"condition": s["held"], "metric": metric, "higher_is_better": higher, "ceiling": ceiling,
            "threshold": threshold, "pairs": s["pairs"], "eval_pairs": s["eval_pairs"], "steps": s["curve"][-1],
            "rows": rows}


def markdown_table(table: dict) -> str:
    m, steps = table["metric"], table["steps"]
    r = table["rows"]

    def reach(row):
        n = row["steps_to_threshold"]
        return f"{n}" if n is not None else f"> {steps}"

    lines = [f"| {table['condition']} (held out), {table['pairs']} pairs, {steps} steps | {m} | "
             f"steps to {m} {table['threshold']:.3f} |",
             "| --- | --- | --- |",
             f"| (a) base, no adapter | {r['bare']['value']:.3f} | - |",
             f"| (b) CtrLoRA adapter fitted on the base | {r['ctrlora']['value']:.3f} | {reach(r['ctrlora'])} |",
             f"| (c) ControlNet from scratch (from the UNet) | {r['scratch']['value']:.3f} | {reach(r['scratch'])} |",
             f"| the data's own target images | {table['ceiling']:.3f} | - |"]
    curve = " / ".join(f"{n}" for n, _ in r["ctrlora"]["curve"])
    lines.append("")
    lines.append(f"{m} after {curve} steps: CtrLoRA " + " / ".join(f"{v:.3f}" for _, v in r["ctrlora"]["curve"])
                 + "; from scratch " + " / ".join(f"{v:.3f}" for _, v in r["scratch"]["curve"]))
    return "\n".join(lines)


def export(recipe: Recipe, conditions, s: dict, table: dict, target: Path) -> None:
    """fp16 weights of demo-sd, demo and its adapters, plus demo.json, into ``target``."""
    from ctrlora_cli.store.demo import export_demo
    from ctrlora_cli.store.store import Store

    adapters = {c: f"demo-{c}" for c in (*conditions, s["held"])}
    export_demo(Store(recipe.work / "store"), target, sd="demo-sd", base="demo", adapters=adapters,
                about={"settings": s, "fidelity": table, "timings": _timings(recipe.work)})
    print(f"exported the demo to {target}")


def _timings(work: Path) -> list[dict]:
    path = work / "timings.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


if __name__ == "__main__":
    main()
