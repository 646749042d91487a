"""Training steps per second and trainable parameters: a CtrLoRA adapter (``AdapterTrainer`` on the
Base ControlNet) against a standard ControlNet (``engine.demo.standard_controlnet``), on the demo
model and a world data set. Prints JSON.

    python -m ctrlora_cli pull demo
    python -m ctrlora_cli world make DATA --condition sketch -n 200 --size 32
    python bench/standard_controlnet.py DATA [--batch 16] [--steps 10] [--rounds 2] [--rank 128]

Both train in this process, in alternating rounds of ``--steps`` steps (after one warm-up step
each); each keeps its best round. fp32, the CPU unless ``--device``. The store is the user's
(``CTRLORA_HOME``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--base", default="demo")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from ctrlora_cli.store.resolve import base_folders
    from ctrlora_cli.store.store import Store
    from engine.demo.standard_controlnet import StandardControlNetTrainer, build_standard_controlnet
    from engine.generation.sampling import vae_scale_factor
    from engine.models.storage import load_base, load_sd
    from engine.training.fit import AdapterTrainer, FitConfig
    from engine.training.pairs import LatentCache, encode_pairs, scan_folder

    _, controlnet_dir, sd_dir = base_folders(Store(), args.base)
    sd = load_sd(sd_dir)
    pairs = scan_folder(args.data)
    with tempfile.TemporaryDirectory() as cache:
        data = encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, args.size, LatentCache(cache),
                            condition_pixels=True)
    config = FitConfig(batch=args.batch, rank=args.rank, resolution=args.size, precision="fp32", device=args.device)
    trainers = {
        "adapter": AdapterTrainer(sd.unet, load_base(controlnet_dir), sd.scheduler, data, config),
        "standard": StandardControlNetTrainer(sd.unet, build_standard_controlnet(sd.unet, vae_scale_factor(sd.vae)),
                                              sd.scheduler, data, config),
    }
    best = {name: float("inf") for name in trainers}
    for trainer in trainers.values():
        trainer.train_step()  # warm-up
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    result = {name: {"steps_s": 1 / best[name], "seconds_per_step": best[name],
                     "trainable_parameters": trainer.trainable_parameters()} for name, trainer in trainers.items()}
    result["standard_over_adapter_seconds"] = best["standard"] / best["adapter"]
    result["settings"] = {**vars(args), "threads": torch.get_num_threads(), "pairs": len(pairs)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
