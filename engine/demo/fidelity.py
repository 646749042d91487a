"""How well a generated image follows its condition, as in the CtrLoRA paper's protocol: run the
condition's extractor on the generated image and compare the result with the condition given.

- Edges (canny, sketch, hed): F1 of edge pixels, a pixel counting as matched when an edge of the
  other map lies within ``tolerance`` pixels (the usual boundary F-measure). For hed (soft lines)
  the edge pixels are those at least half white, in the condition and in the generated image's
  soft edges alike.
- Segmentation and layer-order maps (seg, depth): no network ships with ctrlora to extract them
  from a picture, so we score their boundaries instead: Canny edges of the generated image against
  the places where the condition's colour changes (boundary F1).
- Boxes (bbox): IoU between the condition's boxes and boxes around the generated image's
  foreground, found against a smooth (planar) background as in the demo world.
- Masked images (outpainting, inpainting): error on the pixels the condition keeps.
- Everything else (mosaic, palette, grayscale, blur): error between the extractor's output on the
  generated image and the condition (mse and mae on [0, 1] values, and psnr in dB).

Without ``params``, blur and hed take the demo world's settings for the condition's size
(``engine.demo.world.BLUR_RADIUS`` and ``HED_SIGMA``).

For an image the condition was extracted from, edge and error kinds score exactly 1.0 (or 0
error) with the same extractor parameters; seg, depth and bbox score close to 1.0.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from engine.checks import above, at_least
from engine.errors import UsageError
from engine.demo.extractors import (ALIASES, canny_edges, component_boxes, extract, label_components, soft_edges,
                                    to_array)
from engine.demo.world import BLUR_RADIUS, HED_SIGMA

EDGE_KINDS = ("canny", "sketch", "hed")
BOUNDARY_KINDS = ("seg", "depth")
BOX_KINDS = ("bbox",)
MASKED_KINDS = ("outpainting", "inpainting")
ERROR_KINDS = ("mosaic", "palette", "grayscale", "blur")
KINDS = EDGE_KINDS + BOUNDARY_KINDS + BOX_KINDS + MASKED_KINDS + ERROR_KINDS

# The headline number of each kind and whether higher is better.
PRIMARY = {**{k: ("f1", True) for k in EDGE_KINDS + BOUNDARY_KINDS}, "bbox": ("iou", True),
           **{k: ("mse", False) for k in MASKED_KINDS + ERROR_KINDS}}

PSNR_CAP = 100.0  # dB reported for identical images (keeps aggregates finite)


def fidelity(kind: str, generated: Image.Image, condition: Image.Image, tolerance: int = 1,
             **params) -> dict[str, float]:
    """Scores of one generated image against the condition it was asked to follow. ``params`` go
    to the extractor (use the ones the condition was made with). The generated image is resized
    to the condition's size first."""
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind not in KINDS:
        raise UsageError(f"no fidelity measure for {kind!r}; measured kinds: {', '.join(KINDS)}")
    at_least("tolerance", tolerance, 0)
    generated = generated.convert("RGB")
    if generated.size != condition.size:
        generated = generated.resize(condition.size, Image.BICUBIC)
    wanted = to_array(condition)

    if kind == "canny":
        return edge_scores(to_array(extract(kind, generated, **params))[..., 0] > 127, wanted[..., 0] > 127,
                           tolerance)
    if kind == "hed":
        sigma = float(params.get("sigma", HED_SIGMA * min(condition.size)))
        above("sigma", sigma, 0)
        return edge_scores(to_array(soft_edges(generated, sigma))[..., 0] > 127, wanted[..., 0] > 127, tolerance)
    if kind == "sketch":
        return edge_scores(to_array(extract(kind, generated, **params))[..., 0] < 128, wanted[..., 0] < 128,
                           tolerance)
    if kind in BOUNDARY_KINDS:
        low, high, sigma = params.get("low", 100.0), params.get("high", 200.0), params.get("sigma", 1.0)
        return edge_scores(canny_edges(to_array(generated), float(low), float(high), float(sigma)),
                           colour_boundaries(wanted), tolerance)
    if kind == "bbox":
        found = foreground_boxes(to_array(generated), min_area=int(params.get("min_area", 4)))
        return {"iou": iou(found, wanted.max(axis=2) > 24)}
    if kind in MASKED_KINDS:
        kept = wanted.any(axis=2)  # masked-out pixels are exactly black
        return error_scores(to_array(generated)[kept], wanted[kept])
    if kind == "blur":
        params = {"radius": BLUR_RADIUS * min(condition.size), **params}
    return error_scores(to_array(extract(kind, generated, **params)), wanted)


