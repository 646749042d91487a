"""Small training pairs made in code (shared by the fit tests and, later, train-base's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def pair_images(i: int, size: int = 64, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """(condition, target): a coloured disk on a noisy background, and its edge-like outline."""
    rng = np.random.default_rng(seed * 1000 + i)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    radius = rng.integers(size // 8, size // 4)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    target = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    target[inside] = rng.integers(80, 255, 3)
    edge = np.abs(np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - radius) < 1.5
    source = np.zeros((size, size, 3), np.uint8)
    source[edge] = 255
    return Image.fromarray(source), Image.fromarray(target)


def make_pairs(folder: str | Path, n: int = 4, size: int = 64, layout: str = "reference", seed: int = 0,
               prompts: list[str] | None = None) -> Path:
    """Write ``n`` pairs in the reference layout (prompt.json) or a plain one ("plain-jsonl":
    prompts.jsonl, "plain-txt": one .txt per target)."""
    folder = Path(folder)
    (folder / "source").mkdir(parents=True, exist_ok=True)
    (folder / "target").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        source, target = pair_images(i, size, seed)
        source.save(folder / "source" / f"{i}.png")
        target.save(folder / "target" / f"{i}.png")
        prompt = prompts[i] if prompts else f"a red circle {i}"
        if layout == "reference":
            lines.append({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": prompt})
        elif layout == "plain-jsonl":
            lines.append({"name": f"{i}.png", "prompt": prompt})
        elif layout == "plain-txt":
            (folder / "target" / f"{i}.txt").write_text(prompt)
        else:
            raise ValueError(layout)
    if lines:
        name = "prompt.json" if layout == "reference" else "prompts.jsonl"
        (folder / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder
