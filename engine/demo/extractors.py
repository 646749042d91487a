"""Built-in condition extractors: image -> condition image, with no downloaded network.

Every extractor takes a PIL image and keyword parameters and returns an RGB PIL image of the
same size. Parameters are declared (``Param``) so the CLI can list them, parse ``key=value``
strings and refuse bad values with one line. Conditions that need an annotator network (depth,
hed, openpose, ...) are not built in: ``engine.annotators`` makes them.

Everything here is plain numpy (Canny included), deterministic, and fast at 512 x 512.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from engine.checks import at_least, between, finite, one_of, within
from engine.errors import SettingError, UsageError

Extractor = Callable[..., Image.Image]
EXTRACTORS: dict[str, Extractor] = {}

# Conditions whose extraction needs a network (engine.annotators makes most of them).
NEEDS_ANNOTATOR = ("depth", "hed", "openpose", "normal", "seg", "densepose", "lineart", "hedsketch")

# Other names people use for a built-in kind.
ALIASES = {"pixelate": "mosaic", "pixel": "mosaic", "outpaint": "outpainting", "inpaint": "inpainting",
           "gray": "grayscale", "grey": "grayscale", "greyscale": "grayscale"}


@dataclass(frozen=True)
class Param:
    """One extractor parameter. ``type`` is int, float, bool, choice or box (four fractions
    left,top,right,bottom of the image). ``default=None`` means chosen from the image size."""

    name: str
    type: str
    default: object
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, kind: str, value):
        """``value`` (a string as typed, or the default) parsed and range-checked; a bad one is a
        ``SettingError`` of ``param`` (the CLI's ``-p/--param``) naming the kind and parameter."""
        where = f"{kind}: {self.name}"
        if value is None and self.default is None:
            return None
        try:
            if self.type == "int":
                parsed = _parse_int(value)
            elif self.type == "float":
                parsed = float(value)
            elif self.type == "bool":
                parsed = _parse_bool(value)
            elif self.type == "choice":
                parsed = str(value).lower()
            elif self.type == "box":
                parsed = _parse_box(value)
                if parsed is None:
                    raise SettingError("param", f"{where} must be four fractions left,top,right,bottom with "
                                                f"0 <= left < right <= 1 and 0 <= top < bottom <= 1, not {value!r}")
            else:  # pragma: no cover - a declaration bug
                raise AssertionError(self.type)
        except (TypeError, ValueError):
            expected = {"int": "a whole number", "float": "a number", "bool": "true or false"}[self.type]
            raise SettingError("param", f"{where} must be {expected}, not {value!r}") from None
        with within("param", where):
            if self.type == "choice":
                one_of(self.name, parsed, self.choices)
            elif self.type in ("int", "float"):
                finite(self.name, parsed)
                if self.max is not None:
                    between(self.name, parsed, self.min, self.max)
                elif self.min is not None:
                    at_least(self.name, parsed, self.min)
        return parsed

    def describe(self) -> str:
        default = "auto" if self.default is None else _show(self.default)
        return f"{self.name}={default}"


@dataclass(frozen=True)
class ExtractorSpec:
    name: str
    fn: Extractor
    help: str
    params: tuple[Param, ...] = field(default_factory=tuple)

    def check(self, params: dict) -> dict:
        """Parsed and range-checked parameters with the defaults filled in."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            accepted = ", ".join(known) or "none"
            raise SettingError("param", f"{self.name} has no parameter {unknown[0]!r} (its parameters: {accepted})")
        return {name: p.parse(self.name, params.get(name, p.default)) for name, p in known.items()}


SPECS: dict[str, ExtractorSpec] = {}


def extractor(name: str, *, help: str = "", params: tuple[Param, ...] = ()):
    def register(fn: Extractor) -> Extractor:
        EXTRACTORS[name] = fn
        SPECS[name] = ExtractorSpec(name, fn, help or (fn.__doc__ or "").strip().splitlines()[0], tuple(params))
        return fn

    return register


def resolve_kind(kind: str) -> str:
    """The registry name of ``kind`` (aliases followed), or a one-line UsageError."""
    name = ALIASES.get(kind.lower(), kind.lower())
    if name in SPECS:
        return name
    if name in NEEDS_ANNOTATOR:
        raise UsageError(f"'{kind}' needs an annotator network, not a built-in extractor (ctrlora prep --list shows "
                         f"the annotators; or give a ready {kind} condition image)")
    raise UsageError(f"unknown condition kind {kind!r}; built in: {', '.join(sorted(SPECS))}")


def extract(kind: str, image: Image.Image, **params) -> Image.Image:
    """Run a built-in extractor; ``params`` may be strings (as typed on a command line)."""
    spec = SPECS[resolve_kind(kind)]
    return spec.fn(image.convert("RGB"), **spec.check(params))


# ---------------------------------------------------------------------------------------------
# The extractors


@extractor("canny", help="Canny edges, white on black", params=(
    Param("low", "float", 100.0, "weak-edge threshold on the gradient magnitude (OpenCV's scale)", min=0),
    Param("high", "float", 200.0, "strong-edge threshold; weak edges survive only if linked to strong ones",
          min=0),
    Param("sigma", "float", 0.0, "Gaussian blur before the gradients, in pixels (0: none, as cv2.Canny)", min=0,
          max=20),
))
def canny(image: Image.Image, low: float, high: float, sigma: float) -> Image.Image:
    if low > high:
        raise SettingError("param", f"canny: low ({_num(low)}) must not exceed high ({_num(high)})")
    return mask_to_image(canny_edges(to_array(image), low, high, sigma))


@extractor("grayscale", help="Luminance only")
def grayscale(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


@extractor("blur", help="Gaussian blur", params=(
    Param("radius", "float", 4.0, "blur radius (standard deviation) in pixels", min=0, max=256),
))
def blur(image: Image.Image, radius: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else image.copy()


@extractor("mosaic", help="Pixelate: the mean colour of each square block", params=(
    Param("block", "int", None, "block side in pixels (auto: the shorter side / 16, at least 2)", min=1,
          max=4096),
))
def mosaic(image: Image.Image, block: int | None) -> Image.Image:
    block = block or _auto_block(image)
    return Image.fromarray(_expand(_block_means(to_array(image), block), block, image.size))


@extractor("palette", help="Coarse colour map: a grid of cells painted with k colours", params=(
    Param("colors", "int", 6, "number of colours (k-means on the cells' colours)", min=1, max=64),
    Param("grid", "int", 8, "cells along the shorter side", min=1, max=512),
))
def palette(image: Image.Image, colors: int, grid: int) -> Image.Image:
    cell = math.ceil(min(image.size) / grid)
    means = _block_means(to_array(image), cell)
    flat = means.reshape(-1, 3).astype(np.float64)
    centres, assignment = kmeans(flat, colors)
    quantised = np.rint(centres[assignment]).clip(0, 255).astype(np.uint8).reshape(means.shape)
    return Image.fromarray(_expand(quantised, cell, image.size))


@extractor("outpainting", help="Keep a centred rectangle, black elsewhere", params=(
    Param("ratio", "float", 0.5, "fraction of the width and of the height kept", min=0.01, max=1),
))
def outpainting(image: Image.Image, ratio: float) -> Image.Image:
    array = to_array(image)
    h, w = array.shape[:2]
    kh, kw = max(1, int(h * ratio)), max(1, int(w * ratio))
    out = np.zeros_like(array)
    top, left = (h - kh) // 2, (w - kw) // 2
    out[top:top + kh, left:left + kw] = array[top:top + kh, left:left + kw]
    return Image.fromarray(out)


@extractor("inpainting", help="Black out a region to be filled in (a rectangle or brush strokes)", params=(
    Param("mode", "choice", "rect", "rect: the box; brush: random thick strokes", choices=("rect", "brush")),
    Param("box", "box", (0.25, 0.25, 0.75, 0.75), "rect mode: left,top,right,bottom as fractions"),
    Param("strokes", "int", 4, "brush mode: number of strokes", min=1, max=64),
    Param("width", "float", 0.08, "brush mode: stroke width as a fraction of the shorter side", min=0.005,
          max=1),
    Param("seed", "int", 0, "brush mode: random seed of the strokes", min=0),
))
def inpainting(image: Image.Image, mode: str, box: tuple, strokes: int, width: float, seed: int) -> Image.Image:
    array = to_array(image).copy()
    array[inpainting_mask(image.size, mode, box, strokes, width, seed)] = 0
    return Image.fromarray(array)


@extractor("bbox", help="Boxes around the non-black regions of a mask or segmentation map", params=(
    Param("fill", "bool", True, "filled boxes in each region's colour (as CtrLoRA), or outlines"),
    Param("width", "int", 1, "outline width in pixels (fill=false)", min=1, max=64),
    Param("min_area", "int", 4, "ignore regions smaller than this many pixels", min=1),
))
def bbox(image: Image.Image, fill: bool, width: int, min_area: int) -> Image.Image:
    return draw_boxes(image.size, region_boxes(to_array(image), min_area), fill=fill, width=width)


@extractor("sketch", help="A line drawing: dark strokes on white where the colour changes", params=(
    Param("threshold", "float", 80.0, "gradient magnitude that makes a stroke (OpenCV's scale)", min=0),
    Param("sigma", "float", 1.0, "Gaussian blur before the gradients; also thickens the strokes", min=0,
          max=20),
))
def sketch(image: Image.Image, threshold: float, sigma: float) -> Image.Image:
    _, _, magnitude = gradients(to_array(image), sigma)
    return mask_to_image(magnitude >= max(threshold, 1e-6), invert=True)


# ---------------------------------------------------------------------------------------------
# Numerical parts, shared with engine.demo.world and engine.demo.fidelity


def to_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 array (H, W, 3)."""
    return np.asarray(image.convert("RGB"))


def mask_to_image(mask: np.ndarray, invert: bool = False) -> Image.Image:
    """A boolean mask as an RGB image: white on black (or black on white with ``invert``)."""
    value = np.where(mask ^ invert, 255, 0).astype(np.uint8)
    return Image.fromarray(np.repeat(value[..., None], 3, axis=2))


def gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float array, mirrored at the borders."""
    if sigma <= 0:
        return array
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * array.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(array, pad, mode="symmetric")
        n = array.shape[axis]
        window = [slice(None)] * array.ndim
        out = np.zeros(array.shape)
        for i, t in enumerate(taps):
            window[axis] = slice(i, i + n)
            out += t * padded[tuple(window)]
        array = out
    return array


def gradients(array: np.ndarray, sigma: float, norm: str = "l2") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sobel gradients (gx, gy, magnitude) of an (H, W, C) image on OpenCV's unnormalised scale
    (a 0 -> 255 step gives 1020), borders replicated. ``norm`` is ``l2`` (hypot) or ``l1``
    (|gx| + |gy|, what ``cv2.Canny`` uses by default). For colour images each pixel takes the
    channel whose gradient is strongest in that norm, as OpenCV's Canny does, so two colours of
    equal brightness still make an edge."""
    smooth = gaussian_blur(np.asarray(array, dtype=np.float64), sigma)
    if smooth.ndim == 2:
        smooth = smooth[..., None]
    p = np.pad(smooth, ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = p[:, 2:] - p[:, :-2]
    gx = dx[:-2] + 2 * dx[1:-1] + dx[2:]
    sy = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
    gy = sy[2:] - sy[:-2]
    strength = np.abs(gx) + np.abs(gy) if norm == "l1" else gx * gx + gy * gy
    strongest = np.argmax(strength, axis=2)[..., None]  # the first channel wins a tie, as in OpenCV
    gx = np.take_along_axis(gx, strongest, axis=2)[..., 0]
    gy = np.take_along_axis(gy, strongest, axis=2)[..., 0]
    # Rounded so that mirror-image pixels across a step compare equal (one-pixel-wide edges).
    magnitude = np.round(np.abs(gx) + np.abs(gy) if norm == "l1" else np.hypot(gx, gy), 6)
    return gx, gy, magnitude


def canny_edges(array: np.ndarray, low: float, high: float, sigma: float = 0.0) -> np.ndarray:
    """Canny as ``cv2.Canny(array, low, high)`` computes it (aperture 3, L1 gradient), with an
    optional Gaussian blur first: Sobel, non-maximum suppression along the gradient, then double
    threshold (a pixel counts above ``floor(low)``, is strong above ``floor(high)``) with
    hysteresis (weak pixels kept only when 8-connected to a strong one). Boolean (H, W)."""
    gx, gy, magnitude = gradients(array, sigma, norm="l1")
    thin = _non_max_suppression(gx, gy, magnitude)
    candidates = thin & (magnitude > math.floor(low))
    strong = candidates & (magnitude > math.floor(high))
    labels, count = label_components(candidates)
    linked = np.zeros(count + 1, dtype=bool)
    linked[labels[strong]] = True
    linked[0] = False
    return linked[labels]


def soft_edges(image: Image.Image, sigma: float) -> Image.Image:
    """Soft edges in the manner of ControlNet's HED (the demo world's ``hed``): the image's Canny
    edges (cv2's thresholds 100 and 200) blurred by a Gaussian of ``sigma`` (> 0) pixels and scaled
    so that a straight line is 255 on its centre and exp(-d^2 / 2 sigma^2) of that d pixels beside
    it (clipped). White soft lines on black, RGB."""
    edges = canny_edges(to_array(image), 100.0, 200.0).astype(np.float64)[..., None]
    radius = max(1, math.ceil(3 * sigma))
    centre = 1 / np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()  # a line's centre tap
    grey = np.rint(255 * np.clip(gaussian_blur(edges, sigma) / centre, 0, 1)).astype(np.uint8)
    return Image.fromarray(np.repeat(grey, 3, axis=2))


# tan(22.5 degrees) in OpenCV's fixed point (15 bits), so directions are sorted as cv2.Canny sorts them.
_TG22 = 13573
_SHIFT = 1 << 15


def _non_max_suppression(gx: np.ndarray, gy: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    # Keep a pixel that beats its two neighbours along the gradient (quantised to 4 directions, the
    # image's outside counting as 0). Ties go to the pixel before the edge on the axes (strict on one
    # side, >= on the other), so a sharp step yields exactly one pixel; diagonals are strict on both.
    p = np.pad(magnitude, 1)
    c = p[1:-1, 1:-1]
    ax, ay = np.abs(gx), np.abs(gy) * _SHIFT
    horizontal = ay < ax * _TG22
    vertical = ~horizontal & (ay > ax * (_TG22 + 2 * _SHIFT))
    diagonal = ~horizontal & ~vertical
    falling = gx * gy > 0  # gradient towards down-right (y grows downwards)
    keep = horizontal & (c > p[1:-1, :-2]) & (c >= p[1:-1, 2:])
    keep |= vertical & (c > p[:-2, 1:-1]) & (c >= p[2:, 1:-1])
    keep |= diagonal & falling & (c > p[:-2, :-2]) & (c > p[2:, 2:])
    keep |= diagonal & ~falling & (c > p[:-2, 2:]) & (c > p[2:, :-2])
    return keep


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean (H, W) mask: (labels with 0 for background and 1..n for
    the components, n). Works on horizontal runs with union-find, so the Python loop is over runs,
    not pixels."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # exclusive; row-major order pairs them with ``starts``
    n = len(starts)
    if n == 0:
        return labels, 0
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(h + 1)).tolist()
    s_list, e_list = starts.tolist(), ends.tolist()
    for y in range(1, h):
        a0, a1, b1 = first[y - 1], first[y], first[y + 1]
        if a0 == a1 or a1 == b1:
            continue
        j = a0
        for i in range(a1, b1):
            s, e = s_list[i], e_list[i]
            while j < a1 and e_list[j] < s:  # previous-row run ends before this one's left diagonal
                j += 1
            k = j
            while k < a1 and s_list[k] <= e:  # starts at or before this one's right diagonal
                ri, rk = find(i), find(k)
                if ri != rk:
                    parent[max(ri, rk)] = min(ri, rk)
                k += 1
    roots = np.array([find(i) for i in range(n)])
    _, component = np.unique(roots, return_inverse=True)
    lengths = ends - starts
    offsets = np.cumsum(lengths) - lengths
    flat = np.repeat(rows * w + starts - offsets, lengths) + np.arange(lengths.sum())
    labels.reshape(-1)[flat] = np.repeat(component.astype(np.int32) + 1, lengths)
    return labels, int(component.max()) + 1


def component_boxes(labels: np.ndarray, count: int) -> np.ndarray:
    """(count, 5) int array: left, top, right, bottom (inclusive) and area of components 1..count."""
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs] - 1
    boxes = np.zeros((count, 5), dtype=np.int64)
    boxes[:, 0] = boxes[:, 1] = np.iinfo(np.int64).max
    np.minimum.at(boxes[:, 0], ids, xs)
    np.minimum.at(boxes[:, 1], ids, ys)
    np.maximum.at(boxes[:, 2], ids, xs)
    np.maximum.at(boxes[:, 3], ids, ys)
    boxes[:, 4] = np.bincount(ids, minlength=count)
    return boxes


# A mask with more distinct colours than this is treated as one foreground, not as classes.
_MAX_REGION_COLOURS = 64


def region_boxes(array: np.ndarray, min_area: int = 4, black: int = 24) -> list[tuple[tuple, tuple]]:
    """Boxes of the non-black regions of a mask: ``[((left, top, right, bottom), rgb), ...]``,
    largest first. Regions are split by colour (to 5 bits per channel, tolerant of mild noise)
    when the mask has few colours, as a segmentation map does."""
    foreground = array.max(axis=2) > black
    codes = (array.astype(np.int32) >> 3) @ np.array([1 << 10, 1 << 5, 1])
    colours = np.unique(codes[foreground])
    groups = [codes == c for c in colours] if len(colours) <= _MAX_REGION_COLOURS else [np.ones_like(foreground)]
    found = []
    for group in groups:
        labels, count = label_components(group & foreground)
        if count == 0:
            continue
        for index, (x0, y0, x1, y1, area) in enumerate(component_boxes(labels, count).tolist()):
            if area >= min_area:
                colour = tuple(int(v) for v in np.rint(array[labels == index + 1].mean(axis=0)))
                found.append(((x0, y0, x1, y1), colour, area))
    found.sort(key=lambda item: -(item[0][2] - item[0][0] + 1) * (item[0][3] - item[0][1] + 1))
    return [(box, colour) for box, colour, _ in found]


def draw_boxes(size: tuple[int, int], boxes, fill: bool = True, width: int = 1) -> Image.Image:
    """Boxes ``[((left, top, right, bottom), rgb), ...]`` (inclusive pixels) on black, in order."""
    canvas = Image.new("RGB", size)
    draw = ImageDraw.Draw(canvas)
    for box, colour in boxes:
        if fill:
            draw.rectangle(box, fill=tuple(colour))
        else:
            draw.rectangle(box, outline=tuple(colour), width=width)
    return canvas


def inpainting_mask(size: tuple[int, int], mode: str = "rect", box=(0.25, 0.25, 0.75, 0.75), strokes: int = 4,
                    width: float = 0.08, seed: int = 0) -> np.ndarray:
    """Boolean (H, W) mask of the region to fill in."""
    w, h = size
    if mode == "rect":
        left, top, right, bottom = box
        mask = np.zeros((h, w), dtype=bool)
        mask[int(round(top * h)):max(int(round(bottom * h)), int(round(top * h)) + 1),
             int(round(left * w)):max(int(round(right * w)), int(round(left * w)) + 1)] = True
        return mask
    rng = np.random.default_rng(seed)
    canvas = Image.new("L", size)
    draw = ImageDraw.Draw(canvas)
    thickness = max(1, round(width * min(size)))
    for _ in range(strokes):
        points = [tuple(rng.uniform(0.1, 0.9, 2) * (w, h))]
        for _ in range(int(rng.integers(2, 5))):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.3) * min(size)
            x, y = points[-1]
            points.append((min(max(x + length * math.cos(angle), 0), w - 1), min(max(y + length * math.sin(angle), 0), h - 1)))
        draw.line(points, fill=255, width=thickness, joint="curve")
        for x, y in points:  # round the ends
            r = thickness / 2
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(canvas) > 0


