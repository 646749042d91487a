"""Samples per second per process of ``train-base`` and the scaling efficiency from 1 to 2
processes. CPU: the tiny preset (gloo); GPU: pass --preset sd15 on a machine with 2 GPUs.
Prints JSON.

Both main configurations get the same total CPU threads (``--threads`` T, default: the cores this
process may use): 1 process with all T, 2 processes with T/2 each; ``throughput_2_over_1_same_threads``
is their ratio (above 1.0 where one process cannot use all T threads: tiny models). The scaling
efficiency compares like with like per process: 2 processes of T/2 threads against twice 1
process of T/2 threads (``scaling_efficiency_1_to_2``, at most 1.0 when the work per sample is the
same: what is lost to the gradient all-reduce and duplicated work).
Throughput is the median over the steps after the first two (warm-up), best of ``--rounds``
alternating rounds (a shared machine slows some of them).

    python bench/train_base.py [--steps 12] [--preset tiny] [--resolution 64] [--threads 2] [--rounds 2]
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


def run(nproc: int, threads: int, args, sd: str, data: list[str], out: Path) -> dict:
    from engine.training.launcher import METRICS, Topology, worker_command, worker_env
    from engine.training.settings import TrainBaseSettings

    # Each process its share of the same total threads (how ctrlora train-base shares the cores).
    env = worker_env(nproc, dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, threads // nproc))))
    settings = TrainBaseSettings(sd=sd, out=str(out), data=tuple(data), steps=args.steps, rank=args.rank,
                                 resolution=args.resolution, cache=str(out.parent / "cache")).checked()
    command = worker_command(Topology(nproc_per_node=nproc), settings)  # what ctrlora train-base runs on one node
    import shutil
    import statistics

    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(command, check=True, env=env, capture_output=True)
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    steady = records[2:] or records  # the first steps warm up
    total = statistics.median(r["samples_per_s"] for r in steady)  # every rank's samples, per second
    return {"processes": nproc, "threads_per_process": int(env["OMP_NUM_THREADS"]),
            "samples_per_s_per_process": total / nproc, "samples_per_s": total}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="total CPU threads of every configuration "
                        "(default: the cores this process may use)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each configuration keeps its best")
    args = parser.parse_args()
    from engine.training.launcher import threads_per_process

    threads = args.threads or threads_per_process(1)
    from engine.models.storage import make_random_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_random_model(args.preset, tmp / "sd", tmp / "base")
        data = make_data(tmp / "data", size=args.resolution)
        best: dict[tuple[int, int], dict] = {}
        configs = [(1, threads), (1, max(1, threads // 2)), (2, threads)]  # (processes, total threads)
        for _ in range(args.rounds):
            for nproc, total in configs:
                result = run(nproc, total, args, str(tmp / "sd"), data, tmp / f"run{nproc}-{total}")
                if (nproc, total) not in best or result["samples_per_s"] > best[nproc, total]["samples_per_s"]:
                    best[nproc, total] = result
        one, half, two = (best[c] for c in configs)
    import torch

    print(json.dumps({"bench": "train_base", "preset": args.preset, "resolution": args.resolution,
                      "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
                      "total_threads": threads, "rounds": args.rounds, "results": [one, half, two],
                      "throughput_2_over_1_same_threads": two["samples_per_s"] / one["samples_per_s"],
                      "scaling_efficiency_1_to_2": two["samples_per_s_per_process"] / half["samples_per_s"]},
                     indent=2))


if __name__ == "__main__":
    main()
