"""Loading an annotator's network from a folder of weights and running it on batches of images.

The folder is a store entry's: ``config.json`` + ``model.safetensors`` for the transformers
networks (depth, seg), ``ControlNetHED.safetensors``, ``sk_model.safetensors`` +
``sk_model2.safetensors`` and ``body_pose_model.safetensors`` for ours (pickles are converted to
safetensors when pulled; a ``.pth`` beside them is read with ``weights_only=True``). Our networks'
sizes are read off the weights, so a small random copy loads the same way as the published file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.annotators import nets, pose, post
from engine.errors import CheckpointError
from engine.progress import report

WEIGHT_FILES = {"hed": "ControlNetHED", "hedsketch": "ControlNetHED", "lineart": "sk_model",
                "lineart_coarse": "sk_model2", "openpose": "body_pose_model"}


def weights_file(folder: Path, stem: str) -> Path:
    for suffix in (".safetensors", ".pth"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise CheckpointError(f"{folder}: no {stem}.safetensors (or .pth) in the annotator's weights")


def load_state(path: Path) -> dict:
    from engine.formats.tensors import load_tensor_file

    return {k: v.float() for k, v in load_tensor_file(path).items()}


def _load(net: torch.nn.Module, state: dict, path: Path) -> torch.nn.Module:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: not this annotator's weights ({str(exc).splitlines()[0]})") from None
    return net.eval()


def hed_net(path: Path) -> nets.HEDNet:
    state = load_state(path)
    blocks = sorted({int(m[1]) for k in state if (m := re.match(r"block(\d+)\.", k))})
    widths = [state[f"block{b}.convs.0.weight"].shape[0] for b in blocks] if blocks else [1]
    layers = [len([k for k in state if re.match(rf"block{b}\.convs\.\d+\.weight$", k)]) for b in blocks]
    return _load(nets.HEDNet(tuple(widths), tuple(layers)), state, path)


def lineart_net(path: Path) -> nets.LineartNet:
    state = load_state(path)
    width = state["model0.1.weight"].shape[0] if "model0.1.weight" in state else 1
    blocks = len({m[1] for k in state if (m := re.match(r"model2\.(\d+)\.", k))})
    return _load(nets.LineartNet(width, blocks), state, path)


def body_net(path: Path) -> nets.BodyPoseNet:
    state = load_state(path)
    short = {k.split(".", 1)[1] if k.startswith("model") else k: v for k, v in state.items()}

    def out(name: str) -> int:
        if f"{name}.weight" not in short:
            raise CheckpointError(f"{path}: not OpenPose body weights (no {name})")
        return short[f"{name}.weight"].shape[0]

    widths = tuple(out(n) for n in ("conv1_1", "conv2_1", "conv3_1", "conv4_1"))
    stages = max(int(m[1]) for k in short if (m := re.match(r"Mconv1_stage(\d+)_L1\.", k))) if any(
        k.startswith("Mconv1_stage") for k in short) else 1
    net = nets.BodyPoseNet(widths, out("conv4_4_CPM"), out("conv5_1_CPM_L1"), stages)
    return _load(net, nets.body_pose_keys(net, state), path)


def transformers_net(folder: Path, kind: str):
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json in the annotator's weights")
    if kind in ("depth", "normal"):
        from transformers import DPTForDepthEstimation as cls
    else:
        from transformers import UperNetForSemanticSegmentation as cls
    from transformers.utils import logging

    logging.disable_progress_bar()  # progress is the caller's to show
    try:
        return cls.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load the {kind} network ({str(exc).splitlines()[0]})") from None


def load(kind: str, folder: str | Path) -> torch.nn.Module:
    folder = Path(folder)
    if kind in ("depth", "normal", "seg"):
        return transformers_net(folder, kind)
    path = weights_file(folder, WEIGHT_FILES[kind])
    return {"hed": hed_net, "hedsketch": hed_net, "lineart": lineart_net, "lineart_coarse": lineart_net,
            "openpose": body_net}[kind](path)


# ---------------------------------------------------------------------------------------------


_IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
_IMAGENET_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def _batch(arrays: list[np.ndarray], device) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).float().permute(0, 3, 1, 2).to(device)


def dpt_depth(net, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' DPT on an image of any shape: its own forward takes the ViT's patch grid as
    square, so the grid is handed to the neck here (MiDaS runs DPT-Large on non-square inputs)."""
    config = net.config
    if config.is_hybrid or net.backbone is not None:
        return net(pixel_values=pixels).predicted_depth
    hidden = net.dpt(pixels, output_hidden_states=True).hidden_states[1:]
    hidden = [h for i, h in enumerate(hidden) if i in config.backbone_out_indices]
    patch = config.patch_size
    features = net.neck(hidden, pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    return net.head(features)


def forward(kind: str, net, arrays: list[np.ndarray], device, params: dict) -> list[np.ndarray]:
    """Condition images (uint8 RGB) of same-size uint8 RGB inputs, one batch through ``net``."""
    h, w = arrays[0].shape[:2]
    if kind in ("depth", "normal"):
        depth = dpt_depth(net, _batch(arrays, device) / 127.5 - 1.0).float().cpu().numpy()
        if kind == "depth":
            return [post.depth_image(d) for d in depth]
        return [post.normal_image(d, params["a"], params["bg_th"]) for d in depth]
    if kind == "seg":
        pixels = _batch([(a.astype(np.float32) - _IMAGENET_MEAN) / _IMAGENET_STD for a in arrays], device)
        logits = net(pixel_values=pixels).logits
        if logits.shape[-2:] != (h, w):
            logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return [post.seg_image(labels) for labels in logits.argmax(1).cpu().numpy()]
    if kind in ("hed", "hedsketch"):
        sides = [s.float().cpu().numpy()[:, 0] for s in net(_batch(arrays, device))]
        maps = [post.hed_image([s[i] for s in sides], w, h) for i in range(len(arrays))]
        return maps if kind == "hed" else [post.hedsketch_image(m, params["seed"]) for m in maps]
    if kind in ("lineart", "lineart_coarse"):
        lines = net(_batch(arrays, device) / 255.0)[:, 0].float().cpu().numpy()
        return [post.lineart_image(line) for line in lines]
    inputs = [pose.network_input(a) for a in arrays]
    pafs, heat = net(torch.from_numpy(np.stack([i[0] for i in inputs])).to(device))
    out = []
    for i, (_, scaled) in enumerate(inputs):
        full_pafs = pose.output_maps(pafs[i].float().cpu().numpy(), scaled, (h, w))
        full_heat = pose.output_maps(heat[i].float().cpu().numpy(), scaled, (h, w))
        out.append(pose.pose_image(full_pafs, full_heat, h, w))
    return out


def run(kind: str, images, folder, device, batch: int, params: dict, on_progress=None, total: int | None = None):
    """Every image (an iterable of PIL images, read one at a time) resized for detection (short
    side to ``resolution``), consecutive images of one size batched; yields the condition images
    in order."""
    from engine.runtime import resolve_device

    device = resolve_device(device)
    net = load(kind, folder).to(device)
    done, pending = 0, []
    report(on_progress, "annotate", 0, total)

    def flush():
        nonlocal done
        for result in forward(kind, net, pending, device, params):
            yield Image.fromarray(result)
        done += len(pending)
        report(on_progress, "annotate", done, total)
        pending.clear()

    with torch.inference_mode():
        for image in images:
            array = post.resize_for_detection(np.asarray(image.convert("RGB")), params["resolution"])
            if pending and (array.shape != pending[0].shape or len(pending) >= batch):
                yield from flush()
            pending.append(array)
        if pending:
            yield from flush()
