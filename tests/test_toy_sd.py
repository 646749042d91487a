"""The demo preset and the toy SD trained on the world: sizes, learning, saving, the CLI."""

import json

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from conftest import run_cli
from hub_fixtures import cli
from engine.demo import toy_sd
from engine.images import image_grid
from engine.models.adapters import add_adapter, adapter_state_dict, base_state_dict
from engine.models.arch import arch_id
from engine.models.controlnet import BaseControlNetModel
from engine.models.encoders import encode_text, tokenize
from engine.models.presets import build_sd, unet_config, vae_config
from engine.demo.toy_sd import ToySDSettings, render_world
from engine.demo.world import BASE_CONDITIONS


@pytest.fixture(scope="module")
def demo():
    return build_sd("demo", seed=0)


def fp16_bytes(state: dict) -> int:
    return len(safetensors_bytes({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}))


def test_demo_preset_shapes_and_arch(demo):
    cfg = unet_config("demo")
    assert cfg["down_block_types"] == unet_config("sd15")["down_block_types"]  # SD1.5's layout ...
    assert cfg["up_block_types"] == unet_config("sd15")["up_block_types"]
    assert cfg["layers_per_block"] == 2 and cfg["block_out_channels"] == (32, 64, 64, 64)  # ... small widths
    assert arch_id(cfg) == "demo" and arch_id(unet_config("tiny")) == "tiny" and arch_id(unet_config("sd15")) == "sd15"
    base = BaseControlNetModel.from_unet(demo.unet)
    assert arch_id(base.config) == "demo"
    # Three VAE blocks: 64 px scenes -> 16 x 16 x 4 latents, the UNet's native size.
    assert len(vae_config("demo")["block_out_channels"]) == 3
    latent = demo.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latent.shape == (1, 4, 16, 16) and demo.unet.config.sample_size == 16
    assert demo.text_encoder.config.hidden_size == demo.unet.config.cross_attention_dim == 64
    caption = "a red circle above a blue square on a yellow background"
    assert len(demo.tokenizer(caption).input_ids) == len(caption.split()) + 2  # every word one token
    down, mid = base(latent, torch.tensor([10]), torch.zeros(1, 77, 64), return_dict=False)
    assert len(down) == 12 and mid.shape[1] == 64


def test_whole_demo_fits_the_size_budget(demo):
    base = BaseControlNetModel.from_unet(demo.unet)
    parts = {name: fp16_bytes(getattr(demo, name).state_dict()) for name in ("unet", "vae", "text_encoder")}
    parts["base"] = fp16_bytes(base_state_dict(base))
    for i, rank in enumerate((8,) + (16,) * len(BASE_CONDITIONS)):  # the base conditions and a held-out one
        add_adapter(base, f"c{i}", rank=rank)
        parts[f"c{i}"] = fp16_bytes(adapter_state_dict(base, f"c{i}"))
    total = sum(parts.values())
    assert total <= 25e6, parts
    assert 5e6 < total < 16e6, parts  # near the ~10 MB aim, not a tiny model
    assert parts["c1"] < 0.6e6  # a rank-16 adapter is a small fraction of the base


@pytest.fixture(scope="module")
def world():
    return render_world(8, size=32, seed=0)


def test_render_world(world):
    assert world.scenes.shape == world.conditions.shape == (8, 3, 32, 32) and world.scenes.dtype == torch.uint8
    assert world.condition_kinds[:3] == ["canny", "seg", "depth"] and len(set(world.captions)) == 8
    again = render_world(8, size=32, seed=0)
    assert torch.equal(again.scenes, world.scenes) and torch.equal(again.conditions, world.conditions)
    # the VAE sees scenes in [-1, 1] and condition images in [0, 1], as the pipelines feed them
    x = toy_sd.vae_inputs(torch.cat([world.scenes[:1], world.conditions[:1]]), torch.tensor([True, False]))
    assert x[0].min() < 0 and x[1].min() >= 0


def _vae_mse(vae, world):  # the training objective's MSE on every image, with the same noise each time
    x = toy_sd.vae_inputs(torch.cat([world.scenes, world.conditions]), torch.arange(16) < 8)
    with torch.no_grad():
        return toy_sd.vae_loss(vae, x, kl_weight=1e-4, generator=torch.Generator().manual_seed(0))[1].item()


def test_vae_steps_lower_the_reconstruction_error_deterministically(world):
    vaes = [build_sd("demo", seed=0).vae for _ in range(2)]
    before = _vae_mse(vaes[0], world)
    histories = [toy_sd.train_vae(vae, world, steps=15, batch=4, lr=5e-3, warmup=3, crop=16, seed=3) for vae in vaes]
    after = _vae_mse(vaes[0], world)
    assert after < 0.7 * before, (before, after)
    assert histories[0] == histories[1]  # same seed, same run
    assert all(torch.equal(a, b) for a, b in zip(vaes[0].state_dict().values(), vaes[1].state_dict().values()))
    assert not vaes[0].training and not any(p.requires_grad for p in vaes[0].parameters())


def test_scaling_factor_gives_unit_variance_latents(world, demo):
    moments = toy_sd.encode_moments(demo.vae, world.scenes)
    vae = build_sd("demo", seed=0).vae
    factor = toy_sd.set_scaling_factor(vae, moments, seed=0)
    assert vae.config.scaling_factor == factor
    z = toy_sd.sample_latents(moments, torch.Generator().manual_seed(0)) * factor
    assert abs(z.std().item() - 1) < 1e-4


