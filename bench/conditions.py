"""Speed of the built-in condition extractors on a 512 x 512 photo-like image, of the fidelity
measure, and of writing demo-world pairs. CPU only (numpy). Prints JSON.

    python bench/conditions.py [--repeats 5] [--pairs 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.demo.extractors import SPECS, extract  # noqa: E402
from engine.demo.fidelity import fidelity  # noqa: E402
from engine.demo.world import CONDITIONS, make_scene, write_dataset  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Smoothed noise with some structure: many edges, many colours, like a photograph.
    noise = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    photo = noise.filter(ImageFilter.GaussianBlur(4)).point(lambda v: max(0, min(255, (v - 128) * 4 + 128)))
    extract_ms = {kind: round(1000 * best_of(args.repeats, lambda k=kind: extract(k, photo)), 2) for kind in SPECS}

    scene = make_scene(0, size=64)
    image = scene.image()
    fidelity_ms = {}
    for kind in CONDITIONS:
        condition = scene.condition(kind, image)
        fidelity_ms[kind] = round(1000 * best_of(args.repeats, lambda k=kind, c=condition: fidelity(k, image, c)), 2)

    world = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("canny", "seg", "palette"):
            seconds = best_of(1, lambda k=kind: write_dataset(Path(tmp) / k, k, args.pairs, size=64))
            world[kind] = round(args.pairs / seconds, 1)
    print(json.dumps({"extract_ms_512": extract_ms, "fidelity_ms_64": fidelity_ms,
                      "world_pairs_per_s_64": world}, indent=2))


if __name__ == "__main__":
    main()
