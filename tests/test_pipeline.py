"""The fast generation path against the plain reference algorithm, on the tiny preset.

The condition latents are the VAE posterior's mode in both, so re-encoding at every step (the
reference) and encoding once (the fast path) see the same latents: what remains is batching
versus one-by-one, which changes float rounding only.
"""

from pathlib import Path

import pytest
import torch

from engine.models import adapters
from engine.models.controlnet import BaseControlNetModel
from engine.errors import SettingError, UsageError
from engine.generation.pipeline import CtrLoraPipeline
from engine.generation.premerge import premerged
from engine.generation.prepacked import available as prepacked_available
from engine.generation.prepacked import prepacked_convs
from engine.models.presets import build_sd
from engine.generation.reference import reference_sample
from engine.generation.sampling import SCHEDULERS, Condition

SIZE = 64
PROMPT, NEGATIVE = "a red circle above a blue square", "green"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation, and on a loaded 2-core machine
    # spinning OpenMP workers make these tests many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    sd = build_sd("tiny", seed=0)
    controlnet = BaseControlNetModel.from_unet(sd.unet)
    for i, name in enumerate(("edge", "depth", "blur")):
        adapters.add_adapter(controlnet, name, rank=4)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # every part of each adapter (zero convs included) non-zero and distinct
            for param in adapters.adapter_parameters(controlnet, name).values():
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return sd, controlnet


@pytest.fixture(scope="module")
def pipe(model):
    return CtrLoraPipeline(*model, fuse_single=False)


@pytest.fixture(scope="module")
def conditions():
    g = torch.Generator().manual_seed(7)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(3)]
    return [Condition("edge", images[0], 1.0), Condition("depth", images[1], 0.6, 0.25, 1.0),
            Condition("blur", images[2], 1.3, 0.0, 0.5)]


def assert_same(ours, plain, rel=2e-5):
    """Equal up to fp32 rounding: the largest difference is a tiny fraction of the largest value
    (random tiny models push latents to magnitudes of 10-50, so an absolute bound says little)."""
    scale = plain.abs().max().item()
    assert (ours - plain).abs().max().item() <= rel * scale, ((ours - plain).abs().max().item(), scale)


def _both(pipe, conds, **kw):
    kw = {**dict(steps=3, seed=11, batch=2, condition_encoding="mode", output_type="latent"), **kw}
    fast = pipe(conds, PROMPT, NEGATIVE, **kw).latents
    _, plain, _ = reference_sample(pipe.sd, pipe.controlnet, conds, PROMPT, NEGATIVE, **kw)
    return fast, plain


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fast_path_equals_plain_reference(pipe, conditions, n):
    fast, plain = _both(pipe, conditions[:n], strength=0.9)
    assert_same(fast, plain)
    if n == 3:
        # The conditions matter (so the equality says something) ...
        bare = pipe([], PROMPT, NEGATIVE, steps=3, seed=11, batch=2, width=SIZE, height=SIZE, output_type="latent")
        assert (fast - bare.latents).abs().max() > 0.1
        # ... and so do their windows: the same conditions acting at every step give another result.
        always = [Condition(c.adapter, c.image, c.weight) for c in conditions[:n]]
        assert (pipe(always, PROMPT, NEGATIVE, steps=3, seed=11, batch=2, strength=0.9, condition_encoding="mode",
                     output_type="latent").latents - fast).abs().max() > 1e-2


def test_fused_single_condition_matches(model, conditions):
    fused = CtrLoraPipeline(*model, fuse_single=True)
    fast, plain = _both(fused, conditions[:1], guidance=3.0, steps=3)
    assert_same(fast, plain, rel=1e-4)  # merging B @ A into W rounds differently
    # Fusion is undone afterwards: the model computes with the unfused adapter again.
    assert not any(layer.merged for layer in adapters.lora_layers(model[1]).values())


def test_premerged_weights_equal_routed_lora(model):
    _, controlnet = model
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(4, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(4, 77, 32, generator=g))
    plan = [("edge", 2), ("depth", 1), (None, 1)]
    with torch.no_grad(), controlnet.routing.use(plan):
        routed = controlnet(*args, return_dict=False)
        with premerged(controlnet, ["edge", "depth"]):
            patched = [n for n, layer in adapters.lora_layers(controlnet).items() if "forward" in vars(layer)]
            merged = controlnet(*args, return_dict=False)
    assert patched and all(n.startswith(("down_blocks.0.", "down_blocks.1.")) for n in patched)
    assert not any("forward" in vars(layer) for layer in adapters.lora_layers(controlnet).values())
    for a, b in zip([*routed[0], routed[1]], [*merged[0], merged[1]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prepacked_convs_compute_the_same_and_restore_exactly(model, dtype, tol):
    if not prepacked_available(torch.device("cpu"), dtype):
        pytest.skip("needs oneDNN")
    import copy

    unet = model[0].unet if dtype == torch.float32 else copy.deepcopy(model[0].unet).to(dtype)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g, dtype=dtype), torch.tensor(500),
            torch.randn(2, 77, 32, generator=g, dtype=dtype))
    with torch.no_grad():
        eager = unet(*args).sample
        with prepacked_convs([unet]):
            packed = unet(*args).sample
            assert unet.conv_in.weight.numel() == 0  # the reordered copy replaced the plain weight
    torch.testing.assert_close(packed.float(), eager.float(), rtol=tol, atol=tol)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in vars(m) for m in unet.modules())


