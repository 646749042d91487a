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

``--shards``: instead, training from raw shards against latent shards (``encode-shards``), one
process with the same threads, and the data path alone (the model replaced by a no-op: only the
shard readers and the feed) with 1, 2 and 4 background readers:

    python bench/train_base.py --shards [--steps 12] [--preset tiny] [--resolution 64]

``--memory``: the memory each ``--precision`` takes, one process per precision (fp32, bf16) on
the same model, data and steps: its peak resident memory (CPU) and, on a GPU, the most CUDA
memory its tensors held (``torch.cuda.max_memory_allocated``), as the worker records them in
``ranks/rank0.json``; the model's size is printed with them (parameters of the frozen UNet and of
the base that trains):

    python bench/train_base.py --memory [--preset sd15] [--resolution 64] [--steps 2] [--threads 1]
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


def run(nproc: int, threads: int, args, sd: str, data: list[str], out: Path, precision: str = "auto") -> dict:
    from engine.training.launcher import METRICS, RANKS, Topology, worker_command, worker_env
    from engine.training.settings import TrainBaseSettings

    # Each process its share of the same total threads (how ctrlora train-base shares the cores).
    # The repository first, and whatever PYTHONPATH already held (packages installed with --target).
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = worker_env(nproc, dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(max(1, threads // nproc))))
    settings = TrainBaseSettings(sd=sd, out=str(out), data=tuple(data), steps=args.steps, rank=args.rank,
                                 resolution=args.resolution, precision=precision,
                                 cache=str(out.parent / "cache")).checked()
    command = worker_command(Topology(nproc_per_node=nproc), settings)  # what ctrlora train-base runs on one node
    import shutil
    import statistics

    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(command, check=True, env=env, capture_output=True)
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    steady = records[2:] or records  # the first steps warm up
    total = statistics.median(r["samples_per_s"] for r in steady)  # every rank's samples, per second
    ranks = [json.loads((out / RANKS / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {"processes": nproc, "threads_per_process": int(env["OMP_NUM_THREADS"]),
            "samples_per_s_per_process": total / nproc, "samples_per_s": total,
            "precision": ranks[0]["precision"], "unet_dtype": ranks[0]["unet_dtype"],
            "peak_rss_mib_per_process": [round(r["peak_rss_mib"]) for r in ranks],
            **({"gpu_max_allocated_gib_per_process": [round(r["gpu_max_allocated_gib"], 2) for r in ranks]}
               if "gpu_max_allocated_gib" in ranks[0] else {})}


def parameters(folder: Path) -> int:
    """The parameters in a folder's safetensors files (read from their headers)."""
    import math

    from safetensors import safe_open

    count = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            count += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return count


def memory_bench(args) -> None:
    """One process per precision, the same model, data and steps: peak memory of each."""
    from engine.models.storage import make_random_model

    threads = args.threads or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_random_model(args.preset, tmp / "sd", tmp / "base", any_tokenizer=True)
        size = {"unet_parameters": parameters(tmp / "sd" / "unet"), "base_parameters": parameters(tmp / "base")}
        data = make_data(tmp / "data", size=args.resolution)
        results = [run(1, threads, args, str(tmp / "sd"), data, tmp / f"run-{p}", precision=p)
                   for p in ("fp32", "bf16")]
    import torch

    fp32, bf16 = results
    peak = "gpu_max_allocated_gib_per_process" if "gpu_max_allocated_gib_per_process" in fp32 else \
        "peak_rss_mib_per_process"
    print(json.dumps({"bench": "train_base --memory", "preset": args.preset, "resolution": args.resolution,
                      "batch": 1, "lora_rank": args.rank, "conditions": 2, "steps": args.steps,
                      "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(), **size,
                      "results": results, "bf16_over_fp32_peak": bf16[peak][0] / fp32[peak][0]}, indent=2))


def make_shards(specs: list[str], folder: Path, shards: int = 16, copies: int = 4) -> list[Path]:
    """Raw tar shards of the folders' pairs (each pair ``copies`` times), dealt over ``shards`` files."""
    import io
    import tarfile

    from engine.training.pairs import scan_folder

    samples = [(c, p) for spec in specs for c, f in [spec.split("=", 1)] for p in scan_folder(f).pairs] * copies
    folder.mkdir(parents=True)
    paths = [folder / f"shard-{s:04d}.tar" for s in range(shards)]
    tars = [tarfile.open(p, "w") for p in paths]
    for i, (condition, pair) in enumerate(samples):
        tar = tars[i % shards]
        for name, data in ((f"{i:06d}.png", pair.target.read_bytes()), (f"{i:06d}.cond.png", pair.source.read_bytes()),
                           (f"{i:06d}.json", json.dumps({"condition": condition, "prompt": pair.prompt}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for tar in tars:
        tar.close()
    return paths


def run_shards(glob: str, args, sd: str, out: Path, workers: int, conditions: str | None) -> dict:
    """One process trained from shards (raw: the VAE encodes in the step; latent: no VAE)."""
    from engine.training.launcher import METRICS, Topology, worker_command, worker_env
    from engine.training.settings import TrainBaseSettings

    env = worker_env(1, dict(os.environ, PYTHONPATH=str(REPO)))
    settings = TrainBaseSettings(sd=sd, out=str(out), shards=(glob,), conditions=conditions, steps=args.steps,
                                 rank=args.rank, resolution=args.resolution, workers=workers,
                                 cache=str(out / "cache")).checked()
    subprocess.run(worker_command(Topology(), settings), check=True, env=env, capture_output=True)
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    steady = records[2:] or records
    return {"threads_per_process": int(env["OMP_NUM_THREADS"]), "workers": workers,
            "samples_per_s": sum(r["samples_per_s"] for r in steady) / len(steady)}


def data_path(paths: list[Path], decode, workers: int, samples: int, conditions: list[str]) -> dict:
    """The shard readers and the feed alone: samples/s taken, one condition per micro-batch."""
    import time

    from engine.training.stream import Layout, fresh_states, open_feed

    layout = Layout(1, workers)
    feed = open_feed(paths, layout, 0, *fresh_states(layout), seed=0, decode=decode, background=True)
    feed.take(conditions[0], 4)  # the readers start (fork) before the clock
    start, taken = time.perf_counter(), 0
    while taken < samples:
        taken += len(feed.take(conditions[taken // 4 % len(conditions)], 4))
    return {"workers": workers, "samples_per_s": taken / (time.perf_counter() - start)}


def shards_bench(args) -> None:
    from engine.models.storage import make_random_model
    from engine.runtime import resolve_device
    from engine.training.latent_shards import LatentDecoder, encode_shards
    from engine.training.shards import RawDecoder

    conditions = ["edges", "mask"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_random_model(args.preset, tmp / "sd", tmp / "base")
        paths = make_shards(make_data(tmp / "data", size=args.resolution, count=16), tmp / "raw")
        encode_shards(paths, tmp / "latent", tmp / "sd", args.resolution, resolve_device("auto"))
        latent_paths = sorted((tmp / "latent").glob("*.tar"))
        raw = run_shards(str(tmp / "raw" / "*.tar"), args, str(tmp / "sd"), tmp / "run-raw", 2, ",".join(conditions))
        latent = run_shards(str(tmp / "latent" / "*.tar"), args, str(tmp / "sd"), tmp / "run-latent", 2, None)
        raw_decode = RawDecoder(tuple(conditions), args.resolution, str(tmp / "no-cache"), "none")
        readers = {"raw": [data_path(paths, raw_decode, w, args.data_samples, conditions) for w in (1, 2, 4)],
                   "latent": [data_path(latent_paths, LatentDecoder(tuple(conditions)), w, args.data_samples,
                                        conditions) for w in (1, 2, 4)]}
    import torch

    print(json.dumps({"bench": "train_base --shards", "preset": args.preset, "resolution": args.resolution,
                      "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
                      "train_raw_shards": raw, "train_latent_shards": latent,
                      "latent_over_raw": latent["samples_per_s"] / raw["samples_per_s"],
                      "data_path_only": readers}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--shards", action="store_true", help="raw against latent shards, and the data path alone")
    parser.add_argument("--memory", action="store_true", help="peak memory of one process per --precision (fp32, "
                        "bf16)")
    parser.add_argument("--data-samples", type=int, default=2000, help="--shards: samples the data path draws")
    parser.add_argument("--threads", type=int, default=None, help="total CPU threads of every configuration "
                        "(default: the cores this process may use)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each configuration keeps its best")
    args = parser.parse_args()
    if args.shards:
        shards_bench(args)
        return
    if args.memory:
        memory_bench(args)
        return
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
