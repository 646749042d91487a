"""SD1.5-sized checks on the meta device: parameter counts and the official key mapping."""

import collections

import pytest
import torch

from conftest import SHARED
from engine.models import adapters
from engine.formats.official import convert_official_adapter, convert_official_base
from engine.models.controlnet import BaseControlNetModel
from engine.models.presets import unet_config

SD15 = BaseControlNetModel.config_from_unet(unet_config("sd15"))


@pytest.fixture()
def sd15_meta():
    with torch.device("meta"):
        return BaseControlNetModel(**SD15)


def test_base_is_controlnet_minus_hint_network(sd15_meta):
    assert sum(p.numel() for p in sd15_meta.parameters()) == 360_192_640
    assert len(adapters.linear_layer_names(sd15_meta)) == 82


def test_rank128_adapter_counts(sd15_meta):
    with torch.device("meta"):
        adapters.add_adapter(sd15_meta, "canny", rank=128)
    assert len(adapters.lora_layers(sd15_meta)) == 82
    sizes = collections.Counter()
    for key, param in adapters.adapter_parameters(sd15_meta, "canny").items():
        kind = "lora" if ".lora_" in key else "zero" if key.startswith("controlnet_") else "norm"
        sizes[kind] += param.numel()
    assert sizes == {"lora": 25_419_776, "zero": 11_479_680, "norm": 46_080}
    assert sum(sizes.values()) == 36_945_536


def _meta_tensors(tsv):
    rows = [line.split("\t") for line in (SHARED / "data" / tsv).read_text().splitlines() if line.strip()]
    return {k: torch.empty(tuple(int(d) for d in shape.split(",")), device="meta") for k, shape in rows}


def test_every_official_base_key_maps_once():
    state = _meta_tensors("official_sd15_basecn_keys.tsv")
    assert len(state) == 488
    base, embedded = convert_official_base(state, SD15)
    # every file key lands in exactly one of ours: base weights + the embedded condition's LoRA
    lora = [k for k in embedded if ".lora_" in k]
    assert len(base) + len(lora) == len(state)
    assert len(embedded) == 246


def test_every_official_adapter_key_maps_once():
    state = _meta_tensors("official_sd15_lora_rank128_keys.tsv")
    ours = convert_official_adapter(state, SD15)
    assert len(ours) == len(state) == 246
    assert sum(v.numel() for v in ours.values()) == 36_945_536