def _resident_file_kb() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux: reads the process's RssFile")
def test_page_out_hands_back_a_mapped_weight_and_keeps_what_it_holds(tmp_path):
    """A weight loaded from safetensors is pages of the mapped file: ``page_out`` (called for each
    weight the prepacked convolutions replace) makes them non-resident without changing them; a
    tensor torch allocated itself is left alone."""
    from safetensors.torch import load_file, save_file

    from engine.generation.prepacked import page_out

    save_file({"w": torch.arange(16 * 2**20, dtype=torch.float32)}, tmp_path / "w.safetensors")  # 64 MiB
    w = load_file(tmp_path / "w.safetensors")["w"]
    assert not w.untyped_storage().resizable()  # memory of the mapped file, as diffusers' weights
    total = float(w.sum())  # every page read: resident
    before = _resident_file_kb()
    page_out(w)
    assert before - _resident_file_kb() > 48 * 1024  # most of the 64 MiB gone from the process
    assert float(w.sum()) == total  # the same values, read back from the file
    owned = torch.arange(2**20, dtype=torch.float32)
    page_out(owned)
    assert torch.equal(owned, torch.arange(2**20, dtype=torch.float32))


@pytest.mark.parametrize("scheduler", sorted(set(SCHEDULERS) - {"ddim"}))  # ddim: the tests above
def test_other_schedulers(pipe, conditions, scheduler):
    fast, plain = _both(pipe, conditions[1:2], steps=3, scheduler=scheduler, guidance=1.0)  # (no guidance: faster)
    assert_same(fast, plain)


def test_image_k_of_a_batch_is_seed_plus_k_alone(pipe, conditions):
    # euler-a draws fresh noise at every step: each image draws from its own generator.
    kw = dict(steps=3, scheduler="euler-a", condition_seed=11, condition_encoding="mode", output_type="latent")
    batch = pipe(conditions[:2], PROMPT, NEGATIVE, seed=11, batch=2, **kw).latents
    alone = pipe(conditions[:2], PROMPT, NEGATIVE, seed=12, **kw).latents
    assert_same(alone[0], batch[1])
    assert (alone[0] - batch[0]).abs().max() > 0.1


def test_sampled_condition_latents_are_seeded(pipe, conditions):
    kw = dict(steps=2, seed=3, output_type="latent")
    a = pipe(conditions[:1], PROMPT, **kw).latents
    b = pipe(conditions[:1], PROMPT, **kw).latents
    c = pipe(conditions[:1], PROMPT, condition_seed=4, **kw).latents
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_windows_follow_diffusers():
    c = Condition("x", torch.zeros(3, 8, 8), start=0.25, end=0.75)
    assert [c.acts_at(i, 4) for i in range(4)] == [False, True, True, False]
    assert [Condition("x", torch.zeros(3, 8, 8)).acts_at(i, 3) for i in range(3)] == [True] * 3
    assert not Condition("x", torch.zeros(3, 8, 8), weight=0.0).acts_at(0, 1)


@pytest.mark.parametrize("bad, message", [
    (dict(start=0.5, end=0.5), "window"),
    (dict(end=1.5), "window"),
    (dict(weight=float("nan")), "weight must be a finite number, not nan"),
    (dict(adapter="missing"), "not loaded"),
])
def test_bad_conditions_are_refused(pipe, bad, message):
    cond = Condition(**{"adapter": "edge", "image": torch.zeros(3, SIZE, SIZE), **bad})
    with pytest.raises(UsageError, match=message):
        pipe([cond], PROMPT, steps=1, output_type="latent")


@pytest.mark.parametrize("bad, setting, message", [
    (dict(steps=0), "steps", "must be between 1 and 1000, not 0"),
    (dict(guidance=float("nan")), "guidance", "must be a finite number, not nan"),
    (dict(guidance=-1.0), "guidance", "must be at least 0, not -1.0"),
    (dict(strength=float("inf")), "strength", "must be a finite number, not inf"),
    (dict(batch=0), "batch", "must be at least 1, not 0"),
    (dict(scheduler="plms"), "scheduler", "must be one of ddim, unipc, euler-a, dpm\\+\\+, not 'plms'"),
])
def test_bad_settings_are_refused_naming_them(pipe, bad, setting, message):
    """The pipeline checks its settings as the CLI does (engine.generation.settings), before any work."""
    cond = Condition("edge", torch.zeros(3, SIZE, SIZE))
    with pytest.raises(SettingError, match=message) as refused:
        pipe([cond], PROMPT, **{"steps": 1, **bad, "output_type": "latent"})
    assert refused.value.setting == setting


