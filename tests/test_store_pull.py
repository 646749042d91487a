"""``ctrlora pull`` against a tiny hub on 127.0.0.1: catalog names, conversion of official files,
hub files, local files and folders, resumed downloads, digests, the HF cache and offline mode."""

from __future__ import annotations

import pytest
import torch

from hub_fixtures import (BASE_FILE, COND0_FILE, COND1_FILE, CTRLORA_REPO, cli, hub, hub_server,  # noqa: F401
                          store_env, tiny_sd_folder)
from ctrlora_cli.store.store import Store


def _manifest(env, name):
    return Store(env["CTRLORA_HOME"]).get(name)


def test_pull_official_base_and_adapters(store_env, hub, ref_tiny):
    from engine.formats.official import convert_official_adapter, convert_official_base
    from engine.formats.tensors import load_tensor_file
    from engine.models.controlnet import BaseControlNetModel
    from engine.models.storage import load_base, load_sd
    from engine.models.presets import unet_config
    from ctrlora_cli.store import resolve

    result = cli("pull", "tiny-official")
    assert result.code == 0, result.err
    assert "pulled tiny-official-sd (sd, tiny)" in result.out
    assert "pulled tiny-official (base, tiny, sd tiny-official-sd)" in result.out
    store = Store(store_env["CTRLORA_HOME"])
    base = store.get("tiny-official")
    assert base.kind == "base" and base.arch == "tiny" and base.sd == "tiny-official-sd"
    assert base.source["repo"] == CTRLORA_REPO and base.source["path"] == BASE_FILE
    assert base.source["commit"] == hub.repos[CTRLORA_REPO].commit and base.source["revision"] == "main"
    assert base.converted_from["format"] == "official" and base.converted_from["embedded_adapter_rank"] == 4
    assert [f.path for f in base.files] == ["controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors"]
    # the SD came in its fp16 variant only, saved under the plain names
    sd = store.get("tiny-official-sd")
    assert sd.source["variant"] == "fp16" and sd.arch == "tiny"
    assert hub.gets("unet/diffusion_pytorch_model.fp16.safetensors")
    assert not hub.gets("unet/diffusion_pytorch_model.safetensors")
    assert "unet/diffusion_pytorch_model.safetensors" in {f.path for f in sd.files}

    # the stored base holds exactly the converted official weights
    cfg = BaseControlNetModel.config_from_unet(unet_config("tiny"))
    want, _ = convert_official_base(load_tensor_file(ref_tiny / "base.ckpt"), cfg)
    _, cn_dir, sd_dir = resolve.base_folders(store, "tiny-official")
    got = load_base(cn_dir).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert load_sd(sd_dir).unet.dtype == torch.float32

    result = cli("pull", "tiny-cond0")
    assert result.code == 0, result.err
    assert "pulled tiny-cond0 (adapter cond0, rank 4, for tiny bases, made for tiny-official)" in result.out
    adapter = store.get("tiny-cond0")
    assert (adapter.kind, adapter.arch, adapter.condition, adapter.rank) == ("adapter", "tiny", "cond0", 4)
    assert adapter.source["path"] == COND0_FILE
    path, meta = resolve.adapter_file(store, "tiny-cond0", base)
    assert meta["base_arch"] == "tiny" and meta["condition"] == "cond0" and meta["rank"] == 4
    from engine.formats.adapter_file import load_adapter_file

    state, _ = load_adapter_file(path)
    want = convert_official_adapter(load_tensor_file(ref_tiny / "adapter_cond0.ckpt"), cfg)
    assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)

    # an official adapter published as safetensors, matched by a pattern in a subfolder
    assert cli("pull", "tiny-cond1").code == 0
    assert _manifest(store_env, "tiny-cond1").source["path"] == COND1_FILE

    # pulling again fetches nothing
    hub.log.clear()
    again = cli("pull", "tiny-cond0")
    assert again.code == 0 and "tiny-cond0 is up to date" in again.out
    assert hub.gets() == []


def test_catalog_file_gone_is_one_clear_line(store_env, hub):
    result = cli("pull", "tiny-gone")
    assert result.code == 2
    assert "no file in test/ctrlora@main matches" in result.err and "Traceback" not in result.err
    unknown = cli("pull", "nonesuch")
    assert unknown.code == 2 and "unknown model 'nonesuch'" in unknown.err


def _store_files(env):
    store = Store(env["CTRLORA_HOME"])
    blobs = sorted(p.name for p in store.blobs.iterdir()) if store.blobs.is_dir() else []
    parts = sorted(p.name for p in store.partial.glob("*.part")) if store.partial.is_dir() else []
    scratch = sorted(p.name for p in (store.root / "tmp").iterdir()) if (store.root / "tmp").is_dir() else []
    return store, blobs, parts, scratch


