"""The demo world: small procedurally drawn scenes of coloured shapes, with exact conditions.

A scene is one to three flat-coloured shapes (circle, square, triangle, ...) drawn in order on a
flat or gently graded background. Scene ``index`` of world ``seed`` is the same on every machine
and does not depend on how many scenes are made. Because every object is known, conditions that
need an annotator network on photographs (segmentation, depth, boxes) are exact here; the rest
come from the built-in extractors of ``engine.demo.extractors``. Captions use only words the tiny
preset's tokenizer knows as whole tokens.

Base conditions are what a demo Base ControlNet is trained on; held-out conditions are never shown
to it and are learnt later by an adapter, as CtrLoRA's "new conditions".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.checks import at_least, multiple_of, seed as check_seed
from engine.errors import SettingError, UsageError
from engine.demo.extractors import draw_boxes, extract, soft_edges
from engine.files import write_atomic
from engine.progress import ProgressCallback, report

BASE_CONDITIONS = ("canny", "seg", "depth", "bbox", "outpainting", "grayscale", "blur", "hed")
HELD_OUT_CONDITIONS = ("mosaic", "inpainting", "palette", "sketch")
CONDITIONS = BASE_CONDITIONS + HELD_OUT_CONDITIONS

CONDITION_HELP = {
    "canny": "Canny edges of the scene (white on black)",
    "seg": "segmentation map: one colour per shape class, black background",
    "depth": "layer order: later-drawn (nearer) shapes brighter, background black",
    "bbox": "each shape's box filled with its class colour, largest first",
    "outpainting": "a centred part of the scene kept, black elsewhere",
    "grayscale": "the scene in grey levels (luminance only)",
    "blur": "the scene blurred: a Gaussian of a twelfth of its side, layout kept, shapes lost",
    "hed": "soft edges as HED draws them: Canny edges as white lines fading to black",
    "mosaic": "the scene pixelated into blocks of a sixteenth of its side",
    "inpainting": "the scene with a rectangle or brush strokes blacked out",
    "palette": "an 8 x 8 grid of cells painted with 6 colours",
    "sketch": "dark strokes on white where the colour changes",
}

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "rectangle")

COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (245, 215, 40),
    "orange": (245, 130, 20),
    "purple": (130, 50, 180),
    "pink": (250, 150, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (120, 70, 30),
    "cyan": (40, 210, 230),
    "magenta": (220, 40, 200),
}

# Segmentation and box colour of each shape class (far from each other, none black).
CLASS_COLOURS = {
    "circle": (255, 0, 0),
    "square": (0, 255, 0),
    "triangle": (0, 0, 255),
    "star": (255, 255, 0),
    "ring": (255, 0, 255),
    "cross": (0, 255, 255),
    "rectangle": (255, 255, 255),
}

# Two colours in one scene (object/object, object/background) differ by at least this much in some
# channel, so every shape is visible, has Canny edges, and can be told from the background.
MIN_CONTRAST = 100
# Backgrounds brighten or darken by up to this much across the image (too gentle for edges).
GRADIENT = 24
# Background pixels never reach pure black: (0, 0, 0) is reserved for masked-out regions.
FLOOR = 8
SIZES = (32, 512)
# The blur condition's radius (a Gaussian's standard deviation) and the hed condition's line
# softness (sigma), as fractions of the image side: 2.7 and 1 pixels at 32 x 32, where the blur
# keeps where each shape is and its colour but not its outline.
BLUR_RADIUS = 1 / 12
HED_SIGMA = 1 / 32


@dataclass(frozen=True)
class Shape:
    """One object; position and size are fractions of the image side."""

    kind: str
    colour: str
    x: float  # centre
    y: float
    radius: float  # half the extent
    tall: bool = False  # rectangles only: taller than wide

    def mask(self, size: int) -> np.ndarray:
        """Boolean (size, size) mask, drawn without antialiasing so it is exact."""
        canvas = Image.new("L", (size, size))
        draw = ImageDraw.Draw(canvas)
        cx, cy, r = self.x * size, self.y * size, self.radius * size
        if self.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        elif self.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
        elif self.kind == "rectangle":
            hw, hh = (0.55 * r, r) if self.tall else (r, 0.55 * r)
            draw.rectangle((cx - hw, cy - hh, cx + hw, cy + hh), fill=255)
        elif self.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=255)
        elif self.kind == "star":
            points = []
            for i in range(10):
                radius = r if i % 2 == 0 else 0.45 * r
                angle = -math.pi / 2 + i * math.pi / 5
                points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
            draw.polygon(points, fill=255)
        elif self.kind == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
            inner = 0.55 * r
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
        elif self.kind == "cross":
            arm = 0.33 * r
            draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=255)
            draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=255)
        else:
            raise ValueError(f"unknown shape {self.kind!r}")
        return np.asarray(canvas) > 0

    def words(self) -> str:
        size = "small " if self.radius < 0.15 else "large " if self.radius > 0.24 else ""
        phrase = f"{size}{self.colour} {self.kind}"
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Scene:
    """A drawable scene plus the random choices its conditions need (so they are reproducible)."""

    size: int
    background: str
    gradient: tuple[float, float]  # direction (radians) and amount in [-1, 1] of GRADIENT
    objects: tuple[Shape, ...]
    outpaint_ratio: float
    inpaint: dict

    @property
    def caption(self) -> str:
        objects = self.objects
        if len(objects) == 1:
            subject = objects[0].words()
        else:
            subject = f"{objects[0].words()} {_relation(objects[0], objects[1])} {objects[1].words()}"
            if len(objects) == 3:
                subject += f" and {objects[2].words()}"
        return f"{subject} on {'an' if self.background[0] in 'aeiou' else 'a'} {self.background} background"

    def masks(self) -> list[np.ndarray]:
        return [shape.mask(self.size) for shape in self.objects]

    def visible_masks(self) -> list[np.ndarray]:
        """What each object shows after the ones drawn later cover it."""
        full = self.masks()
        covered = np.zeros((self.size, self.size), dtype=bool)
        visible = []
        for mask in reversed(full):
            visible.append(mask & ~covered)
            covered |= mask
        return visible[::-1]

    def background_array(self) -> np.ndarray:
        angle, amount = self.gradient
        ramp = np.linspace(-1, 1, self.size)
        field = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
        base = np.array(COLOURS[self.background], dtype=np.float64)
        array = base + (amount * GRADIENT * field / math.sqrt(2))[..., None]
        return np.rint(array).clip(FLOOR, 255).astype(np.uint8)

    def image(self) -> Image.Image:
        array = self.background_array()
        for shape, mask in zip(self.objects, self.masks()):
            array[mask] = COLOURS[shape.colour]
        return Image.fromarray(array)

    def condition(self, kind: str, image: Image.Image | None = None) -> Image.Image:
        """The condition image of this scene. ``image`` (the rendered scene) saves a redraw."""
        if kind not in CONDITIONS:
            raise UsageError(f"unknown world condition {kind!r}; choose one of {', '.join(CONDITIONS)}")
        if kind in ("seg", "depth"):
            out = np.zeros((self.size, self.size, 3), dtype=np.uint8)
            count = len(self.objects)
            for i, (shape, mask) in enumerate(zip(self.objects, self.masks())):
                grey = 255 - 80 * (count - 1 - i)
                out[mask] = CLASS_COLOURS[shape.kind] if kind == "seg" else (grey, grey, grey)
            return Image.fromarray(out)
        if kind == "bbox":
            boxes = []
            for shape, mask in zip(self.objects, self.masks()):
                ys, xs = np.nonzero(mask)
                boxes.append(((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), CLASS_COLOURS[shape.kind]))
            boxes.sort(key=lambda b: -(b[0][2] - b[0][0] + 1) * (b[0][3] - b[0][1] + 1))
            return draw_boxes((self.size, self.size), boxes)
        image = image if image is not None else self.image()
        if kind == "outpainting":
            return extract("outpainting", image, ratio=self.outpaint_ratio)
        if kind == "inpainting":
            return extract("inpainting", image, **self.inpaint)
        if kind == "blur":
            return extract("blur", image, radius=BLUR_RADIUS * self.size)
        if kind == "hed":
            return soft_edges(image, HED_SIGMA * self.size)
        return extract(kind, image)  # canny, grayscale, mosaic, palette, sketch: the extractors' defaults


def check_size(size: int) -> int:
    multiple_of("size", size, 8, *SIZES)
    return size


def make_scene(index: int, seed: int = 0, size: int = 64) -> Scene:
    """Scene ``index`` of the world ``seed`` (independent of any other index)."""
    check_size(size)
    rng = np.random.default_rng([seed, index])
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    gradient = (float(rng.uniform(0, 2 * math.pi)), float(rng.choice([0.0, rng.uniform(-1, 1)])))
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    objects: list[Shape] = []
    used = [COLOURS[background]]
    for n in range(count):
        for _attempt in range(200 if n == 0 else 30):  # the first object always finds a place
            colour = names[rng.integers(len(names))]
            if any(_contrast(COLOURS[colour], other) < MIN_CONTRAST for other in used):
                continue
            radius = float(rng.uniform(0.1, 0.3))
            shape = Shape(kind=SHAPES[rng.integers(len(SHAPES))], colour=colour,
                          x=float(rng.uniform(radius, 1 - radius)), y=float(rng.uniform(radius, 1 - radius)),
                          radius=radius, tall=bool(rng.integers(2)))
            if _mostly_visible(objects + [shape], size):
                objects.append(shape)
                used.append(COLOURS[colour])
                break
    outpaint_ratio = float(rng.uniform(0.4, 0.7))
    if rng.random() < 0.5:
        w, h = rng.uniform(0.3, 0.5, 2)
        left, top = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        inpaint = {"mode": "rect", "box": (float(left), float(top), float(left + w), float(top + h))}
    else:
        inpaint = {"mode": "brush", "strokes": int(rng.integers(2, 5)), "width": 0.1,
                   "seed": int(rng.integers(2**31))}
    return Scene(size, background, gradient, tuple(objects), outpaint_ratio, inpaint)


def _contrast(a, b) -> int:
    return max(abs(int(x) - int(y)) for x, y in zip(a, b))


def _mostly_visible(objects: list[Shape], size: int) -> bool:
    # Every object keeps at least half of itself visible, so captions and depth stay meaningful.
    scene = Scene(size, "gray", (0.0, 0.0), tuple(objects), 0.5, {})
    return all(v.sum() >= 0.5 * m.sum() and m.sum() > 0 for v, m in zip(scene.visible_masks(), scene.masks()))


def _relation(a: Shape, b: Shape) -> str:
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


# ---------------------------------------------------------------------------------------------
# Data sets in the fit layout


_PAIR_FILE = re.compile(r"^\d+\.png$")


def check_dataset(condition: str | None, count: int | None, size: int, seed: int) -> None:
    """The settings of ``write_dataset`` (None: not known yet, not checked). No torch: the CLI
    checks them before anything loads, and before asking for what is missing."""
    if condition is not None and condition not in CONDITIONS:
        raise UsageError(f"unknown world condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    if count is not None:
        at_least("count", count, 1)
    check_size(size)
    check_seed("seed", seed)


def write_dataset(folder: str | Path, condition: str, count: int, size: int = 64, seed: int = 0,
                  force: bool = False, progress: ProgressCallback | None = None) -> Path:
    """Write ``count`` pairs in the fit layout: ``source/<i>.png`` (condition), ``target/<i>.png``
    (scene) and ``prompt.json`` (JSON lines with source, target and prompt), plus ``world.json``
    saying how it was made. ``prompt.json`` is written last and atomically, so an interrupted run
    never leaves one that points at missing files. A data set already in ``folder`` is replaced
    only with ``force``."""
    from engine.images import save_image  # here: importing the world loads no torch

    check_dataset(condition, count, size, seed)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder")
    index_file = folder / "prompt.json"
    if index_file.exists():
        if not force:
            raise SettingError("force", f"needed to replace the data set already in {folder} (prompt.json)")
        index_file.unlink()  # first, so that stale pairs are never listed while files change
    for sub in ("source", "target"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        scene = make_scene(i, seed, size)
        image = scene.image()
        save_image(scene.condition(condition, image), folder / "source" / f"{i}.png")
        save_image(image, folder / "target" / f"{i}.png")
        records.append({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": scene.caption})
        report(progress, "world", i + 1, count)
    for sub in ("source", "target"):  # pairs beyond ``count`` left by an earlier, larger run
        for path in (folder / sub).iterdir():
            if _PAIR_FILE.match(path.name) and int(path.stem) >= count:
                path.unlink()
    about = {"world": 1, "condition": condition, "count": count, "size": size, "seed": seed,
             "base": condition in BASE_CONDITIONS}
    write_atomic(folder / "world.json", json.dumps(about, indent=2) + "\n")
    write_atomic(index_file, "".join(json.dumps(r) + "\n" for r in records))
    return index_file


def recorded_condition(folder: str | Path) -> str | None:
    """The condition a data folder says it holds (``world.json``, written by ``write_dataset``), or
    None: what ``fit`` names its adapter's condition and ``eval`` measures by default."""
    try:
        about = json.loads((Path(folder) / "world.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    condition = about.get("condition") if isinstance(about, dict) else None
    return condition if isinstance(condition, str) and condition else None
