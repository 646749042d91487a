"""Time per 512 x 512 image of each annotator (network + the reference's post-processing), on
random weights at the published networks' sizes (the time does not depend on the weights; the
OpenPose heatmaps are biased low so that, as with a trained network, few joints are found).
Also the built-in canny beside cv2.Canny on the same image. Prints JSON.

    python bench/annotators.py [--device cpu] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.annotators import annotate  # noqa: E402
from engine.annotators.random_weights import ENTRY_KINDS, write_random  # noqa: E402
from engine.demo.extractors import extract  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conditions import best_of  # noqa: E402  (bench/conditions.py)


def picture(size: int = 512) -> Image.Image:
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (size, size), (120, 160, 200))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        draw.ellipse((x, y, x + int(rng.integers(10, 150)), y + int(rng.integers(10, 150))),
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image = picture()
    results = {"image": "512x512", "device": args.device, "threads": torch.get_num_threads(),
               "weights": "random, published sizes", "seconds_per_image": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for entry, kinds in ENTRY_KINDS.items():
            folder = write_random(entry, Path(tmp) / entry, size="full")
            for kind in kinds:
                run = lambda: list(annotate(kind, [image], folder, device=args.device, resolution=512))  # noqa: E731
                run()  # warm up (first calls allocate)
                results["seconds_per_image"][kind] = round(best_of(args.repeats, run), 3)
    import cv2

    array = np.asarray(image)
    ours = best_of(5, lambda: extract("canny", image))
    theirs = best_of(5, lambda: cv2.Canny(array, 100, 200))
    results["canny"] = {"ours_s": round(ours, 4), "cv2_s": round(theirs, 5), "ours_over_cv2": round(ours / theirs, 1)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
