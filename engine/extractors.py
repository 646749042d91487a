"""Built-in condition extractors: image -> condition image, with no downloaded network.

Every extractor takes and returns a PIL image (RGB out) plus keyword parameters. Conditions that
need an annotator network (depth, hed, openpose, ...) are not built in: the user must give a
ready condition image.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from engine.errors import UsageError

Extractor = Callable[..., Image.Image]
EXTRACTORS: dict[str, Extractor] = {}

# Conditions whose extraction needs a network we do not ship.
NEEDS_ANNOTATOR = ("depth", "hed", "openpose", "normal", "seg", "densepose", "lineart", "hedsketch")


def extractor(name: str):
    def register(fn: Extractor) -> Extractor:
        EXTRACTORS[name] = fn
        return fn

    return register


def extract(kind: str, image: Image.Image, **params) -> Image.Image:
    if kind in EXTRACTORS:
        return EXTRACTORS[kind](image, **params)
    if kind in NEEDS_ANNOTATOR:
        raise UsageError(f"'{kind}' needs an annotator network that ctrlora does not ship; give a ready {kind} "
                         f"condition image instead (built in: {', '.join(sorted(EXTRACTORS))})")
    raise UsageError(f"unknown condition kind {kind!r}; built in: {', '.join(sorted(EXTRACTORS))}")


@extractor("grayscale")
def grayscale(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


def to_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 array (H, W, 3)."""
    return np.asarray(image.convert("RGB"))
