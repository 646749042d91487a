"""Fixtures for the store tests: a tiny hub serving the reference fixture's official-layout files
and a tiny SD in diffusers layout, a private store and HF home per test, and an in-process CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from hub_server import TinyHub

CTRLORA_REPO = "test/ctrlora"
SD_REPO = "test/tiny-sd"
BASE_FILE = "ctrlora-basecn/ctrlora_tiny_basecn700k.ckpt"
COND0_FILE = "ctrlora-loras/ctrlora_tiny_basecn700k_cond0_rank4.ckpt"
COND1_FILE = "ctrlora-loras/novel-conditions/ctrlora_tiny_basecn700k_cond1_rank4_1000imgs_1000steps.safetensors"

CATALOG = {
    "format": "ctrlora-catalog",
    "version": 1,
    "models": {
        "tiny-official-sd": {"kind": "sd", "repo": SD_REPO, "arch": "tiny", "variant": "fp16"},
        "tiny-official": {"kind": "base", "repo": CTRLORA_REPO, "file": BASE_FILE, "arch": "tiny",
                          "sd": "tiny-official-sd"},
        "tiny-cond0": {"kind": "adapter", "repo": CTRLORA_REPO, "condition": "cond0", "base": "tiny-official",
                       "pattern": ["ctrlora-loras/ctrlora_tiny_basecn700k_cond0_rank[0-9]*.ckpt"]},
        "tiny-cond1": {"kind": "adapter", "repo": CTRLORA_REPO, "condition": "cond1", "base": "tiny-official",
                       "pattern": ["ctrlora-loras/*ctrlora_tiny_basecn700k_cond1_rank[0-9]*_[0-9]*imgs_[0-9]*steps.safetensors"]},
        "tiny-gone": {"kind": "adapter", "repo": CTRLORA_REPO, "condition": "gone", "base": "tiny-official",
                      "pattern": ["ctrlora-loras/ctrlora_tiny_basecn700k_gone_rank[0-9]*.ckpt"]},
    },
}


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """A random tiny SD in diffusers layout, fp32 weights plus an fp16 variant (as SD1.5 publishes)."""
    import torch

    from engine.models.storage import save_sd
    from engine.models.presets import build_sd

    folder = tmp_path_factory.mktemp("tiny-sd")
    sd = build_sd("tiny", seed=3)
    save_sd(sd, folder)
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(sd, part).to(torch.float16)
        module.save_pretrained(folder / part, variant="fp16")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="session")
def hub_server(tiny_sd_folder, ref_tiny):
    hub = TinyHub().start()
    hub.add_repo(CTRLORA_REPO, {BASE_FILE: ref_tiny / "base.ckpt", COND0_FILE: ref_tiny / "adapter_cond0.ckpt",
                                COND1_FILE: ref_tiny / "adapter_cond1.safetensors", "README.md": b"# tiny ctrlora\n"})
    hub.add_repo(SD_REPO, {p.relative_to(tiny_sd_folder).as_posix(): p
                           for p in tiny_sd_folder.rglob("*") if p.is_file()})
    yield hub
    hub.stop()


@pytest.fixture()
def hub(hub_server):
    """The session's hub with a fresh log and no misbehaviour."""
    def calm():
        hub_server.cuts.clear()
        hub_server.corrupt.clear()
        hub_server.ignore_range.clear()
        hub_server.rate = None

    hub_server.log.clear()
    calm()
    yield hub_server
    calm()


@pytest.fixture()
def store_env(hub, tmp_path, monkeypatch) -> dict:
    """A private store, HF home and catalog pointing at the tiny hub; returns the variables."""
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(CATALOG))
    env = {"CTRLORA_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url,
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "CTRLORA_CATALOG": str(catalog),
           "CTRLORA_DOWNLOAD_RETRIES": "0"}
    for var in ("HF_HUB_OFFLINE", "CTRLORA_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return env


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(*args: str, input: str | None = None) -> Result:
    """``ctrlora ARGS`` in this process (no terminal attached), with main()'s error handling."""
    from typer.testing import CliRunner

    from ctrlora_cli.app import app
    from engine.errors import CtrloraError

    result = CliRunner().invoke(app, list(args), input=input)
    code, err = result.exit_code, result.stderr
    if isinstance(result.exception, CtrloraError):
        code, err = result.exception.exit_code, err + f"error: {result.exception}\n"
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(code, result.stdout, err)