def test_cut_connection_resumes_on_the_next_pull(store_env, hub):
    size = len(hub.repos[CTRLORA_REPO].files[BASE_FILE])
    hub.cut(CTRLORA_REPO, BASE_FILE, after=11_000_000)
    first = cli("pull", "hf://test/ctrlora/" + BASE_FILE, "--name", "cut-base", "--kind", "base")
    assert first.code == 1 and "run the same pull again to continue" in first.err
    store, blobs, parts, _ = _store_files(store_env)
    assert store.list() == [] and len(parts) == 1
    kept = (store.partial / parts[0]).stat().st_size
    assert 0 < kept <= 11_000_000 < size
    listing = cli("list")
    assert "1 unfinished download(s)" in listing.out

    hub.log.clear()
    second = cli("pull", "hf://test/ctrlora/" + BASE_FILE, "--name", "cut-base", "--kind", "base")
    assert second.code == 0, second.err
    assert f"resuming at {kept / 1e6:.1f} MB" in second.err
    assert [g.range for g in hub.gets(BASE_FILE)] == [f"bytes={kept}-"]  # only the missing bytes were asked for
    store, blobs, parts, scratch = _store_files(store_env)
    assert parts == [] and scratch == []
    assert store.get("cut-base").converted_from["sha256"] == hub.repos[CTRLORA_REPO].etag(BASE_FILE)
    assert cli("verify").code == 0


def test_dropped_connection_is_retried_within_one_pull(store_env, hub, monkeypatch):
    monkeypatch.setenv("CTRLORA_DOWNLOAD_RETRIES", "1")
    hub.cut(CTRLORA_REPO, BASE_FILE, after=3_000_000)
    result = cli("pull", "hf://test/ctrlora/" + BASE_FILE, "--name", "retried")
    assert result.code == 0, result.err
    ranges = [g.range for g in hub.gets(BASE_FILE)]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and len(ranges) == 2


def test_digest_mismatch_is_refused_and_nothing_is_left(store_env, hub):
    hub.corrupt.add(f"{CTRLORA_REPO}/{COND0_FILE}")
    result = cli("pull", "tiny-cond0")
    assert result.code == 1
    assert "do not match the hub's sha256" in result.err and "nothing was kept" in result.err
    store, blobs, parts, scratch = _store_files(store_env)
    assert store.list() == [] and blobs == [] and parts == [] and scratch == []


