"""Test helper: write a tiny SD (diffusers layout) as a single-file ldm checkpoint, the layout of
community SD1.5 fine-tunes (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``). The inverse of diffusers' single-file converters, for tests."""

from __future__ import annotations

import re

import torch

_VAE_FIXED = {"conv_norm_out": "norm_out"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = key
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", key)
        if m:
            side, way, i, kind, j, rest = m.groups()
            i = int(i) if way == "down" else blocks - 1 - int(i)
            if kind == "resnets":
                new = f"{side}.{way}.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{side}.{way}.{i}.{'downsample' if way == 'down' else 'upsample'}.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$", key)
        if m:
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
        if m:
            new = f"{m.group(1)}.mid.attn_1.{_ATTN[m.group(2)]}.{m.group(3)}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # ldm's attention projections are 1x1 convs
        for old, ldm in _VAE_FIXED.items():
            new = new.replace(old, ldm)
        out["first_stage_model." + new] = value
    return out


def single_file(unet_ldm: dict[str, torch.Tensor], vae_state: dict, text_state: dict, blocks: int = 4) -> dict:
    text = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in text_state.items()}
    return {**unet_ldm, **vae_to_ldm(vae_state, blocks),
            **{"cond_stage_model.transformer." + k: v for k, v in text.items()}}
