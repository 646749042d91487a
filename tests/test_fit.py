"""``fit`` on the tiny preset: it learns, leaves the base untouched, resumes exactly, lands in the store."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_cli
from ctrlora_cli.store.resolve import adapter_file, base_folders
from engine.models import adapters
from engine.formats.adapter_file import load_adapter_file
from engine.training.pairs import LatentCache, encode_pairs, scan_folder
from engine.training.objective import diffusion_loss
from engine.errors import UsageError
from engine.training.fit import FitConfig, fit
from engine.models.storage import load_base, load_sd
from pairs import make_pairs

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny ops: threads only contend


def _fixed_batch_loss(sd, controlnet, data, plan, seeds=(0, 1, 2)) -> float:
    """The loss on every pair with fixed posterior draws, noise and timesteps."""
    losses = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        latents, cond, text = data.sample_batch(torch.arange(len(data)), g)
        with torch.no_grad(), controlnet.routing.use(plan):
            losses.append(diffusion_loss(sd.unet, controlnet, sd.scheduler, latents, cond, text, generator=g).item())
    return sum(losses) / len(losses)


def test_short_fit_lowers_the_loss_and_leaves_the_base_alone(tiny_store, tmp_path, one_thread):
    _, controlnet_dir, sd_dir = base_folders(tiny_store, "tiny")
    sd, controlnet = load_sd(sd_dir), load_base(controlnet_dir)
    base_before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    assert adapters.base_state_dict(controlnet).keys() == base_before.keys()
    pairs = scan_folder(make_pairs(tmp_path / "data", n=4))
    events = []
    # A high learning rate: the test wants a clear change in a few steps, not the paper's recipe.
    config = FitConfig(condition="circles", rank=4, steps=12, batch=2, lr=5e-2, resolution=64, drop_prompt=0.3,
                       val_every=12, val_steps=3, save_every=4, seed=0)
    result = fit(pairs, sd=sd, controlnet=controlnet, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                 config=config, base_digest="sha256:test", callback=events.append)

    # The base is bit-identical, and the model carries no adapter afterwards.
    assert adapters.adapter_names(controlnet) == []
    base_after = adapters.base_state_dict(controlnet)
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(v, base_before[k]) for k, v in base_after.items())

    state, meta = load_adapter_file(result.adapter_file)
    assert meta["condition"] == "circles" and meta["rank"] == 4 and meta["base_arch"] == "tiny"
    assert meta["provenance"]["steps"] == 12 and meta["provenance"]["data_digest"] == pairs.digest
    assert meta["provenance"]["base_digest"] == "sha256:test"

    data = encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, 64, LatentCache(tmp_path / "cache"))
    before = _fixed_batch_loss(sd, controlnet, data, None)  # the fresh adapter equals the bare base
    adapters.load_adapter(controlnet, "fitted", state)
    after = _fixed_batch_loss(sd, controlnet, data, "fitted")
    # A random tiny UNet caps what control can explain; 12 steps take about 0.1 of about 1.1.
    assert after < before - 0.05, (before, after)

    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert {"loss", "loss_smooth", "it_s", "images_s", "eta_s"} <= lines[0].keys()
    assert sorted(p.name for p in (run / "val").iterdir()) == ["step-000012.png"]
    from PIL import Image

    grid = Image.open(run / "val" / "step-000012.png")
    assert grid.size == (2 * 64, 2 * 64)  # two conditions x (condition + one prompt)
    # The validation image is what generation draws with the saved adapter, from the same seeds
    # (condition latents seed + 1, noise seed + 2): fit samples through the generation pipeline.
    from engine.generation.pipeline import CtrLoraPipeline
    from engine.generation.sampling import Condition
    from engine.training.pairs import load_image

    first = pairs.pairs[0]
    pipe = CtrLoraPipeline(sd, controlnet, fuse_single=False, prepack=False)
    drawn = pipe([Condition("fitted", load_image(first.source, 64))], first.prompt, steps=3, guidance=7.5,
                 seed=2, condition_seed=1).images[0]
    shown = grid.convert("RGB").crop((64, 0, 128, 64))
    difference = (torch.tensor(list(shown.getdata())) - torch.tensor(list(drawn.getdata()))).abs().max()
    assert difference <= 1, difference  # up to rounding: the same model, the same sampler
    assert Image.open(run / "loss.png").size == (800, 400)
    train = [e for e in events if e.task == "train"]
    assert train[-1].completed == 12 and train[-1].total == 12 and train[-1].info["images_s"] > 0
    assert {e.task for e in events} >= {"encode", "train", "validate"}
    # The run folder is not reused by accident.
    with pytest.raises(UsageError, match="already holds a run"):
        fit(pairs, sd=sd, controlnet=controlnet, run_dir=run, cache_dir=tmp_path / "cache", config=config)


def _check_store_entry(store, name, data):
    """The CLI's result: an adapter entry that gen resolves against the base it was fitted on."""
    manifest = store.get(name)
    assert (manifest.kind, manifest.arch, manifest.condition, manifest.rank) == ("adapter", "tiny", name, 4)
    assert [f.path for f in manifest.files] == ["adapter.safetensors"]
    base = store.get("tiny")
    assert manifest.extra["steps"] == 12 and manifest.extra["pairs"] == 3
    assert manifest.extra["base_digest"] == next(f.digest for f in base.files if f.path.endswith(".safetensors"))
    assert manifest.extra["data_digest"] == scan_folder(data).digest
    _, meta = adapter_file(store, name, base)
    assert meta["condition"] == name and meta["base_arch"] == "tiny"


