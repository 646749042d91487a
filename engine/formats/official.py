"""Mapping official CtrLoRA files (and ldm UNets) onto our models.

Official files are pickled dicts of fp32 tensors with ldm names under ``control_model.``. They
are only ever opened with ``torch.load(weights_only=True)``. Every import is checked key by key:
a file with unknown, missing or mis-shaped keys is refused with one line naming the first few.
"""

from __future__ import annotations

import re

import torch

from engine.errors import CheckpointError, first_few
from engine.models.state import check_keys

LDM_CONTROL_PREFIX = "control_model."
LDM_UNET_PREFIX = "model.diffusion_model."


# --- ldm (official) names -> ours -------------------------------------------------------------
# diffusers' single-file helpers convert WHOLE ControlNet files only (they count input blocks
# from the keys present, so an adapter file, which lacks most blocks, is mis-mapped), and their
# fixed-name table drops the time-embedding LoRA. A per-key mapping handles base and adapter
# files alike; the SD1.5 key lists in tests check that it is complete.

_RESNET_RENAMES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)


def ldm_control_key(key: str, layers_per_block: int) -> str | None:
    """Our name for one official ControlNet key (prefix already stripped), or None if unknown."""
    lora = re.search(r"\.lora_layer\.(down|up)\.weight$", key)
    if lora:
        key = key[: lora.start()] + (".lora_A.weight" if lora.group(1) == "down" else ".lora_B.weight")
    m = re.match(r"time_embed\.([02])\.(.+)$", key)
    if m:
        return f"time_embedding.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    m = re.match(r"zero_convs\.(\d+)\.0\.(.+)$", key)
    if m:
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    m = re.match(r"middle_block_out\.0\.(.+)$", key)
    if m:
        return f"controlnet_mid_block.{m.group(1)}"
    m = re.match(r"input_blocks\.0\.0\.(.+)$", key)
    if m:
        return f"conv_in.{m.group(1)}"
    m = re.match(r"input_blocks\.(\d+)\.([01])\.(.+)$", key)
    if m:
        index, part, rest = int(m.group(1)), m.group(2), m.group(3)
        block, layer = divmod(index - 1, layers_per_block + 1)
        if part == "0" and rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        if part == "0":
            return f"down_blocks.{block}.resnets.{layer}.{_resnet_rest(rest)}"
        return f"down_blocks.{block}.attentions.{layer}.{rest}"
    m = re.match(r"middle_block\.([012])\.(.+)$", key)
    if m:
        part, rest = m.group(1), m.group(2)
        if part == "1":
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{0 if part == '0' else 1}.{_resnet_rest(rest)}"
    return None


def _resnet_rest(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def strip_control_prefix(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    outside = [k for k in state if not k.startswith(LDM_CONTROL_PREFIX)]
    if outside:
        raise CheckpointError(
            f"{what}: not an official CtrLoRA file: {len(outside)} keys lack the '{LDM_CONTROL_PREFIX}' prefix "
            f"(first: {first_few(outside)})"
        )
    return {k[len(LDM_CONTROL_PREFIX):]: v for k, v in state.items()}


def map_official_keys(state: dict[str, torch.Tensor], layers_per_block: int, what: str) -> dict[str, torch.Tensor]:
    """Official (prefixed ldm) keys -> our keys; unknown ldm names are refused."""
    stripped = strip_control_prefix(state, what)
    out, unknown = {}, []
    for key, value in stripped.items():
        new = ldm_control_key(key, layers_per_block)
        if new is None:
            unknown.append(LDM_CONTROL_PREFIX + key)
        else:
            out[new] = value
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} unknown keys (first: {first_few(unknown)})")
    return out


def is_adapter_key(key: str) -> bool:
    """Keys that belong to a condition (LoRA, zero convs, transformer norms), not the base."""
    from engine.models.adapters import is_condition_norm

    if ".lora_A." in key or ".lora_B." in key:
        return True
    if key.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
        return True
    return is_condition_norm(key.rsplit(".", 1)[0])


def convert_official_base(state: dict[str, torch.Tensor], controlnet_config: dict, what: str = "base"):
    """An official base file -> (base state dict for ``BaseControlNetModel``, embedded adapter).

    The base file also carries one condition's LoRA, zero convs and norms. Its zero convs and
    norms are kept as the base's own values (the starting point of a new condition, as the paper
    does); the whole embedded set is also returned as an adapter state dict (our keys), which the
    caller may ignore: at generation time every adapter brings its own.
    """
    from engine.models.adapters import adapter_parameters, add_adapter
    from engine.models.controlnet import BaseControlNetModel

    mapped = map_official_keys(state, controlnet_config["layers_per_block"], what)
    base = {k: v for k, v in mapped.items() if ".lora_A." not in k and ".lora_B." not in k}
    embedded = {k: v for k, v in mapped.items() if is_adapter_key(k)}
    with torch.device("meta"):
        model = BaseControlNetModel(**controlnet_config)
    check_keys(base, {k: tuple(v.shape) for k, v in model.state_dict().items()}, what)
    if any(".lora_A." in k for k in embedded):
        from engine.models.adapters import adapter_rank

        with torch.device("meta"):
            add_adapter(model, "embedded", rank=adapter_rank(embedded))
        check_keys(embedded, {k: tuple(p.shape) for k, p in adapter_parameters(model, "embedded").items()}, what)
    else:
        embedded = {}
    return base, embedded


def convert_official_adapter(state: dict[str, torch.Tensor], controlnet_config: dict, what: str = "adapter"):
    """An official adapter file -> our adapter state dict, checked against the architecture."""
    mapped = map_official_keys(state, controlnet_config["layers_per_block"], what)
    check_adapter_state(mapped, controlnet_config, what)
    return mapped


def check_adapter_state(state: dict[str, torch.Tensor], controlnet_config: dict, what: str = "adapter") -> int:
    """Check an adapter state dict (our keys) against a base architecture; returns its rank."""
    from engine.models.adapters import adapter_parameters, adapter_rank, add_adapter
    from engine.models.controlnet import BaseControlNetModel

    try:
        rank = adapter_rank(state)
    except ValueError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    with torch.device("meta"):
        model = BaseControlNetModel(**controlnet_config)
        add_adapter(model, "check", rank=rank)
    check_keys(state, {k: tuple(p.shape) for k, p in adapter_parameters(model, "check").items()}, what)
    return rank


def convert_ldm_unet(state: dict[str, torch.Tensor], unet_config: dict, what: str = "unet"):
    """An ldm UNet (``model.diffusion_model.*`` keys, as in single-file SD checkpoints) -> diffusers'
    ``UNet2DConditionModel`` state dict, through diffusers' own converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_keys = [k for k in state if k.startswith(LDM_UNET_PREFIX)]
    if not unet_keys:
        raise CheckpointError(f"{what}: no '{LDM_UNET_PREFIX}' keys: not an ldm Stable Diffusion UNet")
    converted = convert_ldm_unet_checkpoint({k: state[k] for k in unet_keys}, dict(unet_config))
    with torch.device("meta"):
        model = UNet2DConditionModel(**unet_config)
    check_keys(converted, {k: tuple(v.shape) for k, v in model.state_dict().items()}, what)
    return converted
