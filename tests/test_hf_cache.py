"""Hub files shared with the Hugging Face cache: a pull through the tiny hub lands where
huggingface_hub and diffusers look (one copy on disk: hard links), and ``rm`` keeps it there
unless ``--purge-cache``."""

from __future__ import annotations

import os

from hub_fixtures import COND0_FILE, CTRLORA_REPO, SD_REPO, cli, hub, hub_server, store_env, tiny_sd_folder  # noqa: F401
from ctrlora_cli.store.store import Store

UNET = "unet/diffusion_pytorch_model.fp16.safetensors"


def _cache(env) -> str:
    return f"{env['HF_HOME']}/hub"


def test_pull_lands_in_the_hf_cache_once_and_rm_keeps_it_unless_purged(store_env, hub):
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    assert cli("pull", "tiny-official-sd").code == 0
    assert cli("pull", "tiny-cond0").code == 0
    hub.log.clear()
    store = Store(store_env["CTRLORA_HOME"])

    found = try_to_load_from_cache(SD_REPO, UNET, cache_dir=_cache(store_env))  # "main", through refs/
    assert isinstance(found, str)
    record = next(r for r in store.get("tiny-official-sd").files if r.path == "unet/diffusion_pytorch_model.safetensors")
    blob = store.blob_path(record.digest)
    assert os.path.samefile(found, blob) and blob.stat().st_nlink == 2  # one copy of the bytes, two names
    config = hf_hub_download(SD_REPO, "unet/config.json", cache_dir=_cache(store_env), local_files_only=True)
    assert os.path.samefile(config, store.folder("tiny-official-sd") / "unet" / "config.json")

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(SD_REPO, subfolder="unet", variant="fp16", cache_dir=_cache(store_env),
                                                local_files_only=True)
    assert unet.config.block_out_channels == list(store_sd_unet_config(store)["block_out_channels"])
    # The converted adapter's original (an official .ckpt) is there too, for the reference code.
    original = try_to_load_from_cache(CTRLORA_REPO, COND0_FILE, cache_dir=_cache(store_env))
    assert isinstance(original, str) and os.path.basename(os.path.realpath(original)) == \
        store.get("tiny-cond0").converted_from["sha256"]
    assert hub.log == []  # all of it without a request

    kept = cli("rm", "-y", "tiny-official-sd")
    assert kept.code == 0 and "kept their hub files in the Hugging Face cache" in kept.out
    assert "freed 0" in kept.out  # the bytes stay: the cache holds them
    assert isinstance(try_to_load_from_cache(SD_REPO, UNET, cache_dir=_cache(store_env)), str)
    again = cli("pull", "tiny-official-sd")  # back from the cache, no download
    assert again.code == 0 and "taken from the Hugging Face cache" in again.err
    assert hub.gets(UNET) == []

    purged = cli("rm", "-y", "--purge-cache", "tiny-official-sd")
    assert purged.code == 0 and "from the Hugging Face cache; freed" in purged.out
    assert try_to_load_from_cache(SD_REPO, UNET, cache_dir=_cache(store_env)) is None
    assert isinstance(try_to_load_from_cache(CTRLORA_REPO, COND0_FILE, cache_dir=_cache(store_env)), str)  # not its


def test_sharing_off(store_env, hub, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    monkeypatch.setenv("CTRLORA_SHARE_HF_CACHE", "0")
    assert cli("pull", "tiny-cond0").code == 0
    assert try_to_load_from_cache(CTRLORA_REPO, COND0_FILE, cache_dir=_cache(store_env)) is None


def store_sd_unet_config(store):
    import json

    return json.loads((store.folder("tiny-official-sd") / "unet" / "config.json").read_text())


def test_diffusers_loads_a_whole_pipeline_that_ctrlora_pulled(store_env, hub, tiny_sd_folder):
    """As ``StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/...")`` after ``ctrlora pull
    base``: a repository with a full model_index.json (no safety checker), pulled by ctrlora, then
    loaded by diffusers from the cache alone."""
    import json

    import torch
    from diffusers import StableDiffusionPipeline

    from engine.formats.detect import model_index

    files = {p.relative_to(tiny_sd_folder).as_posix(): p for p in tiny_sd_folder.rglob("*") if p.is_file()}
    files["model_index.json"] = json.dumps(model_index()).encode()
    hub.add_repo("test/tiny-sd-full", files)
    assert cli("pull", "sd:test/tiny-sd-full", "--name", "full").code == 0
    hub.log.clear()
    pipe = StableDiffusionPipeline.from_pretrained("test/tiny-sd-full", variant="fp16", cache_dir=_cache(store_env),
                                                   local_files_only=True)
    assert hub.log == [] and pipe.text_encoder is not None and pipe.safety_checker is None
    from engine.formats.tensors import load_tensor_file

    stored_unet = load_tensor_file(Store(store_env["CTRLORA_HOME"]).folder("full") / "unet" /
                                   "diffusion_pytorch_model.safetensors")
    assert torch.equal(pipe.unet.conv_in.weight, stored_unet["conv_in.weight"].float())  # the fp16 bytes it pulled
    stored = Store(store_env["CTRLORA_HOME"]).folder("full") / "unet" / "diffusion_pytorch_model.safetensors"
    assert stored.stat().st_nlink == 2  # the store's file is the cache's: on disk once
