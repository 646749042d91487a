"""Loading a ready ``CtrLoraPipeline`` from files, as diffusers users expect: ``from_pretrained``
(a folder, or explicit paths) and ``from_store`` (names, resolved by a resolver the caller
passes), plus ``generate``: a prompt and ``{adapter: image}`` in, images out.

A pretrained folder holds the parts as the store lays them out:

    FOLDER/
        model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
                                    Stable Diffusion in diffusers layout (or in FOLDER/sd/)
        controlnet/                 the Base ControlNet (config.json + safetensors)
        adapters/NAME.safetensors   our adapter files (or adapters/NAME/adapter.safetensors),
                                    loaded under NAME

Names are resolved outside the engine: the engine never imports ``ctrlora_cli``
(tests/test_layout.py), so ``from_store`` takes a ``resolver`` (names -> ``PretrainedPaths``);
``ctrlora_cli.store.paths.store_paths`` is the one for the user's store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine.errors import UsageError

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class PretrainedPaths:
    """The files a pipeline is loaded from: an SD folder (diffusers layout), a Base ControlNet
    folder, and adapter files by the name they are loaded under."""

    sd: Path
    base: Path
    adapters: dict[str, Path] = field(default_factory=dict)


Resolver = Callable[..., PretrainedPaths]  # resolver(adapters: list[str], base=None, sd=None)


def find_paths(folder=None, *, sd=None, base=None, adapters=None) -> PretrainedPaths:
    """``PretrainedPaths`` from a pretrained folder (layout above) and/or explicit paths, which
    win over the folder's. ``adapters``: ``{name: file}``, or a list of files (named by the file,
    or by the folder of an ``adapter.safetensors``)."""
    root = Path(folder).expanduser() if folder is not None else None
    if root is not None and not root.is_dir():
        raise UsageError(f"{root}: no such folder")
    if sd is None and root is not None:
        sd = root if (root / "unet").is_dir() else root / "sd"
    if base is None and root is not None:
        base = root / "controlnet"
    if sd is None or base is None:
        raise UsageError("give a pretrained folder, or both sd= (a diffusers-layout folder) and base= (a Base "
                         "ControlNet folder)")
    found = {}
    if adapters is None and root is not None and (root / "adapters").is_dir():
        adapters = sorted(p for p in (root / "adapters").iterdir() if p.suffix == ".safetensors" or
                          (p / ADAPTER_FILE).is_file())
    if isinstance(adapters, dict):
        found = {name: Path(path).expanduser() for name, path in adapters.items()}
    else:
        for path in map(Path, adapters or []):
            path = path / ADAPTER_FILE if path.is_dir() else path
            found[path.parent.name if path.name == ADAPTER_FILE else path.stem] = path
    paths = PretrainedPaths(Path(sd).expanduser(), Path(base).expanduser(), found)
    for what, where in (("Stable Diffusion", paths.sd / "unet"), ("Base ControlNet", paths.base / "config.json")):
        if not where.exists():
            raise UsageError(f"no {what} at {where.parent}: expected {where.name}")
    for name, path in paths.adapters.items():
        if not path.is_file():
            raise UsageError(f"adapter {name!r}: no file {path}")
    return paths


def load(pipeline_class, paths: PretrainedPaths, device=None, precision: str | None = None, **options):
    """A ``pipeline_class`` (``CtrLoraPipeline``, which calls this: no import circle) with every
    adapter of ``paths`` loaded under its name; ``device`` and ``precision`` as ``engine.runtime``
    decides them (auto: CUDA and fp16 when there is a GPU); ``options`` go to the pipeline."""
    from engine.formats.adapter_file import load_adapter_file
    from engine.models.storage import load_base, load_sd, unet_width
    from engine.runtime import device_and_dtype

    dev, dtype, _ = device_and_dtype(device, precision, width=unet_width(paths.sd))
    pipe = pipeline_class(load_sd(paths.sd, device=dev, dtype=dtype), load_base(paths.base, device=dev, dtype=dtype),
                           device=dev, dtype=dtype, **options)
    for name, path in paths.adapters.items():
        state, meta = load_adapter_file(path)
        pipe.load_adapter(name, state, alpha=meta["alpha"])
    return pipe


def conditions_from(images: dict, width: int | None, height: int | None, factor: int = 8):
    """``{adapter: image | (image, weight)}`` -> (``Condition`` list, width, height). An image is a
    file path, a PIL image or a (3, H, W) tensor in [0, 1]; all are resized (short side, centre
    crop) to ``width`` x ``height``, by default the first image's size rounded down to ``factor``."""
    from PIL import Image

    from engine.generation.sampling import Condition
    from engine.images import image_to_tensor, load_image, resize_center_crop, tensor_to_image

    loaded = []
    for name, value in images.items():
        image, weight = value if isinstance(value, tuple) else (value, 1.0)
        if isinstance(image, torch.Tensor):
            image = tensor_to_image(image)
        elif not isinstance(image, Image.Image):
            image = load_image(image)
        loaded.append((name, image.convert("RGB"), float(weight)))
    if loaded and (width is None or height is None):
        first = loaded[0][1]
        width, height = width or first.width - first.width % factor, height or first.height - first.height % factor
    conditions = [Condition(name, image_to_tensor(image if image.size == (width, height)
                                                  else resize_center_crop(image, (width, height))), weight)
                  for name, image, weight in loaded]
    return conditions, width, height
