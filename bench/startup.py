"""Start-up of README's first command: the wall time of ``ctrlora gen`` making the demo's first
image (a fresh process each time, end to end), and how much of it is imports. Prints JSON.

    python bench/startup.py [--repeats 3] [--tree PATH] [--threads N] [--hide peft,accelerate,scipy]

``--tree``: another checkout's code (e.g. main's). ``--threads``: OMP_NUM_THREADS for the children
(default: torch's own choice). ``--hide``: run the children as if those installed distributions
were not there (``python -S`` on a shadow of site-packages without them): what a default install,
which pulls none of them, starts with.

Setup (once, in a temporary folder, offline): ``pull demo`` and ``world make ./demo --condition seg
-n 1 --size 32 --seed 7``. Then, ``--repeats`` times each, in fresh processes:

- ``gen_wall_s``: ``python -m ctrlora_cli gen --cond demo-seg=demo/source/0.png -p ... --seed 7``,
  wall seconds from start to exit (``gen_cpu_s``: that process's user + system seconds);
- ``gen_import_s``: the same command under ``python -X importtime``: the sum of its top-level
  imports (every module the command loads, when it loads it), with the packages that cost most
  (``gen_import_top``: their own seconds, summed per top-level package, from the median run);
- ``torch_import_s``: ``python -c "import torch"``, the floor the command's imports stand on (the
  peer: ``import_over_torch`` is their ratio, steadier than either figure on a busy machine);
- ``library_import_s``: a process that imports only the model classes the demo is made of
  (diffusers' UNet2DConditionModel and AutoencoderKL, transformers' CLIPTextModel): the floor any
  diffusers-based generation stands on, whatever its own code does (``import_over_library``: gen's
  imports over it); ``dynamo_import_s``: the part of it that is ``torch._dynamo``, which
  ``diffusers.utils.torch_utils`` imports at load;
- ``help_wall_s``: ``python -m ctrlora_cli --help``.

Medians are reported beside every run. The machine's load average at the start and the end says
whether the figures are an idle machine's. The code measured is this tree's (or ``--tree``'s), put
first on PYTHONPATH whatever is installed; the libraries are the installed ones (with peft
installed, diffusers imports it itself: ``peft_imported``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import site
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red triangle on a magenta background"
LIBRARY = ("import diffusers.models.unets.unet_2d_condition, diffusers.models.autoencoders.autoencoder_kl, "
           "transformers.models.clip.modeling_clip")
GEN = ["gen", "--cond", "demo-seg=demo/source/0.png", "-p", PROMPT, "--seed", "7", "--out", "demo.png", "--force"]


def shadow_site(hide: set[str], folder: Path) -> Path:
    """A folder of links to every entry of site-packages except the files of the ``hide`` distributions."""
    hidden = set()
    for name in hide:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        hidden |= {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for entry in Path(site.getsitepackages()[0]).iterdir():
        if entry.name not in hidden and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


def run(args: list[str], cwd: str, env: dict) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and stderr of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stderr


def import_times(stderr: str) -> tuple[float, dict[str, float]]:
    """The total of ``-X importtime``'s top-level imports (seconds), and each top-level package's
    own seconds (torch split by its first subpackage: torch._dynamo is not torch's core)."""
    total, own = 0, collections.Counter()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, raw = line[len("import time:"):].split("|")
        name = raw.strip()
        if len(raw) - len(raw.lstrip()) == 1:  # depth 0: nothing else was importing it
            total += int(cumulative_us)
        parts = name.split(".")
        own[".".join(parts[:2]) if parts[0] == "torch" and len(parts) > 1 else parts[0]] += int(self_us)
    return total / 1e6, {k: round(v / 1e6, 3) for k, v in own.most_common(8)}


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "runs": [round(v, 3) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each measurement (default: 3).")
    parser.add_argument("--tree", type=Path, default=ROOT, help="The checkout whose code runs (default: this one).")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children.")
    parser.add_argument("--hide", default="", help="Comma-separated distributions the children do not see.")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if not (args.tree / "ctrlora_cli" / "__main__.py").is_file():
        raise SystemExit(f"--tree {args.tree}: no ctrlora checkout there")

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(args.tree.resolve()), os.environ.get("PYTHONPATH", "")]
        hide = {h.strip() for h in args.hide.split(",") if h.strip()}
        py: list[str] = []
        if hide:
            (Path(tmp) / "site").mkdir()
            paths.insert(1, str(shadow_site(hide, Path(tmp) / "site")))
            py = ["-S"]  # no site-packages (nor its .pth files): the shadow stands in for it
        env = {**os.environ, "CTRLORA_HOME": f"{tmp}/home", "CTRLORA_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        cli = [*py, "-m", "ctrlora_cli"]
        run([*cli, "pull", "demo"], tmp, env)
        run([*cli, "world", "make", "./demo", "--condition", "seg", "-n", "1", "--size", "32", "--seed", "7"], tmp, env)

        walls, cpus, imports, tops, torch_s, helps, library, dynamo = [], [], [], [], [], [], [], []
        for _ in range(args.repeats):
            wall, cpu, _ = run([*cli, *GEN], tmp, env)
            walls.append(wall)
            cpus.append(cpu)
            _, _, stderr = run(["-X", "importtime", *cli, *GEN], tmp, env)
            total, top = import_times(stderr)
            imports.append(total)
            tops.append((total, top, "peft" in {line.split("|")[-1].strip() for line in stderr.splitlines()}))
            _, _, stderr = run(["-X", "importtime", *py, "-c", "import torch"], tmp, env)
            torch_s.append(import_times(stderr)[0])
            _, _, stderr = run(["-X", "importtime", *py, "-c", LIBRARY], tmp, env)
            library.append(import_times(stderr)[0])
            dynamo.append(max((int(line.split("|")[1]) for line in stderr.splitlines()  # cumulative
                               if line.split("|")[-1].strip() == "torch._dynamo"), default=0) / 1e6)
            helps.append(run([*cli, "--help"], tmp, env)[0])

    median_run = sorted(tops, key=lambda t: t[0])[len(tops) // 2]
    report = {
        "command": "ctrlora " + " ".join(GEN),
        "tree": str(args.tree.resolve()),
        "threads": args.threads,
        "hidden": sorted(hide),
        "repeats": args.repeats,
        "gen_wall_s": summary(walls),
        "gen_cpu_s": summary(cpus),
        "gen_import_s": summary(imports),
        "torch_import_s": summary(torch_s),
        "import_over_torch": round(statistics.median(imports) / statistics.median(torch_s), 2),
        "library_import_s": summary(library),
        "dynamo_import_s": summary(dynamo),
        "import_over_library": round(statistics.median(imports) / statistics.median(library), 2),
        "gen_import_top": median_run[1],
        "peft_imported": median_run[2],
        "help_wall_s": summary(helps),
        "cpus": os.cpu_count(),
        "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "python": sys.version.split()[0],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
