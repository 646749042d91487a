"""Samples per second per process of ``train-base`` and the scaling efficiency from 1 to 2
processes. CPU: the tiny preset (gloo); GPU: pass --preset sd15 on a machine with 2 GPUs.
Prints JSON.

    python bench/train_base.py [--steps 12] [--preset tiny] [--resolution 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_data(folder: Path, conditions=("edges", "mask"), count=8, size=64) -> list[str]:
    from engine.demo.world import write_dataset

    specs = []
    for condition, world_condition in zip(conditions, ("canny", "seg")):
        write_dataset(folder / condition, world_condition, count, size=max(size, 32))
        specs.append(f"{condition}={folder / condition}")
    return specs


def run(nproc: int, args, sd: str, data: list[str], out: Path) -> dict:
    from engine.training.launcher import METRICS, Topology, worker_command, worker_env
    from engine.training.settings import TrainBaseSettings

    # The threads of each process as ctrlora train-base gives them (its share of the cores).
    # The repository first, and whatever PYTHONPATH already held (packages installed with --target).
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = worker_env(nproc, dict(os.environ, PYTHONPATH=path))
    settings = TrainBaseSettings(sd=sd, out=str(out), data=tuple(data), steps=args.steps, rank=args.rank,
                                 resolution=args.resolution, cache=str(out.parent / "cache")).checked()
    command = worker_command(Topology(nproc_per_node=nproc), settings)  # what ctrlora train-base runs on one node
    subprocess.run(command, check=True, env=env, capture_output=True)
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    steady = records[2:] or records  # the first steps warm up
    per_process = sum(sum(r["per_rank_samples_per_s"]) / len(r["per_rank_samples_per_s"]) for r in steady) / len(steady)
    return {"processes": nproc, "threads_per_process": int(env["OMP_NUM_THREADS"]),
            "samples_per_s_per_process": per_process, "samples_per_s": per_process * nproc}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    from engine.models.storage import make_random_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_random_model(args.preset, tmp / "sd", tmp / "base")
        data = make_data(tmp / "data", size=args.resolution)
        one = run(1, args, str(tmp / "sd"), data, tmp / "run1")
        two = run(2, args, str(tmp / "sd"), data, tmp / "run2")
    import torch

    print(json.dumps({"bench": "train_base", "preset": args.preset, "resolution": args.resolution,
                      "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
                      "results": [one, two],
                      "scaling_efficiency_1_to_2": two["samples_per_s"] / (2 * one["samples_per_s"])}, indent=2))


if __name__ == "__main__":
    main()
