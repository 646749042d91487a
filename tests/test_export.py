"""``ctrlora export``: the official layout (checked against the published SD1.5 key lists), and round
trips through ``ctrlora pull`` that give back the same weights, bit for bit."""

import json

import pytest
import torch

from conftest import SHARED
from hub_fixtures import cli
from ctrlora_cli.store.export import export_entry
from ctrlora_cli.store.pull import pull
from engine.errors import UsageError
from engine.formats.official import official_adapter_state, official_base_state, official_loader_notes
from engine.formats.tensors import load_tensor_file
from engine.models import adapters
from engine.models.controlnet import BaseControlNetModel
from engine.models.presets import unet_config

SD15 = BaseControlNetModel.config_from_unet(unet_config("sd15"))
BASE_WEIGHTS = "controlnet/diffusion_pytorch_model.safetensors"


def _official_shapes(tsv):
    rows = [line.split("\t") for line in (SHARED / "data" / tsv).read_text().splitlines() if line.strip()]
    return {key: tuple(int(d) for d in shape.split(",")) for key, shape in rows}


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_sd15_export_has_exactly_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = BaseControlNetModel(**SD15)
        base = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}
        adapters.add_adapter(model, "canny", rank=128)
        adapter = {k: torch.empty(p.shape) for k, p in adapters.adapter_parameters(model, "canny").items()}
    assert _shapes(official_adapter_state(adapter, SD15)) == _official_shapes("official_sd15_lora_rank128_keys.tsv")
    assert _shapes(official_base_state(base, SD15, 128)) == _official_shapes("official_sd15_basecn_keys.tsv")


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_reference_adapter_official_to_ours_to_official(ref_tiny, tiny_store, tmp_path):
    """The reference's own file, pulled and exported again: the same keys, the same bits."""
    original = load_tensor_file(ref_tiny / "adapter_cond0.ckpt")
    pull(tiny_store, str(ref_tiny / "adapter_cond0.ckpt"), name="cond0", base="tiny")
    done = export_entry(tiny_store, "cond0", tmp_path / "cond0.ckpt")
    _same(load_tensor_file(tmp_path / "cond0.ckpt"), original)
    assert torch.load(tmp_path / "cond0.ckpt", weights_only=True).keys() == original.keys()  # a plain dict
    assert done["tensors"] == 246 and done["rank"] == 4


def test_ours_to_official_to_ours_is_bit_identical(tiny_store, tmp_path):
    # An adapter with every value non-zero (LoRA up included), so a dropped or swapped key shows.
    stored = load_tensor_file(tiny_store.file("tiny-canny", "adapter.safetensors"))
    generator = torch.Generator().manual_seed(0)
    trained = {k: torch.randn(v.shape, generator=generator) for k, v in stored.items()}
    from engine.formats.adapter_file import save_adapter_file

    save_adapter_file(tmp_path / "mosaic.safetensors", trained, rank=4, alpha=4, base_arch="tiny", condition="mosaic")
    pull(tiny_store, str(tmp_path / "mosaic.safetensors"), name="mosaic", base="tiny")

    export_entry(tiny_store, "mosaic", tmp_path / "out" / "mosaic_rank4.safetensors")
    pull(tiny_store, str(tmp_path / "out" / "mosaic_rank4.safetensors"), name="mosaic-back", base="tiny")
    back = tiny_store.get("mosaic-back")
    assert back.condition == "mosaic" and back.rank == 4  # the condition rides in the export's header
    _same(load_tensor_file(tiny_store.file("mosaic-back", "adapter.safetensors")), trained)

    export_entry(tiny_store, "tiny", tmp_path / "out" / "base.ckpt")
    pull(tiny_store, str(tmp_path / "out" / "base.ckpt"), name="base-back")
    _same(load_tensor_file(tiny_store.file("base-back", BASE_WEIGHTS)), load_tensor_file(tiny_store.file("tiny", BASE_WEIGHTS)))

    half = export_entry(tiny_store, "mosaic", tmp_path / "out" / "half.safetensors", dtype="fp16")
    assert {v.dtype for v in load_tensor_file(tmp_path / "out" / "half.safetensors").values()} == {torch.float16}
    assert half["bytes"] < (tmp_path / "out" / "mosaic_rank4.safetensors").stat().st_size * 0.6


def test_refusals_before_any_work(tiny_store, tmp_path):
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    with pytest.raises(UsageError, match="already exists"):
        export_entry(tiny_store, "tiny-canny", taken)
    assert taken.read_bytes() == b"mine"
    with pytest.raises(UsageError, match="Stable Diffusion"):
        export_entry(tiny_store, "tiny-sd", tmp_path / "sd.safetensors")
    with pytest.raises(UsageError, match=r"\.safetensors or \.ckpt"):
        export_entry(tiny_store, "tiny-canny", tmp_path / "a.bin")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ctrlora-home") == ["taken.safetensors"]


def test_loader_notes():
    assert official_loader_notes("adapter", "sd15", 128, "x_rank128.safetensors") == []
    assert "rank128" in official_loader_notes("adapter", "sd15", 128, "x.safetensors")[0]
    assert "ranks 32, 64, 128, 256, 512" in official_loader_notes("adapter", "sd15", 16, "x.safetensors")[0]
    assert "will not load" in official_loader_notes("adapter", "tiny", 4, "x.safetensors")[0]


def test_cli_export_json_and_force(tiny_store, tmp_path):
    target = tmp_path / "canny.safetensors"
    first = cli("export", "tiny-canny", "-o", str(target), "--json")
    assert first.code == 0, first.err
    report = json.loads(first.out)
    assert report["format"] == "official" and report["tensors"] == 246 and report["bytes"] == target.stat().st_size
    again = cli("export", "tiny-canny", "-o", str(target))
    assert again.code == 2 and "--force" in again.err and "Traceback" not in again.err
    forced = export_entry(tiny_store, "tiny-canny", target, fmt="ours", force=True)
    assert "our format" in forced["notes"][0]
    assert load_meta(target)["format"] == "ctrlora-adapter"


def load_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()
