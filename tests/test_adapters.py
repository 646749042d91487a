"""Adapters on a tiny Base ControlNet: init, routing, files, and the base's own save/load."""

import pytest
import torch

from engine.models import adapters
from engine.formats.adapter_file import load_adapter_file, read_adapter_metadata, save_adapter_file
from engine.models.arch import arch_id
from engine.models.encoders import encode_condition
from engine.models.controlnet import BaseControlNetModel
from engine.errors import CheckpointError
from engine.models.storage import load_base, save_base
from engine.models.presets import build_sd, build_tiny_tokenizer


@pytest.fixture(scope="module")
def sd():
    return build_sd("tiny", seed=0)


@pytest.fixture()
def controlnet(sd):
    torch.manual_seed(1)
    model = BaseControlNetModel.from_unet(sd.unet).eval()
    with torch.no_grad():  # non-zero zero convs, so every part shows in the output
        for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1)
            conv.bias.normal_(0, 0.1)
    return model


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([10, 500] * (batch // 2)),
            torch.randn(batch, 77, 32, generator=g))


def _run(model, plan, *args):
    with torch.no_grad(), model.routing.use(plan):
        out = model(*args)
    return list(out.down_block_res_samples) + [out.mid_block_res_sample]


def _randomise(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapters.adapter_parameters(model, name).values():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)


def test_from_unet_copies_encoder(sd, controlnet):
    assert torch.equal(controlnet.conv_in.weight, sd.unet.conv_in.weight)
    assert torch.equal(controlnet.mid_block.attentions[0].norm.weight, sd.unet.mid_block.attentions[0].norm.weight)


def test_new_adapter_equals_base_at_step_zero(controlnet):
    adapters.add_adapter(controlnet, "new", rank=4)
    args = _inputs()
    for ours, base in zip(_run(controlnet, "new", *args), _run(controlnet, None, *args)):
        assert torch.equal(ours, base)
    layer = next(iter(adapters.lora_layers(controlnet).values()))
    assert torch.count_nonzero(layer.lora_B["new"].weight) == 0
    assert layer.lora_A["new"].weight.std().item() == pytest.approx(1 / 4, rel=0.3)  # N(0, 1/rank)


def test_mixed_batch_equals_separate_calls(controlnet):
    adapters.add_adapter(controlnet, "a", rank=4)
    adapters.add_adapter(controlnet, "b", rank=8)
    _randomise(controlnet, "a", 1)
    _randomise(controlnet, "b", 2)
    cond, t, ctx = _inputs(batch=6)
    mixed = _run(controlnet, [("a", 2), (None, 2), ("b", 2)], cond, t, ctx)
    for (name, lo, hi) in [("a", 0, 2), (None, 2, 4), ("b", 4, 6)]:
        alone = _run(controlnet, name, cond[lo:hi], t[lo:hi], ctx[lo:hi])
        for m, s in zip(mixed, alone):
            torch.testing.assert_close(m[lo:hi], s, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[-1][:2], mixed[-1][4:])


def test_routing_must_cover_the_batch(controlnet):
    adapters.add_adapter(controlnet, "a", rank=4)
    with pytest.raises(ValueError, match="covers 3 samples but the batch has 2"):
        _run(controlnet, [("a", 3)], *_inputs())
    with pytest.raises(KeyError, match="not loaded"):
        _run(controlnet, "missing", *_inputs())


def test_adapter_file_round_trip(controlnet, tmp_path):
    adapters.add_adapter(controlnet, "edge", rank=4)
    _randomise(controlnet, "edge", 3)
    path = save_adapter_file(tmp_path / "edge.safetensors", adapters.adapter_state_dict(controlnet, "edge"), rank=4,
                             alpha=4, base_arch=arch_id(controlnet.config), condition="edge",
                             provenance={"source": "test"})
    state, meta = load_adapter_file(path)
    assert meta["rank"] == 4 and meta["base_arch"] == "tiny" and meta["provenance"] == {"source": "test"}
    assert all(".lora_A." in k or ".lora_B." in k or k.endswith((".weight", ".bias")) for k in state)
    other = BaseControlNetModel.from_config(controlnet.config).eval()
    other.load_state_dict(adapters.base_state_dict(controlnet))
    adapters.load_adapter(other, "edge", state)
    args = _inputs()
    for a, b in zip(_run(controlnet, "edge", *args), _run(other, "edge", *args)):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_adapter_file_must_be_ours(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="not a ctrlora adapter file"):
        read_adapter_metadata(plain)


def test_incomplete_adapter_state_is_refused_and_leaves_nothing(controlnet):
    adapters.add_adapter(controlnet, "full", rank=4)
    state = adapters.adapter_state_dict(controlnet, "full")
    state.pop("controlnet_mid_block.bias")
    with pytest.raises(CheckpointError, match="1 missing keys"):
        adapters.load_adapter(controlnet, "partial", state)
    assert adapters.adapter_names(controlnet) == ["full"]


def test_base_save_load_without_adapters(controlnet, tmp_path):
    adapters.add_adapter(controlnet, "x", rank=4)
    _randomise(controlnet, "x", 4)
    save_base(controlnet, tmp_path / "base")
    loaded = load_base(tmp_path / "base")
    assert adapters.adapter_names(loaded) == []
    args = _inputs()
    for a, b in zip(_run(controlnet, None, *args), _run(loaded, None, *args)):
        assert torch.equal(a, b)


def test_condition_encoder(sd):
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    mean = encode_condition(sd.vae, images, mode="mode")
    assert mean.shape == (2, 4, 16, 16)
    expected = sd.vae.encode(images).latent_dist.mode() * 0.18215
    torch.testing.assert_close(mean, expected)
    s1 = encode_condition(sd.vae, images, generator=torch.Generator().manual_seed(5))
    s2 = encode_condition(sd.vae, images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2) and not torch.equal(s1, mean)


def test_tiny_tokenizer_is_offline_bpe():
    tok = build_tiny_tokenizer()
    ids = tok("a red circle above a blue square").input_ids
    assert len(ids) == 9  # start + one token per known word + end
    assert len(tok("zebra").input_ids) > 3  # unknown words fall back to pieces
    assert tok.model_max_length == 77