def test_unet_steps_lower_the_noise_prediction_loss(world):
    sd = build_sd("demo", seed=0)
    moments = toy_sd.encode_moments(sd.vae, world.scenes)
    toy_sd.set_scaling_factor(sd.vae, moments)
    latents = toy_sd.sample_latents(moments, torch.Generator().manual_seed(0)) * sd.vae.config.scaling_factor
    ids = tokenize(sd.tokenizer, world.captions)

    def loss():  # the same noise and timesteps each time
        with torch.no_grad():
            return toy_sd.denoising_loss(sd.unet, sd.text_encoder, sd.scheduler, latents, ids,
                                         torch.Generator().manual_seed(5)).item()

    before = loss()
    text_before = sd.text_encoder.get_input_embeddings().weight.clone()
    history = toy_sd.train_unet(sd, moments, world.captions, steps=12, batch=4, lr=2e-3, warmup=3,
                                ema_decay=0.5, seed=1)
    assert len(history) == 12 and loss() < 0.8 * before
    assert not torch.equal(sd.text_encoder.get_input_embeddings().weight, text_before)  # jointly


def test_train_toy_sd_saves_a_loadable_sd(tmp_path):
    from engine.models.storage import load_sd

    events = []
    settings = ToySDSettings(size=32, count=9, vae_steps=3, unet_steps=3, batch=4, vae_batch=4, seed=2)
    result = toy_sd.train_toy_sd(settings, out=tmp_path / "sd", progress=events.append)
    assert {e.task for e in events} == {"world", "vae", "unet"}
    assert events[-1].task == "unet" and events[-1].completed == events[-1].total == 3
    summary = json.loads((tmp_path / "sd" / "toy_sd.json").read_text())
    assert summary["settings"]["count"] == 9 and summary["scaling_factor"] > 0 and summary["vae_mse_trivial"] > 0

    sd = load_sd(tmp_path / "sd")
    assert sd.scheduler.config.prediction_type == "v_prediction"  # the default, carried by the SD folder
    assert sd.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert sd.unet.config.sample_size == 8  # 32 px scenes
    assert arch_id(sd.unet.config) == "demo"
    for name in ("unet", "text_encoder"):
        saved, trained = getattr(sd, name).state_dict(), getattr(result.sd, name).state_dict()
        assert all(torch.equal(saved[k], trained[k]) for k in trained)
    base = BaseControlNetModel.from_unet(sd.unet)
    text = encode_text(sd.text_encoder, sd.tokenizer, ["a red circle on a blue background"])
    down, mid = base(torch.zeros(1, 4, 8, 8), torch.tensor([500]), text, return_dict=False)
    assert len(down) == 12
    prompts = ["a red circle on a blue background", ""]
    images = toy_sd.sample(sd, prompts, steps=2, seed=0)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    # The generation pipeline's seeding: image k is the same prompt drawn alone from seed + k.
    alone = toy_sd.sample(sd, prompts[1:], steps=2, seed=1)
    assert (alone[0] - images[1]).abs().max() < 1e-4
    assert image_grid(list(images), columns=2, gap=2).size == (68, 34)


def test_settings_are_checked():
    from engine.errors import UsageError

    for bad in (dict(size=48), dict(size=16), dict(count=0), dict(batch=0), dict(vae_batch=0), dict(unet_steps=-1),
                dict(prediction="sample")):
        with pytest.raises(UsageError):
            ToySDSettings(**bad).check()


@pytest.mark.slow
def test_cli_train_sd_adds_an_sd_entry(tiny_store, tmp_path, one_thread):
    args = ("world", "train-sd", "--name", "demo-sd", "--size", "32", "--count", "9", "--vae-steps", "2",
            "--unet-steps", "2", "--batch", "4", "--vae-batch", "4", "--seed", "1")
    result = run_cli(*args, "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["name"] == "demo-sd" and report["settings"]["unet_steps"] == 2
    entry = tiny_store.get("demo-sd")
    assert entry.kind == "sd" and entry.source == {"type": "world", "preset": "demo", "size": 32, "count": 9,
                                                   "seed": 1}
    paths = {f.path for f in entry.files}
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/config.json",
            "tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "toy_sd.json"} <= paths
    assert entry.extra["scaling_factor"] == report["scaling_factor"]
    assert (tmp_path / "out" / "unet" / "config.json").is_file()
    assert not list(tiny_store.root.glob(".train-sd-*"))  # the temporary folder is gone

    from engine.models.storage import load_sd

    assert arch_id(load_sd(tiny_store.folder("demo-sd")).unet.config) == "demo"

    again = run_cli(*args)  # the name is taken
    assert again.returncode == 2 and "already in the store" in again.stderr and "Traceback" not in again.stderr
    assert "--force to replace it" in again.stderr and tiny_store.get("demo-sd") == entry
    forced = cli(*args, "--force")  # the store's rule: --force replaces it (in this process: no second start-up)
    assert forced.code == 0, forced.err
    assert "added demo-sd (sd, demo preset, 32x32)" in forced.out
    assert {f.path for f in tiny_store.get("demo-sd").files} == paths


@pytest.mark.parametrize("args, message", [
    (("--size", "64"), "give --name"),
    (("--name", "x", "--size", "40"), "multiple of 32"),
    (("--name", "Bad Name"), "invalid name"),
])
def test_cli_train_sd_errors(tiny_store, args, message):
    result = run_cli("world", "train-sd", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not tiny_store.exists("x")