def aggregate(scores: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each score over many images, and their ``count``."""
    if not scores:
        return {"count": 0}
    keys = sorted({key for score in scores for key in score})
    means = {key: float(np.mean([s[key] for s in scores if key in s])) for key in keys}
    return {**means, "count": len(scores)}


def edge_scores(predicted: np.ndarray, wanted: np.ndarray, tolerance: int = 1) -> dict[str, float]:
    """Precision, recall and F1 of edge maps, matching within ``tolerance`` pixels (square
    neighbourhood). Two empty maps agree perfectly."""
    predicted, wanted = np.asarray(predicted, bool), np.asarray(wanted, bool)
    n_pred, n_want = int(predicted.sum()), int(wanted.sum())
    precision = (predicted & dilate(wanted, tolerance)).sum() / n_pred if n_pred else float(n_want == 0)
    recall = (wanted & dilate(predicted, tolerance)).sum() / n_want if n_want else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": float(f1), "precision": float(precision), "recall": float(recall)}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def error_scores(generated: np.ndarray, wanted: np.ndarray) -> dict[str, float]:
    """mse and mae of uint8 pixel values scaled to [0, 1], and psnr in dB."""
    if generated.size == 0:
        return {"mse": 0.0, "mae": 0.0, "psnr": PSNR_CAP}
    diff = generated.astype(np.float64) / 255 - wanted.astype(np.float64) / 255
    mse = float(np.mean(diff ** 2))
    psnr = min(PSNR_CAP, 10 * math.log10(1 / mse)) if mse > 0 else PSNR_CAP
    return {"mse": mse, "mae": float(np.mean(np.abs(diff))), "psnr": psnr}


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean mask by ``radius`` pixels in every direction (a square neighbourhood)."""
    mask = np.asarray(mask, bool)
    if radius <= 0:
        return mask
    for axis in (0, 1):
        n = mask.shape[axis]
        padded = np.pad(mask, [(radius, radius) if a == axis else (0, 0) for a in range(2)])
        mask = np.logical_or.reduce([np.take(padded, range(i, i + n), axis=axis) for i in range(2 * radius + 1)])
    return mask


def colour_boundaries(array: np.ndarray, tolerance: int = 24) -> np.ndarray:
    """Pixels whose colour differs (by more than ``tolerance`` in some channel) from the pixel to
    the right or below: the boundaries of a flat label map, on the same side Canny marks."""
    a = array.astype(np.int16)
    boundary = np.zeros(a.shape[:2], dtype=bool)
    boundary[:, :-1] |= np.abs(a[:, 1:] - a[:, :-1]).max(axis=2) > tolerance
    boundary[:-1, :] |= np.abs(a[1:, :] - a[:-1, :]).max(axis=2) > tolerance
    return boundary


def foreground(array: np.ndarray, threshold: float = 48, border: int = 2) -> np.ndarray:
    """Pixels that stand out from a smooth background. The background is a plane per channel
    fitted to the image's border (refitted without the border pixels that objects cover)."""
    h, w = array.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    ring = np.zeros((h, w), dtype=bool)
    ring[:border], ring[-border:], ring[:, :border], ring[:, -border:] = True, True, True, True
    design = np.stack([np.ones(h * w), xs.ravel() / w, ys.ravel() / h], axis=1)
    values = array.reshape(-1, 3).astype(np.float64)
    samples = ring.ravel()
    for _ in range(4):
        coef, *_ = np.linalg.lstsq(design[samples], values[samples], rcond=None)
        residual = np.abs(values - design @ coef).max(axis=1)
        refined = ring.ravel() & (residual <= threshold)
        if refined.sum() < 3 or (refined == samples).all():
            break
        samples = refined
    return (residual > threshold).reshape(h, w)


def foreground_boxes(array: np.ndarray, min_area: int = 4) -> np.ndarray:
    """A mask of the boxes around each connected foreground region of at least ``min_area`` pixels."""
    labels, count = label_components(foreground(array))
    boxes = np.zeros(array.shape[:2], dtype=bool)
    for x0, y0, x1, y1, area in component_boxes(labels, count).tolist():
        if area >= min_area:
            boxes[y0:y1 + 1, x0:x1 + 1] = True
    return boxes
