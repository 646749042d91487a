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


# --- ours -> ldm (official) names: the writer, beside the reader ---------------------------------

_LORA_SUFFIXES = ((".lora_A.weight", ".lora_layer.down.weight"), (".lora_B.weight", ".lora_layer.up.weight"))


def official_control_key(key: str, layers_per_block: int) -> str | None:
    """The official name (prefix not added) for one of our ControlNet keys, or None if unknown.
    The inverse of ``ldm_control_key``, and checked against it key by key: a name the reader would
    not map back to ``key`` is None, so the two can never drift apart."""
    stem, lora = key, ""
    for ours, official in _LORA_SUFFIXES:
        if key.endswith(ours):
            stem, lora = key[: -len(ours)] + ".weight", official
    found = _official_name(stem, layers_per_block)
    if found is not None and lora:
        found = found[: -len(".weight")] + lora
    return found if found is not None and ldm_control_key(found, layers_per_block) == key else None


def _official_name(key: str, lpb: int) -> str | None:
    m = re.match(r"time_embedding\.linear_([12])\.(.+)$", key)
    if m:
        return f"time_embed.{0 if m.group(1) == '1' else 2}.{m.group(2)}"
    m = re.match(r"controlnet_down_blocks\.(\d+)\.(.+)$", key)
    if m:
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    m = re.match(r"controlnet_mid_block\.(.+)$", key)
    if m:
        return f"middle_block_out.0.{m.group(1)}"
    m = re.match(r"conv_in\.(.+)$", key)
    if m:
        return f"input_blocks.0.0.{m.group(1)}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * (lpb + 1)}.0.op.{m.group(2)}"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", key)
    if m:
        index = int(m.group(1)) * (lpb + 1) + int(m.group(3)) + 1
        if m.group(2) == "attentions":
            return f"input_blocks.{index}.1.{m.group(4)}"
        return f"input_blocks.{index}.0.{_resnet_rest_back(m.group(4))}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", key)
    if m:
        return f"middle_block.1.{m.group(1)}"
    m = re.match(r"mid_block\.resnets\.([01])\.(.+)$", key)
    if m:
        return f"middle_block.{0 if m.group(1) == '0' else 2}.{_resnet_rest_back(m.group(2))}"
    return None


def _resnet_rest_back(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def to_official_keys(state: dict[str, torch.Tensor], layers_per_block: int, what: str) -> dict[str, torch.Tensor]:
    """Our keys -> official (prefixed ldm) keys; a key with no official name is refused."""
    out, unknown = {}, []
    for key, value in state.items():
        new = official_control_key(key, layers_per_block)
        if new is None:
            unknown.append(key)
        else:
            out[LDM_CONTROL_PREFIX + new] = value
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} keys have no official name (first: {first_few(unknown)})")
    return out


def official_adapter_state(state: dict[str, torch.Tensor], controlnet_config: dict,
                           what: str = "adapter") -> dict[str, torch.Tensor]:
    """Our adapter state dict -> an official adapter file's dict (LoRA ``lora_layer.down/up``, zero
    convs, ``middle_block_out``, transformer norms), checked against the architecture first."""
    check_adapter_state(state, controlnet_config, what)
    return to_official_keys(state, controlnet_config["layers_per_block"], what)


def official_base_state(base: dict[str, torch.Tensor], controlnet_config: dict, lora_rank: int,
                        what: str = "base") -> dict[str, torch.Tensor]:
    """Our base state dict -> an official base file's dict. The published base also carries one
    condition's LoRA, and ComfyUI-Advanced-ControlNet refuses a base without ``lora_layer`` keys;
    both loaders drop the base's LoRA, zero convs and norms (each adapter brings its own). So the
    base's own zero convs and norms are written, and a LoRA of ``lora_rank`` that is all zeros
    (up = 0: it changes nothing, and ``convert_official_base`` reads the base back unchanged)."""
    from engine.models.adapters import add_adapter, adapter_parameters
    from engine.models.controlnet import BaseControlNetModel

    with torch.device("meta"):
        model = BaseControlNetModel(**controlnet_config)
        check_keys(base, {k: tuple(v.shape) for k, v in model.state_dict().items()}, what)
        add_adapter(model, "export", rank=lora_rank)
        lora = {k: tuple(p.shape) for k, p in adapter_parameters(model, "export").items() if ".lora_" in k}
    like = next(iter(base.values()))
    full = dict(base)
    full.update({k: torch.zeros(shape, dtype=like.dtype, device=like.device) for k, shape in lora.items()})
    return to_official_keys(full, controlnet_config["layers_per_block"], what)


# Ranks the reference code ships configs for (configs/inference/ctrlora_sd15_rank<N>_1lora.yaml);
# its app picks one by "rank<N>" in the adapter's file name.
REFERENCE_RANKS = (32, 64, 128, 256, 512)


def official_loader_notes(kind: str, arch: str, rank: int | None, filename: str) -> list[str]:
    """What the official loaders (the reference code, ComfyUI-Advanced-ControlNet's CtrLoRA
    loader) will make of an exported file: one plain sentence per point, empty when all is well."""
    if arch != "sd15":
        return [f"a {arch} model, not SD1.5's shapes: ComfyUI-Advanced-ControlNet will not load it (it detects "
                f"SD1.5-shaped ControlNets), nor the reference code with its published SD1.5 configs (one written "
                f"for these shapes does); ctrlora pull reads it back"]
    notes = []
    if kind == "adapter" and rank is not None:
        if rank not in REFERENCE_RANKS:
            notes.append(f"rank {rank}: ComfyUI-Advanced-ControlNet loads any rank; the reference code ships "
                         f"configs for ranks {', '.join(map(str, REFERENCE_RANKS))} only")
        elif f"rank{rank}" not in filename:
            notes.append(f"the reference app picks its config by 'rank{rank}' in the file name: "
                         f"name the file like ..._rank{rank}.safetensors for it")
    if kind == "base":
        notes.append("a base is used with an adapter file: ComfyUI's 'Load CtrLoRA Model' takes both, "
                     "as does the reference code")
    return notes


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
