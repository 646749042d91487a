"""``ctrlora gen``'s conditions: ``--cond NAME=IMAGE[:WEIGHT[:START-END]]`` specs, ``--prep``, and
their images read, sized and prepared. Reading and checking need no torch, so bad input is
refused at once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import SettingError, UsageError
from engine.generation.settings import check_condition

_WINDOW = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*-\s*([0-9]*\.?[0-9]+)\s*$")


@dataclass
class CondSpec:
    """One ``--cond NAME=IMAGE[:WEIGHT[:START-END]]``."""

    name: str  # store adapter name or adapter file path
    image: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    prep: str | None = None
    digest: str | None = None  # from a recipe: the adapter the image was made with
    loaded: object = field(default=None, repr=False)  # from a recipe: the image exactly as used


def parse_cond(spec: str) -> CondSpec:
    """Parse NAME=IMAGE[:WEIGHT[:START-END]]; an IMAGE that exists as a file is taken whole, so
    paths with ':' work. The weight and window are checked (``check_condition``) here, before
    any image is read."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise SettingError("cond", f"{spec!r}: expected NAME=IMAGE[:WEIGHT[:START-END]]")
    if Path(rest).is_file() or ":" not in rest:
        return CondSpec(name.strip(), rest)
    parts = rest.rsplit(":", 2)
    if len(parts) == 3 and not _WINDOW.match(parts[2]) and _number(parts[1]) is None:
        parts = [parts[0] + ":" + parts[1], parts[2]]  # 'a:b.png:0.5': the image holds a ':'
    image, weight_text = parts[0], parts[1]
    weight = _number(weight_text)
    if weight is None:
        raise SettingError("cond", f"{spec!r}: weight {weight_text!r} is not a number")
    start, end = 0.0, 1.0
    if len(parts) == 3:
        match = _WINDOW.match(parts[2])
        if not match:
            raise SettingError("cond", f"{spec!r}: window {parts[2]!r} must be START-END, e.g. 0-0.5")
        start, end = float(match[1]), float(match[2])
    check_condition("cond", repr(spec), weight, start, end)
    return CondSpec(name.strip(), image, weight, start, end)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def recipe_specs(recipe: dict, images) -> list[CondSpec]:
    """The conditions of a ``--from`` recipe, each with the exact image it was used with."""
    specs = []
    for entry, image in zip(recipe.get("conditions", []), images):
        spec = CondSpec(entry["adapter"], entry.get("image", "(from recipe)"), float(entry["weight"]),
                        float(entry["start"]), float(entry["end"]), prep=entry.get("prep"), digest=entry.get("digest"))
        check_condition("from", f"condition {spec.name!r} of the recipe", spec.weight, spec.start, spec.end)
        spec.loaded = image  # the exact condition image used (already prepared and sized)
        specs.append(spec)
    return specs


def apply_prep(specs: list[CondSpec], preps: list[str]) -> None:
    """``--prep [NAME=]KIND``: the extractor for every condition, or for the one named."""
    for item in preps:
        name, sep, kind = item.rpartition("=")
        chosen = [s for s in specs if s.name == name] if sep else specs
        if sep and not chosen:
            raise UsageError(f"--prep {item!r}: no --cond names adapter {name!r}")
        if not kind:
            raise UsageError(f"--prep {item!r}: expected [NAME=]KIND, e.g. canny")
        chosen = [s for s in chosen if s.loaded is None]  # a recipe's images are stored prepared
        for spec in chosen:
            if spec.prep is None or sep:
                spec.prep = kind


def check_prep(specs: list[CondSpec]) -> None:
    """Every --prep kind known, and an annotator's extra and weights present, before any work."""
    if not any(spec.prep for spec in specs):
        return  # (the extractors, numpy and scipy, load only for --prep)
    from engine import annotators
    from engine.demo.extractors import EXTRACTORS, extract

    for spec in specs:
        if not spec.prep or spec.loaded is not None or spec.prep in EXTRACTORS:
            continue
        annotator = annotators.resolve(spec.prep)
        if annotator is None:
            extract(spec.prep, None)  # raises the registry's one-line explanation
        from ctrlora_cli.annotate import weights

        annotators.require(annotator.kind)
        weights(annotator)


def read_image(spec: CondSpec):
    from PIL import Image, UnidentifiedImageError

    if spec.loaded is not None:
        return spec.loaded
    path = Path(spec.image)
    if not path.is_file():
        raise UsageError(f"condition image {spec.image!r} not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"condition image {spec.image!r} is not a readable image ({exc})") from None


def output_size(first, width: int | None, height: int | None) -> tuple[int, int]:
    """Both given; or one, the other keeping the first image's aspect; or the image's own size,
    rounded down to multiples of 8 (``engine.generation.settings``: 8 to 4096)."""
    from engine.generation.settings import MAX_SIDE, SIZE_FACTOR, check_side

    for name, value in (("width", width), ("height", height)):
        if value is not None:
            check_side(name, value)
    if width is None and height is None:
        width, height = first.width, first.height
    elif width is None:
        width = round(first.width * height / first.height)
    elif height is None:
        height = round(first.height * width / first.width)
    width, height = width - width % SIZE_FACTOR, height - height % SIZE_FACTOR
    if min(width, height) < SIZE_FACTOR or max(width, height) > MAX_SIDE:
        raise UsageError(f"the condition image's size ({first.width}x{first.height}) gives {width}x{height}, "
                         f"outside {SIZE_FACTOR} to {MAX_SIDE}; give --width and --height")
    return width, height


def prepare(spec: CondSpec, image, width: int, height: int):
    """The condition image as the pipeline gets it: sized to the output, then extracted."""
    from engine.images import resize_center_crop

    if image.size != (width, height):
        image = resize_center_crop(image, (width, height))
    if spec.prep and spec.loaded is None:  # a recipe's image is stored already prepared
        from engine.annotators import resolve

        if resolve(spec.prep) is not None:
            from ctrlora_cli.annotate import prepared

            image = prepared(spec.prep, image)  # made at the reference's 512, then sized as the output
        else:
            from engine.demo.extractors import extract

            image = extract(spec.prep, image).convert("RGB")
        if image.size != (width, height):
            image = resize_center_crop(image, (width, height))
    return image
