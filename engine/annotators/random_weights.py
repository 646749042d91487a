"""Random-weight annotator folders laid out as the store lays the published ones, built from
configs: ``full`` at the published networks' sizes (for timing), ``tiny`` for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.annotators import nets

# What each store entry holds, and the kinds it serves.
ENTRY_KINDS = {"annotator-depth": ("depth", "normal"), "annotator-seg": ("seg",),
               "annotator-hed": ("hed", "hedsketch"), "annotator-lineart": ("lineart", "lineart_coarse"),
               "annotator-openpose": ("openpose",)}


def _save(net: torch.nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def dpt_config(size: str):
    from transformers import DPTConfig

    if size == "full":  # DPT-Large (MiDaS v3.0)
        return DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024],
                         image_size=384, fusion_hidden_size=256)
    return DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                     backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], image_size=64,
                     fusion_hidden_size=16, head_in_index=-1)


def upernet_config(size: str):
    from transformers import ConvNextConfig, UperNetConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if size == "full":  # UperNet + ConvNeXt-Small on ADE20k
        backbone = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768], out_features=stages)
        return UperNetConfig(backbone_config=backbone, hidden_size=512, auxiliary_in_channels=384, num_labels=150)
    backbone = ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 16, 16], out_features=stages)
    return UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=16,
                         auxiliary_channels=8, num_labels=150)


def write_random(entry: str, folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A folder holding random weights for store entry ``entry`` (``annotator-depth``, ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    full = size == "full"
    if entry in ("annotator-depth", "annotator-seg"):
        from transformers.utils import logging

        logging.disable_progress_bar()
    if entry == "annotator-depth":
        from transformers import DPTForDepthEstimation

        DPTForDepthEstimation(dpt_config(size)).save_pretrained(folder)
    elif entry == "annotator-seg":
        from transformers import UperNetForSemanticSegmentation

        UperNetForSemanticSegmentation(upernet_config(size)).save_pretrained(folder)
    elif entry == "annotator-hed":
        _save(nets.HEDNet() if full else nets.HEDNet((4, 4, 8, 8, 8), (2, 2, 3, 3, 3)), folder / "ControlNetHED.safetensors")
    elif entry == "annotator-lineart":
        for stem in ("sk_model", "sk_model2"):
            _save(nets.LineartNet() if full else nets.LineartNet(4, 2), folder / f"{stem}.safetensors")
    elif entry == "annotator-openpose":
        net = nets.BodyPoseNet() if full else nets.BodyPoseNet((4, 4, 8, 8), 8, 8, 2)
        with torch.no_grad():  # random heatmaps would peak everywhere; a trained one finds a few joints
            getattr(net, f"model{net.stages}_2")[-1].bias.fill_(-1.0)
        _save(net, folder / "body_pose_model.safetensors")
    else:
        raise ValueError(entry)
    return folder
