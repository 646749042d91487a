"""Time and peak memory of one Base ControlNet forward at the SD1.5 shape (random weights),
with 0, 1 and 2 adapters (rank 128). 256 x 256 on CPU, 512 x 512 on CUDA. Prints JSON.

    python bench/model.py [--repeats 3] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.models import adapters  # noqa: E402
from engine.models.controlnet import BaseControlNetModel  # noqa: E402
from engine.models.presets import unet_config  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    size = args.size or (512 if cuda else 256)
    torch.manual_seed(0)
    model = BaseControlNetModel(**BaseControlNetModel.config_from_unet(unet_config("sd15"))).to(device).eval()
    if dtype != torch.float32:
        model.to(dtype)
    results = []
    for n_adapters in (0, 1, 2):
        if n_adapters:
            adapters.add_adapter(model, f"c{n_adapters}", rank=128)
            model.to(device)
            if dtype != torch.float32:
                model.to(dtype)
        names = [f"c{i + 1}" for i in range(n_adapters)]
        batch = max(1, n_adapters)
        plan = [(n, 1) for n in names] if names else None
        cond = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype)
        ctx = torch.randn(batch, 77, 768, device=device, dtype=dtype)
        t = torch.tensor([500] * batch, device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        with torch.no_grad(), model.routing.use(plan):
            for i in range(args.repeats + 1):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(cond, t, ctx)
                if cuda:
                    torch.cuda.synchronize()
                if i:  # the first call warms up
                    times.append(time.perf_counter() - start)
        results.append({
            "adapters": n_adapters,
            "batch": batch,
            "seconds_per_forward": min(times),
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb(),
        })
    print(json.dumps({"bench": "model", "device": device, "dtype": str(dtype), "size": size,
                      "threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
