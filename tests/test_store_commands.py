"""``ctrlora list``, ``show``, ``rm`` and ``verify``, and imports of local files and folders."""

from __future__ import annotations

import json
import shutil

import torch

from hub_fixtures import COND0_FILE, cli, hub, hub_server, store_env, tiny_sd_folder  # noqa: F401
from ctrlora_cli.store.store import Store


def test_list_show_rm_and_garbage_collection(store_env, hub):
    assert cli("pull", "tiny-cond0").code == 0
    assert cli("pull", "tiny-cond1").code == 0
    assert cli("pull", "tiny").code == 0
    store = Store(store_env["CTRLORA_HOME"])

    listed = json.loads(cli("list", "--json").out)
    assert [m["name"] for m in listed] == ["tiny", "tiny-canny", "tiny-cond0", "tiny-cond1", "tiny-sd"]
    by_name = {m["name"]: m for m in listed}
    assert by_name["tiny-cond0"]["size"] == sum(f["size"] for f in by_name["tiny-cond0"]["files"]) > 0
    table = cli("list").out
    assert "NAME" in table and "CONDITION" in table
    assert "tiny-cond0  adapter  cond0" in table and "test/ctrlora@" in table

    shown = json.loads(cli("show", "tiny-cond0", "--json").out)
    params = shown["parameters"]
    assert params["total"] == params["LoRA"] + params["zero convs"] + params["norms"]
    assert params["zero convs"] > 0 and params["norms"] > 0
    from engine.formats.adapter_file import load_adapter_file

    state, _ = load_adapter_file(store.folder("tiny-cond0") / "adapter.safetensors")
    assert params["total"] == sum(v.numel() for v in state.values())
    assert params["LoRA"] == sum(v.numel() for k, v in state.items() if ".lora_" in k)
    text = cli("show", "tiny-cond0").out
    assert "condition" in text and "cond0" in text and "parameters" in text and "hf://test/ctrlora/" in text
    assert shown["source"]["path"] == COND0_FILE

    refused = cli("rm", "tiny-cond0")
    assert refused.code == 2 and "pass -y" in refused.err and store.exists("tiny-cond0")
    partly = cli("rm", "-y", "tiny-cond0", "nonesuch")
    assert partly.code == 2 and store.exists("tiny-cond0")  # all or nothing; an unknown name is bad input
    dead = store.scratch() / "999999999-left-by-a-killed-pull"
    dead.mkdir()
    gone = store.blob_path(store.get("tiny-cond0").files[0].digest)
    size = store.get("tiny-cond0").size
    removed = cli("rm", "-y", "tiny-cond0")
    assert removed.code == 0 and f"removed tiny-cond0; freed {_human(size)}" in removed.out
    assert not store.exists("tiny-cond0") and not gone.exists() and not dead.exists()
    referenced = {store.blob_path(f.digest).name for m in store.list() for f in m.files}
    assert {p.name for p in store.blobs.iterdir()} == referenced  # garbage collected
    assert "tiny-cond0" not in cli("list").out


def _human(n):
    from rich.filesize import decimal

    return decimal(n)


def test_verify_finds_a_corrupt_blob_and_force_repairs_it(store_env, hub):
    assert cli("pull", "tiny-cond0").code == 0
    store = Store(store_env["CTRLORA_HOME"])
    assert cli("verify").code == 0
    record = store.get("tiny-cond0").files[0]
    blob = store.blob_path(record.digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    result = cli("verify")
    assert result.code == 1
    assert "damaged  tiny-cond0: adapter.safetensors: content changed" in result.out
    assert "  ctrlora pull tiny-cond0 --force" in result.out
    assert cli("pull", "tiny-cond0", "--force").code == 0
    assert cli("verify", "tiny-cond0").code == 0


def test_import_local_files_and_folders(store_env, hub, ref_tiny, tiny_sd_folder, tmp_path):
    store = Store(store_env["CTRLORA_HOME"])
    # a Stable Diffusion folder in diffusers layout: the fp16 variant, saved under plain names
    sd = cli("pull", str(tiny_sd_folder), "--name", "my-sd")
    assert sd.code == 0, sd.err
    manifest = store.get("my-sd")
    assert (manifest.kind, manifest.arch, manifest.source["variant"]) == ("sd", "tiny", "fp16")
    assert not any(".fp16." in f.path for f in manifest.files)

    # an official base file; it pairs with the only tiny SD in the store
    base = cli("pull", str(ref_tiny / "base.ckpt"), "--name", "my-base")
    assert base.code == 0, base.err
    assert store.get("my-base").sd == "my-sd" and store.get("my-base").source["type"] == "local"
    assert cli("pull", str(ref_tiny / "base.ckpt"), "--name", "my-base").out.startswith("my-base is up to date")

    # an official adapter (safetensors), and the wrong --kind
    wrong = cli("pull", str(ref_tiny / "adapter_cond1.safetensors"), "--name", "c1", "--kind", "sd")
    assert wrong.code == 2 and "holds a adapter, not a sd" in wrong.err.replace("an adapter", "a adapter")
    ok = cli("pull", str(ref_tiny / "adapter_cond1.safetensors"), "--name", "c1", "--base", "my-base",
             "--condition", "edges")
    assert ok.code == 0, ok.err
    assert (store.get("c1").condition, store.get("c1").arch, store.get("c1").rank) == ("edges", "tiny", 4)

    # one of our own adapter files, renamed to another condition: file and manifest agree
    ours = tmp_path / "mine.safetensors"
    shutil.copyfile(store.folder("c1") / "adapter.safetensors", ours)
    assert cli("pull", str(ours), "--name", "mine", "--condition", "lines").code == 0
    from engine.formats.adapter_file import read_adapter_metadata

    assert read_adapter_metadata(store.folder("mine") / "adapter.safetensors")["condition"] == "lines"
    assert store.get("mine").condition == "lines"

    # a file that is none of these
    junk = tmp_path / "junk.safetensors"
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(junk))
    refused = cli("pull", str(junk), "--name", "junk")
    assert refused.code == 2 and "not an official CtrLoRA base or adapter" in refused.err
    assert cli("pull", str(tmp_path / "absent.ckpt")).code == 2


def test_import_single_file_sd(store_env, ref_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from engine.models.storage import load_sd
    from engine.models.presets import build_sd
    from ldm_single_file import single_file

    original = build_sd("tiny", seed=7)
    unet_ldm = load_file(str(ref_tiny / "unet_ldm.safetensors"))
    path = tmp_path / "community-finetune.safetensors"
    save_file(single_file(unet_ldm, original.vae.state_dict(), original.text_encoder.state_dict()), str(path))
    result = cli("pull", str(path), "--kind", "sd")
    assert result.code == 0, result.err
    store = Store(store_env["CTRLORA_HOME"])
    manifest = store.get("community-finetune")
    assert (manifest.kind, manifest.arch, manifest.converted_from["format"]) == ("sd", "tiny", "ldm-single-file")
    loaded = load_sd(store.folder("community-finetune"))
    from engine.formats.official import convert_ldm_unet
    from engine.models.presets import unet_config

    pairs = [(loaded.unet.state_dict(), convert_ldm_unet(unet_ldm, unet_config("tiny"))),
             (loaded.vae.state_dict(), original.vae.state_dict()),
             (loaded.text_encoder.state_dict(), original.text_encoder.state_dict())]
    for got, want in pairs:
        assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
    assert loaded.tokenizer("a red circle").input_ids == original.tokenizer("a red circle").input_ids
