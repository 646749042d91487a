"""The demo's standard-ControlNet baseline: built, trained and drawn as ``fit`` trains and ``eval`` draws adapters."""

import pytest
import torch

from engine.demo.evaluate import evaluate
from engine.demo.settings import VAE_FACTOR, EvalSettings
from engine.demo.standard_controlnet import (StandardControlNetPipeline, StandardControlNetTrainer,
                                             build_standard_controlnet, embedding_channels)
from engine.demo.world import write_dataset
from engine.generation.pipeline import CtrLoraPipeline
from engine.generation.sampling import Condition
from engine.models.controlnet import BaseControlNetModel
from engine.models.presets import build_sd
from engine.training.fit import AdapterTrainer, FitConfig
from engine.training.pairs import LatentCache, encode_pairs, load_image, scan_folder
from test_pipeline import one_thread  # noqa: F401  (module-wide, autouse: tiny tensors run best on one thread)

SIZE = 32  # the demo's: 8 x 8 latents
DRAW = dict(steps=3, guidance=3.0, seed=5)


@pytest.fixture(scope="module")
def sd():
    sd = build_sd("demo", seed=0)
    sd.scheduler = type(sd.scheduler).from_config(sd.scheduler.config, prediction_type="v_prediction")
    return sd


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("world") / "sketch", "sketch", 6, size=SIZE, seed=0).parent


@pytest.fixture(scope="module")
def data(sd, world, tmp_path_factory):
    pairs = scan_folder(world)
    data = encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, SIZE, LatentCache(tmp_path_factory.mktemp("c")),
                        condition_pixels=True)
    assert torch.equal(data.cond_pixels, torch.stack([load_image(p.source, SIZE) for p in pairs.pairs]))
    return data


def _config(**settings):
    return FitConfig(**{"batch": 2, "lr": 1e-3, "drop_prompt": 0.3, "resolution": SIZE, "precision": "fp32",
                        "device": "cpu", **settings})


def _trainer(sd, data, **settings):
    return StandardControlNetTrainer(sd.unet, build_standard_controlnet(sd.unet, VAE_FACTOR), sd.scheduler, data,
                                     _config(**settings))


def test_the_conditioning_network_downsamples_by_the_vae_factor(sd):
    assert embedding_channels(8) == (16, 32, 96, 256)  # diffusers' default, for SD's VAE
    assert embedding_channels(4) == (16, 32, 96)
    for bad in (3, 1, 16):
        with pytest.raises(ValueError):
            embedding_channels(bad)
    controlnet = build_standard_controlnet(sd.unet, VAE_FACTOR)
    features = controlnet.controlnet_cond_embedding(torch.rand(1, 3, SIZE, SIZE))
    assert features.shape == (1, sd.unet.config.block_out_channels[0], SIZE // VAE_FACTOR, SIZE // VAE_FACTOR)
    # the UNet's encoder copied, the conditioning network seeded
    assert torch.equal(controlnet.conv_in.weight, sd.unet.conv_in.weight)
    again = build_standard_controlnet(sd.unet, VAE_FACTOR).controlnet_cond_embedding.conv_in.weight
    assert torch.equal(controlnet.controlnet_cond_embedding.conv_in.weight, again)


def test_a_fresh_standard_controlnet_draws_what_the_bare_sd_draws(sd, data):
    bare = CtrLoraPipeline(sd, None, borrow=True)([], "a red circle", width=SIZE, height=SIZE, output_type="latent",
                                                  **DRAW)
    pipe = StandardControlNetPipeline(sd, build_standard_controlnet(sd.unet, VAE_FACTOR))
    controlled = pipe([Condition(None, data.cond_pixels[0])], "a red circle", output_type="latent", **DRAW)
    assert torch.equal(controlled.latents, bare.latents)  # zero convs: residuals of exactly zero


def test_training_moves_every_part_of_the_controlnet_and_no_unet_weight(sd, data):
    unet_before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    trainer = _trainer(sd, data)
    before = {k: v.detach().clone() for k, v in trainer.controlnet.named_parameters()}
    assert trainer.trainable_parameters() == sum(v.numel() for v in before.values())
    steps = 3
    losses = [trainer.train_step() for _ in range(steps)]
    assert trainer.step == steps and all(0 < x < 10 for x in losses)
    # AdamW's weight decay alone would give p * (1 - lr * 0.01) ** steps: every group moved beyond it.
    decay = (1 - trainer.config.lr * 0.01) ** steps
    moved = {}
    for name, p in trainer.controlnet.named_parameters():
        group = name.split(".")[0]
        change = (p.detach() - before[name] * decay).abs().max().item()
        moved[group] = max(moved.get(group, 0.0), change)
    assert {"controlnet_cond_embedding", "conv_in", "time_embedding", "down_blocks", "mid_block",
            "controlnet_down_blocks", "controlnet_mid_block"} <= moved.keys()
    assert all(change > 1e-5 for change in moved.values()), moved
    assert all(torch.equal(v, unet_before[k]) for k, v in sd.unet.state_dict().items())
    assert not any(p.requires_grad for p in sd.unet.parameters())


def test_same_data_order_draws_and_losses_as_the_adapter_trainer(sd, data):
    first, second = _trainer(sd, data), _trainer(sd, data)
    assert [first.train_step() for _ in range(2)] == [second.train_step() for _ in range(2)]
    # the same config: the same batches, and the same generator draws as AdapterTrainer makes
    adapter = AdapterTrainer(sd.unet, BaseControlNetModel.from_unet(sd.unet), sd.scheduler, data, _config(rank=2))
    assert torch.equal(adapter.indices(0, 20), first.indices(0, 20))
    adapter.train_step()
    adapter.train_step()
    assert torch.equal(adapter.generator.get_state(), first.generator.get_state())
    assert not torch.equal(first.indices(0, 6), _trainer(sd, data, seed=1).indices(0, 6))


def test_a_trained_standard_controlnet_follows_its_condition_through_eval(sd, data, world):
    trainer = _trainer(sd, data, lr=3e-2)  # a clear effect in a few steps
    for _ in range(3):
        trainer.train_step()
    pipe = StandardControlNetPipeline(sd, trainer.controlnet)
    a, b = data.cond_pixels[0], data.cond_pixels[1]

    def draw(conditions, prompt, **settings):
        return pipe(conditions, prompt, output_type="latent", **{**DRAW, **settings}).latents

    alone_a, alone_b = draw([Condition(None, a)], "x"), draw([Condition(None, b)], "y", seed=DRAW["seed"] + 1)
    assert (alone_a - draw([Condition(None, b)], "x")).abs().max() > 1e-4  # the condition matters
    assert (alone_a - draw([Condition(None, a, weight=0.5)], "x")).abs().max() > 1e-4  # and its weight
    # a batch: image k is what the same call for it alone gives with seed + k
    both = draw([Condition(None, torch.stack([a, b]))], ["x", "y"], batch=2)
    torch.testing.assert_close(both, torch.cat([alone_a, alone_b]), atol=1e-5, rtol=1e-5)
    shared = draw([Condition(None, a)], "x", batch=2)
    torch.testing.assert_close(shared[:1], alone_a, atol=1e-5, rtol=1e-5)

    pairs = scan_folder(world).pairs[:2]
    result = evaluate(pipe, None, pairs, "sketch", EvalSettings(steps=2, guidance=3.0, batch=2))
    assert result.scores["count"] == 2 and len(result.per_pair) == 2
