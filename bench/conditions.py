"""Speed of the built-in condition extractors on a 512 x 512 photo-like image, of the fidelity
measure, and of writing demo-world pairs; and the fidelity of world scenes against their own
condition and against another scene's (the means docs/demo.md quotes). CPU only (numpy). Prints JSON.

    python bench/conditions.py [--repeats 5] [--pairs 200] [--scenes 50] [--only-fidelity]
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
from engine.demo.fidelity import PRIMARY, aggregate, fidelity  # noqa: E402
from engine.demo.world import CONDITIONS, make_scene, write_dataset  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def own_vs_other(scenes: int, size: int = 64) -> dict:
    """The headline fidelity of scenes 0..n-1 (world seed 0) against their own condition, and of
    scene n+i's image against scene i's condition: means over the n scenes, per condition."""
    table = {}
    for kind in CONDITIONS:
        metric = PRIMARY[kind][0]
        own, other = [], []
        for i in range(scenes):
            scene = make_scene(i, 0, size)
            image = scene.image()
            condition = scene.condition(kind, image)
            own.append(fidelity(kind, image, condition))
            other.append(fidelity(kind, make_scene(scenes + i, 0, size).image(), condition))
        table[kind] = {"metric": metric, "own": round(aggregate(own)[metric], 4),
                       "other": round(aggregate(other)[metric], 4)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--scenes", type=int, default=50, help="scenes for own-vs-other fidelity")
    parser.add_argument("--only-fidelity", action="store_true", help="only the own-vs-other fidelity")
    args = parser.parse_args()
    fidelity_64 = {"fidelity_own_vs_other_64": own_vs_other(args.scenes)}
    if args.only_fidelity:
        print(json.dumps(fidelity_64, indent=2))
        return
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
                      "world_pairs_per_s_64": world, **fidelity_64}, indent=2))


if __name__ == "__main__":
    main()
