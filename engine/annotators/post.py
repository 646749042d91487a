"""What the reference annotators do around their networks, as plain numpy/OpenCV on arrays:
the input resize, and each kind's turning of network outputs into a condition image.

Everything takes and gives uint8 RGB arrays (H, W, 3) or float maps, so each step is checked on
hand-made numbers without a network.
"""

from __future__ import annotations

import numpy as np

from engine.annotators.ade20k import PALETTE


def cv2():
    import cv2 as module  # the annotators extra; engine.annotators.require() words its absence

    return module


def detection_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The reference's input size: the short side scaled to ``resolution``, then both sides
    rounded to a multiple of 64. ``(width, height)``."""
    k = resolution / min(width, height)
    return max(64, int(np.round(width * k / 64.0)) * 64), max(64, int(np.round(height * k / 64.0)) * 64)


def resize_for_detection(array: np.ndarray, resolution: int) -> np.ndarray:
    """As the reference's ``resize_image``: Lanczos when growing, area averaging when shrinking."""
    h, w = array.shape[:2]
    size = detection_size(w, h, resolution)
    if size == (w, h):
        return array
    grow = resolution / min(h, w) > 1
    return cv2().resize(array, size, interpolation=cv2().INTER_LANCZOS4 if grow else cv2().INTER_AREA)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def unit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> 0..255, truncated as the reference's ``astype(np.uint8)`` does."""
    return (values * 255.0).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# depth and normal (MiDaS)


def depth_image(depth: np.ndarray) -> np.ndarray:
    """Relative inverse depth -> grey image: min-max normalised, near is white."""
    span = depth.max() - depth.min()
    unit = (depth - depth.min()) / (span if span > 0 else 1.0)
    return gray_to_rgb(unit_to_uint8(unit))


def normal_image(depth: np.ndarray, a: float = np.pi * 0.2, bg_th: float = 0.02) -> np.ndarray:
    """Normals from the depth's Sobel gradients: (dx, dy, a) normalised, the x and y slopes set to
    0 where the normalised depth is under ``bg_th`` (the far background faces the camera).
    Channels R, G, B = x, y, z, mapped from -1..1 to 0..255."""
    depth = depth.astype(np.float32)
    span = depth.max() - depth.min()
    unit = (depth - depth.min()) / (span if span > 0 else 1.0)
    x = cv2().Sobel(depth, cv2().CV_32F, 1, 0, ksize=3)
    y = cv2().Sobel(depth, cv2().CV_32F, 0, 1, ksize=3)
    x[unit < bg_th] = 0
    y[unit < bg_th] = 0
    normal = np.stack([x, y, np.full_like(x, a)], axis=2)
    normal /= np.sqrt(np.sum(normal ** 2.0, axis=2, keepdims=True))
    return (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# segmentation


def seg_image(labels: np.ndarray) -> np.ndarray:
    """Class indices (H, W) -> the ADE20k palette with its channels reversed, as the reference's
    mmsegmentation drawing (``color_seg[..., ::-1]``) hands the image back: wall (120,120,120),
    sky (230,230,6), tree (3,200,4), ..."""
    return PALETTE[:, ::-1][labels]


# ---------------------------------------------------------------------------------------------
# HED and hedsketch


def hed_image(sides: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """The side outputs (logits at several scales) each resized bilinearly to the image, averaged,
    through a sigmoid."""
    resized = [cv2().resize(s.astype(np.float32), (width, height), interpolation=cv2().INTER_LINEAR) for s in sides]
    mean = np.mean(np.stack(resized, axis=2), axis=2).astype(np.float64)
    return gray_to_rgb(unit_to_uint8(1 / (1 + np.exp(-mean))))


def hedsketch_image(hed: np.ndarray, seed: int = 0, tries: int = 5) -> np.ndarray:
    """A sketch from a HED map, as the reference draws one: threshold at a random value in
    110..159, invert (dark strokes on white), a 3x3 Gaussian blur; drawn again (on the result,
    as the reference does) while under 0.5% of the pixels are dark, up to ``tries`` more times."""
    rng = np.random.default_rng(seed)
    edge = hed
    for attempt in range(tries + 1):
        threshold = int(rng.integers(110, 160))
        binary = np.where(edge > threshold, 255, 0).astype(np.uint8)
        edge = cv2().GaussianBlur(255 - binary, (3, 3), 0)
        if np.sum(edge < 5) > 0.005 * edge.shape[0] * edge.shape[1]:
            break
    return edge


# ---------------------------------------------------------------------------------------------
# line art


def lineart_image(line: np.ndarray) -> np.ndarray:
    """The generator's output in 0..1 (white paper, dark lines) as it is, in 0..255."""
    return gray_to_rgb(unit_to_uint8(line))