def kmeans(points: np.ndarray, k: int, iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic k-means of (N, D) points: farthest-point start from the most common point,
    then Lloyd's iterations. Returns (centres (k', D), assignment (N,)), k' = min(k, distinct points)."""
    distinct, counts = np.unique(points, axis=0, return_counts=True)
    k = min(k, len(distinct))
    centres = [distinct[np.argmax(counts)]]
    nearest = np.full(len(distinct), np.inf)
    for _ in range(1, k):
        nearest = np.minimum(nearest, ((distinct - centres[-1]) ** 2).sum(axis=1))
        centres.append(distinct[np.argmax(nearest)])
    centres = np.array(centres, dtype=np.float64)
    for _ in range(iterations):
        assignment = np.argmin(((points[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
        updated = centres.copy()
        for c in range(k):
            members = points[assignment == c]
            if len(members):
                updated[c] = members.mean(axis=0)
        if np.allclose(updated, centres):
            break
        centres = updated
    assignment = np.argmin(((points[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
    return centres, assignment


def _auto_block(image: Image.Image) -> int:
    return max(2, min(image.size) // 16)


def _block_means(array: np.ndarray, block: int) -> np.ndarray:
    """Mean colour of each block (blocks start at the top-left; the last row and column of
    blocks may be partial). (ceil(H/block), ceil(W/block), 3) uint8."""
    h, w = array.shape[:2]
    rows, cols = np.arange(0, h, block), np.arange(0, w, block)
    sums = np.add.reduceat(np.add.reduceat(array.astype(np.float64), rows, axis=0), cols, axis=1)
    counts = np.outer(np.diff(np.append(rows, h)), np.diff(np.append(cols, w)))[..., None]
    return np.rint(sums / counts).astype(np.uint8)


def _expand(cells: np.ndarray, block: int, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    return np.repeat(np.repeat(cells, block, axis=0), block, axis=1)[:h, :w]


def _parse_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return int(value)


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _parse_box(value):
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        left, top, right, bottom = (float(p) for p in parts)
    except (TypeError, ValueError):
        return None
    if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
        return None
    return (left, top, right, bottom)


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(_num(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return _num(value) if isinstance(value, (int, float)) else str(value)