def _hf_cache(env, hub, path):
    """Put one file in the HF cache the way huggingface_hub itself does."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(CTRLORA_REPO, path, cache_dir=f"{env['HF_HOME']}/hub", endpoint=hub.url)


def test_file_in_the_hf_cache_is_not_downloaded_again(store_env, hub):
    _hf_cache(store_env, hub, COND0_FILE)
    hub.log.clear()
    result = cli("pull", "tiny-cond0")
    assert result.code == 0, result.err
    assert "taken from the Hugging Face cache" in result.err
    assert hub.gets(COND0_FILE) == [] and not [r for r in hub.log if r.method == "HEAD"]
    assert _manifest(store_env, "tiny-cond0").condition == "cond0"


def test_offline_touches_no_network(store_env, hub, monkeypatch):
    _hf_cache(store_env, hub, COND0_FILE)
    hub.log.clear()
    monkeypatch.setenv("CTRLORA_OFFLINE", "1")
    missing = cli("pull", "tiny-cond1")
    assert missing.code == 1 and "offline" in missing.err and missing.err.count("\n") == 1
    cached = cli("pull", "tiny-cond0")  # resolved from the HF cache alone
    assert cached.code == 0, cached.err
    assert _manifest(store_env, "tiny-cond0").source["commit"] == hub.repos[CTRLORA_REPO].commit
    present = cli("pull", "tiny-cond0")
    assert present.code == 0 and "tiny-cond0 is in the store (offline" in present.out
    monkeypatch.delenv("CTRLORA_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli("pull", "tiny-official").code == 1
    shown = cli("show", "tiny-official")
    assert shown.code == 2 and shown.err.strip().endswith("fetch it with: ctrlora pull tiny-official")
    assert hub.log == []


@pytest.mark.parametrize("args", [
    ("pull", "tiny", "--name", "../evil"),
    ("pull", "tiny", "--name", "Upper"),
    ("pull", "tiny-cond0", "--name", "a/b"),
    ("pull", "hf://test/ctrlora/" + COND0_FILE, "--name", "x" * 65),
    ("show", "../etc"),
    ("rm", "-y", "a..b"),
    ("pull", "tiny-official", "--sd", "Bad Name"),
])
def test_bad_names_are_refused(store_env, hub, args):
    result = cli(*args)
    assert result.code == 2 and "invalid name" in result.err and "Traceback" not in result.err
    assert hub.log == [] and not (Store(store_env["CTRLORA_HOME"]).root / "manifests").exists()


def test_hub_file_with_pinned_revision(store_env, hub):
    commit = hub.repos[CTRLORA_REPO].commit
    result = cli("pull", f"hf://test/ctrlora/{COND1_FILE}", "--revision", commit, "--name", "pinned")
    assert result.code == 0, result.err
    manifest = _manifest(store_env, "pinned")
    assert manifest.source["revision"] == commit and manifest.source["commit"] == commit
    assert manifest.condition == "cond1"  # read from the official file name
    wrong = cli("pull", f"hf://test/ctrlora/{COND1_FILE}", "--revision", "v9", "--name", "other")
    assert wrong.code == 1 and "no such revision" in wrong.err
    absent = cli("pull", "hf://test/ctrlora/nothing.ckpt", "--name", "other")
    assert absent.code == 1 and "has no file 'nothing.ckpt'" in absent.err
    taken = cli("pull", f"hf://test/ctrlora/{COND0_FILE}", "--name", "pinned")
    assert taken.code == 2 and "--force" in taken.err


def test_sd15_layout_selection():
    """On SD1.5's published file list: configs and tokenizer, and the fp16 safetensors weights only."""
    from ctrlora_cli.store.sd_layout import select_sd_files

    published = """.gitattributes README.md model_index.json feature_extractor/preprocessor_config.json
        safety_checker/config.json safety_checker/model.fp16.safetensors safety_checker/model.safetensors
        scheduler/scheduler_config.json text_encoder/config.json text_encoder/model.fp16.safetensors
        text_encoder/model.safetensors text_encoder/pytorch_model.bin text_encoder/pytorch_model.fp16.bin
        tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
        unet/config.json unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.bin
        unet/diffusion_pytorch_model.fp16.safetensors unet/diffusion_pytorch_model.non_ema.bin
        unet/diffusion_pytorch_model.non_ema.safetensors unet/diffusion_pytorch_model.safetensors
        v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors v1-5-pruned.ckpt v1-5-pruned.safetensors
        vae/config.json vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin
        vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.safetensors""".split()
    chosen = select_sd_files(published, "fp16", where="sd15")
    assert chosen == {
        "model_index.json": "model_index.json",
        "scheduler/scheduler_config.json": "scheduler/scheduler_config.json",
        "text_encoder/config.json": "text_encoder/config.json",
        "text_encoder/model.safetensors": "text_encoder/model.fp16.safetensors",
        **{f"tokenizer/{f}": f"tokenizer/{f}" for f in ("merges.txt", "special_tokens_map.json",
                                                        "tokenizer_config.json", "vocab.json")},
        "unet/config.json": "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors": "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json": "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors": "vae/diffusion_pytorch_model.fp16.safetensors",
    }
    pickled_only = [p for p in published if not p.endswith(".safetensors")]
    assert select_sd_files(pickled_only, None, "x")["unet/diffusion_pytorch_model.safetensors"] == \
        "unet/diffusion_pytorch_model.bin"  # rewritten as safetensors on the way in
    with pytest.raises(Exception, match="no vae/ folder"):
        select_sd_files([p for p in published if not p.startswith("vae/")], "fp16", "x")


def test_shipped_catalog_matches_published_names():
    """The shipped patterns pick the published adapters' names (and hed never picks hedsketch)."""
    from ctrlora_cli.store import catalog
    from ctrlora_cli.store.hub import RemoteFile, Snapshot

    names = ["ctrlora-basecn/ctrlora_sd15_basecn700k.ckpt",
             *[f"ctrlora-loras/ctrlora_sd15_basecn700k_{c}_rank128.ckpt"
               for c in ("canny", "depth", "hed", "hedsketch", "seg", "normal", "openpose", "bbox", "outpainting")],
             *[f"ctrlora-loras/novel-conditions/ctrlora_sd15_basecn700k_{c}_rank128_1kimgs_1ksteps.ckpt"
               for c in ("lineart", "lineart_anime_color")],
             "ctrlora-loras/novel-conditions/ctrlora_sd15_basecn700k_palette_rank128_1000imgs_1000steps.ckpt"]
    snapshot = Snapshot("xyfJASON/ctrlora", "main", "0" * 40, {n: RemoteFile("r", "c", n, 1) for n in names})
    entries = catalog.load()
    picked = {name: [f.path for f in snapshot.match(e.pattern)] for name, e in entries.items() if e.pattern}
    assert picked["hed"] == ["ctrlora-loras/ctrlora_sd15_basecn700k_hed_rank128.ckpt"]
    assert picked["canny"] == ["ctrlora-loras/ctrlora_sd15_basecn700k_canny_rank128.ckpt"]
    assert picked["palette"] == [names[-1]]
    assert picked["lineart"] == [names[10]] and picked["lineart_anime_color"] == [names[11]]
    assert entries["base"].file == names[0] and entries["base"].sd == "sd15"
    assert all(e.kind in ("sd", "base", "adapter", "annotator") for e in entries.values())
    annotators = {name: e.files for name, e in entries.items() if e.kind == "annotator"}
    assert annotators["annotator-hed"] == ["ControlNetHED.pth"] and "config.json" in annotators["annotator-depth"]