def test_size_must_fit(pipe):
    cond = Condition("edge", torch.zeros(3, SIZE, SIZE))
    with pytest.raises(SettingError, match="must be a multiple of 8 from 8 to 4096, not 60") as refused:
        pipe([cond], PROMPT, steps=1, width=60, height=64)
    assert refused.value.setting == "width"
    with pytest.raises(UsageError, match="resize it first"):
        pipe([cond], PROMPT, steps=1, width=72, height=64)


def test_images_out(pipe, conditions):
    result = pipe(conditions[:2], PROMPT, steps=2, seed=1, batch=2)
    assert len(result.images) == 2 and result.images[0].size == (SIZE, SIZE)
    assert result.seeds == [1, 2] and len(result.timings["steps"]) == 2


def test_v_prediction_models_sample_by_their_scheduler_config(model, conditions):
    # The demo's toy SD predicts v: every sampler reads that from the SD's scheduler config.
    import dataclasses

    sd, controlnet = model
    v_sd = dataclasses.replace(sd, scheduler=type(sd.scheduler).from_config(sd.scheduler.config,
                                                                           prediction_type="v_prediction"))
    v_pipe = CtrLoraPipeline(v_sd, controlnet, fuse_single=False)
    fast, plain = _both(v_pipe, conditions[:2])
    assert_same(fast, plain)
    eps, _ = _both(CtrLoraPipeline(sd, controlnet, fuse_single=False), conditions[:2])
    assert (fast - eps).abs().max() > 0.1


def test_images_with_their_own_prompts_and_conditions_equal_each_made_alone(pipe, conditions):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, SIZE, SIZE, generator=g)
    prompts = [PROMPT, "a green star"]
    kw = dict(steps=3, seed=11, condition_seed=21, output_type="latent")
    shared = conditions[1]  # one image for the whole batch, next to per-image ones
    together = pipe([Condition("edge", images, 1.0), shared], prompts, NEGATIVE, batch=2, **kw).latents
    for k in range(2):
        alone = pipe([Condition("edge", images[k], 1.0), shared], prompts[k], NEGATIVE,
                     **{**kw, "seed": 11 + k, "condition_seed": 21 + k}).latents
        assert_same(together[k:k + 1], alone)
    assert (together[0] - together[1]).abs().max() > 0.1
    with pytest.raises(UsageError, match="one prompt and one condition image per image"):
        pipe([Condition("edge", images, 1.0)], PROMPT, batch=3, steps=1, output_type="latent")


def test_without_a_controlnet_it_samples_plain_sd(model):
    # The demo's toy SD checks itself this way: no ControlNet, so the UNet alone (the reference
    # with no conditions never touches its ControlNet either).
    sd, _ = model
    plain_pipe = CtrLoraPipeline(sd, None)
    kw = dict(steps=3, seed=5, batch=2, guidance=4.0, output_type="latent")
    ours = plain_pipe([], PROMPT, NEGATIVE, **kw).latents
    _, plain, _ = reference_sample(sd, None, [], PROMPT, NEGATIVE, **kw)
    assert_same(ours, plain)
    with pytest.raises(UsageError, match="no ControlNet"):
        plain_pipe([Condition("edge", torch.zeros(3, SIZE, SIZE))], PROMPT, steps=1)


def test_borrowed_model_is_used_as_it_trains():
    # fit's validation: frozen weights in bf16 under autocast beside the adapter's fp32 master
    # weights, which require grad. The pipeline must leave all of that (and every weight) as it was.
    sd = build_sd("tiny", seed=1)
    controlnet = BaseControlNetModel.from_unet(sd.unet)
    adapters.add_adapter(controlnet, "new", rank=4)
    params = adapters.adapter_parameters(controlnet, "new")
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1)  # a non-zero adapter: fusing and unfusing it would round the base weights
    sd.unet.to(torch.bfloat16)
    for p in controlnet.parameters():
        if not any(p is q for q in params.values()):
            p.data = p.data.to(torch.bfloat16)
    for p in params.values():
        p.requires_grad_(True)
    before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    dtypes = {k: v.dtype for k, v in before.items()}
    pipe = CtrLoraPipeline(sd, controlnet, borrow=True)
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = pipe([Condition("new", image)], PROMPT, steps=2, output_type="latent").latents
    assert torch.isfinite(latents).all()
    after = controlnet.state_dict()
    assert {k: v.dtype for k, v in after.items()} == dtypes and sd.unet.dtype == torch.bfloat16
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