_RESUME_SETTINGS = dict(rank=4, steps=12, batch=2, lr=1e-3, resolution=64, save_every=4, seed=7)


def _fit_args(data, name, run_dir):
    s = _RESUME_SETTINGS
    return ["fit", str(data), "--name", name, "--base", "tiny", "--run-dir", str(run_dir),
            *[x for k in ("rank", "steps", "batch", "lr", "resolution", "save_every", "seed")
              for x in (f"--{k.replace('_', '-')}", str(s[k]))]]


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_store, tmp_path, one_thread):
    data = make_pairs(tmp_path / "data", n=3)
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CTRLORA_HOME": str(tiny_store.root), **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, "-m", "ctrlora_cli", *_fit_args(data, "resumed", run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill between checkpoints (4 and 8), mid-way through
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (run / "adapter.safetensors").exists() and not tiny_store.exists("resumed")

    # Resumed by the command in this process (on one thread, as the killed one), from what is on disk.
    from hub_fixtures import cli

    resumed = cli(*_fit_args(data, "resumed", run), "--resume")
    assert resumed.code == 0, resumed.err
    assert "fitted resumed: 12 steps on 3 pairs" in resumed.out
    assert "ctrlora gen --cond resumed=" in resumed.out
    _check_store_entry(tiny_store, "resumed", data)

    # The same fit, never interrupted (in this process, also on one thread).
    _, controlnet_dir, sd_dir = base_folders(tiny_store, "tiny")
    sd, controlnet = load_sd(sd_dir), load_base(controlnet_dir)
    config = FitConfig(condition="whole", **_RESUME_SETTINGS)
    whole = fit(scan_folder(data), sd=sd, controlnet=controlnet, run_dir=tmp_path / "whole",
                cache_dir=tmp_path / "cache", config=config)
    a, _ = load_adapter_file(whole.adapter_file)
    b, _ = load_adapter_file(tiny_store.folder("resumed") / "adapter.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    # The metrics of the redone steps replace the killed run's, line for line.
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    whole_lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert [x["loss"] for x in lines] == [x["loss"] for x in whole_lines]

    # --precision auto on resume keeps what the run began with (fp32 here), even where this CPU
    # would now pick bf16: the finished run resumes to the same adapter.
    from engine import runtime

    runtime.set_cpu_bf16(True)
    again = fit(scan_folder(data), sd=sd, controlnet=controlnet, run_dir=tmp_path / "whole",
                cache_dir=tmp_path / "cache", config=FitConfig(condition="whole", **_RESUME_SETTINGS), resume=True)
    runtime.set_cpu_bf16(False)
    c, _ = load_adapter_file(again.adapter_file)
    assert all(torch.equal(a[k], c[k]) for k in a)

    # Resuming with other settings is refused, naming what changed.
    with pytest.raises(UsageError, match=r"lr 0\.001 -> 0\.0001"):
        fit(scan_folder(data), sd=sd, controlnet=controlnet, run_dir=tmp_path / "whole", cache_dir=tmp_path / "cache",
            config=FitConfig(**{**_RESUME_SETTINGS, "lr": 1e-4}), resume=True)


def test_cli_refuses_bad_requests_before_any_work(tiny_store, tmp_path):
    data = make_pairs(tmp_path / "data", n=1)
    env = {"CTRLORA_HOME": str(tiny_store.root)}
    for args, code, message in [
        (["--name", "tiny"], 2, "'tiny' is already in the store"),
        ([], 2, "missing --name"),
        (["--name", "x", "--precision", "fp8"], 2, "Invalid value for '--precision'"),
        (["--name", "x", "--precision", "fp16"], 2, "--precision: fp16 is not supported here; choose one of fp32, bf16"),
        (["--name", "x", "--grad-accum", "0"], 2, "--grad-accum: must be at least 1, not 0"),
        (["--name", "x", "--resolution", "60"], 2, "--resolution: must be a multiple of 8, not 60"),
        (["--name", "Bad/Name"], 2, "invalid name"),
        (["--name", "x", "--base", "nope"], 2, "'nope' is not in the store"),
    ]:
        result = run_cli("fit", str(data), "--base", "tiny", *args, env=env)
        assert result.returncode == code, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def _trainer(**settings):
    from engine.models.controlnet import BaseControlNetModel
    from engine.training.pairs import EncodedPairs
    from engine.training.fit import AdapterTrainer
    from engine.models.presets import build_sd

    g = torch.Generator().manual_seed(0)
    moments = torch.cat([torch.randn(2, 4, 8, 8, generator=g), torch.full((2, 4, 8, 8), -6.0)], 1)
    data = EncodedPairs(target=moments, cond=moments.flip(0), text=torch.randn(2, 77, 32, generator=g),
                        text_index=torch.arange(2), empty=torch.zeros(77, 32), scaling_factor=0.18215)
    sd = build_sd("tiny", seed=0)
    return AdapterTrainer(sd.unet, BaseControlNetModel.from_unet(sd.unet), sd.scheduler, data,
                          FitConfig(rank=4, lr=1e-2, drop_prompt=0.0, resolution=64, **settings))


def test_gradient_checkpointing_gives_the_same_step(one_thread):
    def one_step(**settings):
        trainer = _trainer(**settings)
        trainer.train_step()
        return trainer.adapter_state()

    plain = one_step(batch=2)
    # Checkpointing reruns forward pieces during backward, routed to the same adapter.
    other = one_step(batch=2, grad_checkpointing=True)
    assert other.keys() == plain.keys()
    assert max((other[k] - plain[k]).abs().max().item() for k in plain) < 1e-6
    assert any(not torch.equal(v, one_step(batch=2, seed=1)[k]) for k, v in plain.items())


def test_bf16_keeps_fp32_master_weights_for_the_adapter_only(one_thread):
    trainer = _trainer(batch=2, precision="bf16")  # the GPU default, here under CPU autocast
    before = trainer.adapter_state()
    loss = trainer.train_step()
    assert loss == loss and 0 < loss < 100
    assert all(p.dtype == torch.float32 for p in trainer.params.values())
    adapter_ids = {id(p) for p in trainer.params.values()}
    frozen = [p for p in trainer.controlnet.parameters() if id(p) not in adapter_ids]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    assert all(p.dtype == torch.bfloat16 for p in trainer.unet.parameters())
    after = trainer.adapter_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_names_and_run_folders_are_never_lost_or_silently_replaced(tiny_store, tmp_path, one_thread):
    """fit claims its name before any work (--force replaces the entry); a run left in a run folder
    (here after ``rm`` of an entry whose run lies outside the store) is continued with --resume or
    started over with --force, never silently; the adapter's condition is the data's own. The
    first fit and the refusals in real processes, the fits after them in this one."""
    from engine.demo.world import write_dataset
    from hub_fixtures import cli

    env = {"CTRLORA_HOME": str(tiny_store.root), **ONE_THREAD}
    data = tmp_path / "world"
    write_dataset(data, "canny", 2, size=64)
    run = tmp_path / "run"
    args = ["fit", str(data), "--name", "edges", "--run-dir", str(run), "--rank", "4", "--resolution", "64",
            "--save-every", "0", "--steps", "2"]
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert tiny_store.get("edges").condition == "canny"  # world.json's, not the store name
    assert "use it: ctrlora gen --cond edges=" in first.stdout  # gen finds the adapter's base itself

    taken = run_cli(*args, env=env)
    assert taken.returncode == 2 and taken.stderr.strip().startswith(
        "error: 'edges' is already in the store (adapter from fit"), taken.stderr
    assert taken.stderr.strip().endswith("use another --name, or --force to replace it")

    removed = run_cli("rm", "edges", "-y", env=env)
    assert removed.returncode == 0 and f"kept run folder {run}" in removed.stdout
    before = sorted(p.name for p in run.iterdir())
    left = run_cli(*args, env=env)
    assert left.returncode == 2, left.stderr
    assert left.stderr.strip() == (f"error: --run-dir: {run} already holds a run of 'edges' (finished, 2 steps); "
                                   "continue it with --resume, start over in it with --force, or delete the folder")
    assert sorted(p.name for p in run.iterdir()) == before and not tiny_store.exists("edges")

    # --resume continues it (two more steps), and the entry is back.
    more = cli(*[a if a != "2" else "4" for a in args], "--resume")
    assert more.code == 0, more.err
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert tiny_store.get("edges").extra["steps"] == 4

    # --force replaces the entry and starts the run over in the same folder.
    again = cli(*args, "--force", "--condition", "outline")
    assert again.code == 0, again.err
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    entry = tiny_store.get("edges")
    assert (entry.extra["steps"], entry.condition) == (2, "outline")
    _, meta = load_adapter_file(tiny_store.folder("edges") / "adapter.safetensors")
    assert meta["condition"] == "outline"
    assert len([m for m in tiny_store.list() if m.name == "edges"]) == 1
    blobs = {f.digest for m in tiny_store.list() for f in m.files}
    assert len(list((tiny_store.root / "blobs").iterdir())) == len(blobs)  # the old adapter's blob is gone


# -- from latent shards (ctrlora encode-shards): no VAE --------------------------------------------

@pytest.fixture(scope="module")
def latent_shards(tiny_store_template, tmp_path_factory):
    """The latent shards of 4 raw shards (4 pairs of edges, 4 of mask) at 64 px, encoded with tiny-sd's VAE."""
    from ctrlora_cli.store.store import Store
    from engine.training.latent_shards import encode_shards, input_shards
    from test_train_scale import raw_shards

    folder = tmp_path_factory.mktemp("latent-fit")
    out = folder / "latent"
    encode_shards(input_shards(str(raw_shards(folder))), out, Store(tiny_store_template).folder("tiny-sd"), 64,
                  torch.device("cpu"), batch=4)
    return out


def test_fit_from_latent_shards_never_loads_the_vae_and_resumes_exactly(tiny_store, latent_shards, tmp_path,
                                                                      monkeypatch, one_thread):
    from engine.models import storage
    from engine.training.latent_shards import fit_source, read_condition
    from hub_fixtures import cli

    loads = []
    real_load_sd = storage.load_sd
    monkeypatch.setattr(storage, "load_sd", lambda folder, **kw: loads.append(kw) or real_load_sd(folder, **kw))
    s = {**_RESUME_SETTINGS, "steps": 4, "save_every": 2}
    args = ["fit", str(latent_shards), "--name", "masks", "--base", "tiny", "--precision", "fp32", "--json",
            *[x for k in ("rank", "steps", "batch", "lr", "resolution", "save_every", "seed")
              for x in (f"--{k.replace('_', '-')}", str(s[k]))]]
    for more, message in (((), "the latent shards hold 2 conditions (edges, mask); pick the one to fit"),
                          (("--condition", "canny"), "the latent shards hold no samples of 'canny'"),
                          (("--condition", "mask", "--val-every", "2"), "latent shards hold no condition images to "
                                                                        "validate with; give --val-cond IMAGE")):
        refused = cli(*args, *more)
        assert refused.code == 2 and message in refused.err, refused.err
    assert loads == [] and not tiny_store.exists("masks")

    done = cli(*args, "--condition", "mask")
    assert done.code == 0, done.err
    assert loads == [{"vae": False}]  # the SD without its VAE: training never needed it
    summary = json.loads(done.out)
    assert (summary["condition"], summary["pairs"], summary["steps"]) == ("mask", 4, 4)
    entry = tiny_store.get("masks")
    assert (entry.kind, entry.condition, entry.extra["pairs"]) == ("adapter", "mask", 4)
    fitted, meta = load_adapter_file(tiny_store.folder("masks") / "adapter.safetensors")
    assert meta["condition"] == "mask"

    # The same run stopped at step 2 then resumed to 4 (steps may grow) gives the very same adapter.
    _, controlnet_dir, sd_dir = base_folders(tiny_store, "tiny")
    config = FitConfig(condition="mask", precision="fp32", **{**s, "steps": 2})
    samples = read_condition(latent_shards, *fit_source(latent_shards, "mask", config, sd_dir))
    assert entry.extra["data_digest"] == samples.digest and samples.target.dtype == torch.float16
    sd, controlnet = real_load_sd(sd_dir, vae=False), load_base(controlnet_dir)
    run = tmp_path / "stopped"
    fit(samples, sd=sd, controlnet=controlnet, run_dir=run, cache_dir=tmp_path / "cache", config=config)
    resumed = fit(samples, sd=sd, controlnet=controlnet, run_dir=run, cache_dir=tmp_path / "cache",
                  config=FitConfig(condition="mask", precision="fp32", **s), resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    again, _ = load_adapter_file(resumed.adapter_file)
    assert fitted.keys() == again.keys() and all(torch.equal(fitted[k], again[k]) for k in fitted)
    assert any(fitted[k].abs().sum() > 0 for k in fitted if "lora_B" in k)  # it trained (lora_B starts at 0)


def test_fit_refuses_latent_shards_of_another_size_or_vae(tiny_store, latent_shards, tmp_path):
    env = {"CTRLORA_HOME": str(tiny_store.root)}
    result = run_cli("fit", str(latent_shards), "--name", "x", "--base", "tiny", "--condition", "mask", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: the latent shards were encoded at 64 px, not --resolution 512; train at their size, or encode them "
        "again"]
    assert not tiny_store.exists("x") and not (tiny_store.root / "runs" / "x").exists()

    from engine.training.latent_shards import fit_source

    sd = tiny_store.folder("tiny-sd")  # a view of links to the store's blobs: one is replaced below
    vae_config = sd / "vae" / "config.json"
    text = vae_config.read_text()
    vae_config.unlink()  # a new file, not the blob
    vae_config.write_text(text + "\n")  # another VAE, as far as its files tell
    with pytest.raises(UsageError, match="encoded with another VAE than .*tiny-sd's; train with the SD they were"):
        fit_source(latent_shards, "mask", FitConfig(resolution=64), sd)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "shard-0.tar").write_bytes(b"")
    with pytest.raises(UsageError, match="holds shards but no manifest.json of finished latent shards"):
        fit_source(raw, None, FitConfig(), sd)
