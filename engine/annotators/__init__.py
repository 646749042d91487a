"""Annotators: condition images made by a network from a photo (depth, normal, seg, hed,
hedsketch, lineart, lineart_coarse, openpose), the way the reference CtrLoRA made the images its
published adapters saw.

``ANNOTATORS`` says, per kind, which store entry holds its weights (``ctrlora pull ENTRY``), the
network, where the weights come from and where ours differs from the reference. ``annotate``
runs a kind on images with the weights of a folder (a store entry's). The networks need the
``annotators`` extra (OpenCV and SciPy for the reference's post-processing); ``require`` says so in
one line. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from engine.demo.extractors import Param
from engine.errors import SettingError, UsageError

EXTRA = "pip install 'ctrlora[annotators]'"
RESOLUTION = Param("resolution", "int", 512, "the short side the network sees (the reference's 512; sides "
                                             "rounded to multiples of 64); the output has this size", min=64, max=2048)


@dataclass(frozen=True)
class Annotator:
    kind: str
    entry: str  # the store entry (catalog name) holding its weights
    network: str
    source: str  # where the weights are published
    reference: str  # what the reference used
    differs: str  # where ours differs from the reference ("" when it does not)
    adapter: str  # what the published adapter saw
    params: tuple[Param, ...] = (RESOLUTION,)


_MIDAS = "MiDaS v3.0 DPT-Large (dpt_large_384.pt), whole image at the detection size in -1..1"
ANNOTATORS = {a.kind: a for a in (
    Annotator("depth", "annotator-depth", "DPT-Large (MiDaS v3.0), transformers' DPT", "Intel/dpt-large",
              _MIDAS, "", "MiDaS depth, min-max normalised, near is white"),
    Annotator("normal", "annotator-depth", "DPT-Large (MiDaS v3.0), transformers' DPT", "Intel/dpt-large",
              _MIDAS + "; normals from the depth's Sobel gradients", "",
              "normals from MiDaS depth (a = 0.2 pi, background threshold 0.02)",
              (RESOLUTION, Param("a", "float", 0.6283185307179586, "the normal's z before normalising (slope scale)",
                                 min=1e-6, max=100),
               Param("bg_th", "float", 0.02, "depth (0..1) under which the surface faces the camera", min=0, max=1))),
    Annotator("seg", "annotator-seg", "UperNet + ConvNeXt-Small, ADE20k 150 classes, transformers' UperNet",
              "openmmlab/upernet-convnext-small",
              "UperNet + UniFormer-Small on ADE20k (upernet_global_small.pth, mmsegmentation)",
              "another backbone (UniFormer is in no maintained library): same decoder, classes and palette; "
              "region borders and some labels differ", "ADE20k palette, channels reversed as mmseg drew them"),
    Annotator("hed", "annotator-hed", "ControlNet's HED (Apache-2.0 retrain)", "lllyasviel/Annotators ControlNetHED.pth",
              "the same network and file", "", "soft HED edges, white on black"),
    Annotator("hedsketch", "annotator-hed", "ControlNet's HED, then threshold + invert + blur",
              "lllyasviel/Annotators ControlNetHED.pth", "the same, with a threshold drawn in 110..159 per image",
              "the threshold is drawn from -p seed (the reference seeds from the file name)",
              "dark strokes on white",
              (RESOLUTION, Param("seed", "int", 0, "draws the threshold (110..159), as the reference draws one per image",
                                 min=0))),
    Annotator("lineart", "annotator-lineart", "informative-drawings generator (fine)",
              "lllyasviel/Annotators sk_model.pth", "the same network and file", "",
              "a mix, half fine (sk_model) and half coarse (sk_model2): dark lines on white"),
    Annotator("lineart_coarse", "annotator-lineart", "informative-drawings generator (coarse)",
              "lllyasviel/Annotators sk_model2.pth", "the same network and file", "",
              "a mix, half fine (sk_model) and half coarse (sk_model2): dark lines on white"),
    Annotator("openpose", "annotator-openpose", "OpenPose body (CMU, 18 COCO joints)",
              "lllyasviel/Annotators body_pose_model.pth", "the same network and file, body only (hands and face off)",
              "", "body skeletons on black in the COCO colours"),
)}
ALIASES = {"lineart-coarse": "lineart_coarse", "lineartcoarse": "lineart_coarse", "pose": "openpose",
           "midas": "depth", "hed_sketch": "hedsketch", "segmentation": "seg"}


def resolve(kind: str) -> Annotator | None:
    """The annotator of ``kind`` (aliases followed), or None when no annotator makes it."""
    name = ALIASES.get(kind.lower(), kind.lower())
    return ANNOTATORS.get(name)


def check_params(annotator: Annotator, params: dict) -> dict:
    """Parsed, range-checked parameters with the defaults filled in (``SettingError`` of param)."""
    known = {p.name: p for p in annotator.params}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise SettingError("param", f"{annotator.kind} has no parameter {unknown[0]!r} (its parameters: "
                                    f"{', '.join(known)})")
    return {name: p.parse(annotator.kind, params.get(name, p.default)) for name, p in known.items()}


def require(kind: str) -> None:
    """One line naming the install command when the annotators extra is missing."""
    missing = [m for m in ("cv2", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{kind} needs the annotators extra ({', '.join(missing)} missing): {EXTRA}")


def annotate(kind: str, images, weights, *, device="auto", batch: int = 4, on_progress=None, total=None, **params):
    """Condition images (RGB PIL, yielded in order) made from ``images`` (an iterable of PIL
    images; ``total`` their count, for progress) with the weights in folder ``weights``, ``batch``
    images of one size through the network at a time."""
    from engine.annotators.run import run

    annotator = resolve(kind)
    if annotator is None:
        raise UsageError(f"no annotator makes {kind!r}; annotators: {', '.join(ANNOTATORS)}")
    require(annotator.kind)
    return run(annotator.kind, images, weights, device, batch, check_params(annotator, params), on_progress, total)
