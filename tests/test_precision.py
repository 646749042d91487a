"""``--precision auto`` on the CPU: bf16 only where the CPU computes it natively (each answer
forced), the face's CTRLORA_CPU_BF16 override, ``gen --from`` in the recipe's precision, and bf16
results close to fp32 on the tiny preset (tolerances stated below)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from hub_fixtures import cli
from ctrlora_cli import envconfig
from engine import runtime
from engine.errors import SettingError, UsageError
from engine.generation.png_recipe import read_recipe
from engine.training import launcher
from engine.training.settings import TrainBaseSettings
from test_fit import _trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture()
def restore_choice():
    before = runtime._cpu_bf16
    yield
    runtime.set_cpu_bf16(before)


@pytest.mark.parametrize("caps, native", [
    ({"avx512_bf16": True, "amx_bf16": False}, True),
    ({"avx512_bf16": False, "amx_bf16": True}, True),
    ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True, "avx2": True}, False),  # emulated only
    ({}, False),
])
def test_native_bf16_is_avx512_bf16_or_amx(caps, native):
    assert runtime.native_cpu_bf16(caps) is native


def test_auto_follows_the_cpu_unless_overridden(restore_choice, monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(runtime, "native_cpu_bf16", lambda caps=None, answer=native: answer)
        runtime.set_cpu_bf16(None)  # the CPU's own answer
        want = "bf16" if native else "fp32"
        assert runtime.resolve_precision("auto", CPU) == want
        assert runtime.resolve_precision(None, CPU, training=True, allowed=("fp32", "bf16")) == want
        for forced in (True, False):  # the override wins either way
            runtime.set_cpu_bf16(forced)
            assert runtime.resolve_precision("auto", CPU) == ("bf16" if forced else "fp32")
        # GPUs are not the CPU's business; a named precision is kept
        assert runtime.resolve_precision("auto", CUDA) == "fp16"
        assert runtime.resolve_precision("auto", CUDA, training=True) == "bf16"
        assert runtime.resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(SettingError, match="fp16 needs a GPU"):
        runtime.resolve_precision("fp16", CPU)


def test_narrow_models_stay_in_fp32_on_a_bf16_cpu(restore_choice, monkeypatch):
    """Per shape: a UNet narrower than CPU_BF16_MIN_WIDTH (the demo's 32 channels) is slower in bf16
    (bench/precision.py --crossover), so auto keeps it in fp32; the override still wins."""
    from diffusers import UNet2DConditionModel

    from engine.models.presets import unet_config
    from engine.models.storage import unet_width
    from engine.training.settings import FitConfig

    demo_sd = Path(__file__).resolve().parents[1] / "ctrlora_cli" / "data" / "demo" / "sd"
    assert unet_width(demo_sd) == 32
    assert unet_width(UNet2DConditionModel(**unet_config("tiny"))) == 32
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda caps=None: True)
    runtime.set_cpu_bf16(None)
    assert runtime.CPU_BF16_MIN_WIDTH == 64
    for width, want in ((32, "fp32"), (63, "fp32"), (64, "bf16"), (320, "bf16"), (None, "bf16")):
        assert runtime.resolve_precision("auto", CPU, width=width) == want
        assert runtime.device_and_dtype("cpu", "auto", width=width)[2] == want
        assert FitConfig(device="cpu").resolved(width=width).precision == want
    assert runtime.resolve_precision("bf16", CPU, width=32) == "bf16"  # asked for by name
    assert runtime.resolve_precision("auto", CUDA, width=32) == "fp16"  # GPUs: not the CPU's rule
    runtime.set_cpu_bf16(True)
    assert runtime.resolve_precision("auto", CPU, width=32) == "bf16"
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda caps=None: False)
    runtime.set_cpu_bf16(None)
    assert runtime.resolve_precision("auto", CPU, width=320) == "fp32"


def test_the_override_variable(monkeypatch, restore_choice):
    for value, want in (("1", True), ("yes", True), ("0", False), ("off", False), ("auto", None), ("", None)):
        monkeypatch.setenv("CTRLORA_CPU_BF16", value)
        assert envconfig.cpu_bf16() is want
        assert envconfig.apply_cpu_bf16() is want and runtime._cpu_bf16 is want
    monkeypatch.setenv("CTRLORA_CPU_BF16", "maybe")
    with pytest.raises(UsageError, match="CTRLORA_CPU_BF16 must be 1, 0 or auto"):
        envconfig.cpu_bf16()


def test_train_base_workers_get_the_override():
    settings = TrainBaseSettings(sd="/sd", out="/out", data=("/d",), cpu_bf16="1")
    args = launcher.worker_args(settings)
    assert args[args.index("--cpu-bf16") + 1] == "1"
    assert launcher.read_worker_args(args).cpu_bf16 == "1"
    assert "--cpu-bf16" not in launcher.worker_args(TrainBaseSettings(sd="/sd", out="/out", data=("/d",)))


def test_replayed_precision():
    assert runtime.replayed_precision("bf16", CPU) == "bf16"
    assert runtime.replayed_precision("fp32", CUDA) == "fp32"
    assert runtime.replayed_precision("fp16", CPU) == "auto"  # made on a GPU, remade on a CPU
    assert runtime.replayed_precision(None, CPU) == "auto"  # an older recipe


def test_gen_auto_and_from_use_the_right_precision(tiny_store, tmp_path, monkeypatch, one_thread):
    """Through the face: auto is bf16 with CTRLORA_CPU_BF16=1 (a real process); ``--from`` makes an
    image again in the precision its recipe records, although auto would pick fp32 now
    (CTRLORA_CPU_BF16=0; the command in this process, on one thread as the first)."""
    import numpy as np
    from PIL import Image

    from engine.formats.adapter_file import save_adapter_file
    from engine.models import adapters
    from engine.models.storage import load_base

    base = load_base(tiny_store.folder("tiny") / "controlnet")
    adapters.add_adapter(base, "edge", rank=4)
    path = save_adapter_file(tmp_path / "edge.safetensors", adapters.adapter_state_dict(base, "edge"), rank=4,
                             alpha=4, base_arch="tiny", condition="edge")
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    one = {"OMP_NUM_THREADS": "1", "CTRLORA_HOME": str(tiny_store.root)}

    common = ("--steps", "2", "--seed", "1", "-p", "x", "--json")
    made = run_cli("gen", "--cond", f"{path}={image}", "--out", str(tmp_path / "bf16.png"), *common,
                   env={**one, "CTRLORA_CPU_BF16": "1"})
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["precision"] == "bf16"
    assert read_recipe(tmp_path / "bf16.png")[0]["precision"] == "bf16"
    monkeypatch.setenv("CTRLORA_CPU_BF16", "0")
    again = cli("gen", "--from", str(tmp_path / "bf16.png"), "--out", str(tmp_path / "again.png"), *common)
    assert again.code == 0, again.err
    assert json.loads(again.out)["precision"] == "bf16"  # the recipe's, although auto would be fp32 now
    same = [np.asarray(Image.open(tmp_path / p)) for p in ("bf16.png", "again.png")]
    assert np.array_equal(*same)


# bf16 against fp32 on the tiny preset (bench/precision.py prints the same at the SD1.5 shape).
# bf16 keeps 8 bits of mantissa (relative rounding 2**-9 = 0.2%); through a dozen layers the
# residuals drift by a few percent, the latents of 3 DDIM steps as well, the images by a few levels.
RESIDUAL_TOL, LATENT_TOL, PSNR_MIN = 0.05, 0.05, 35.0


def test_bf16_generation_agrees_with_fp32_on_the_tiny_preset(one_thread):
    from bench.precision import compare

    result = compare("tiny", size=64, steps=3, conditions=2, rank=4)
    assert 0 < result["residual_rel_error_max"] < RESIDUAL_TOL, result
    assert 0 < result["latent_rel_error"] < LATENT_TOL, result
    assert PSNR_MIN < result["image_psnr_db"] < float("inf"), result


def test_a_bf16_fit_step_agrees_with_fp32(one_thread):
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        trainer = _trainer(batch=2, precision=precision)
        losses[precision] = [trainer.train_step() for _ in range(2)]
    # The same noise and timesteps; bf16 autocast changes the loss by rounding only (here < 2%).
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert a != b and abs(a - b) / a < 0.02, losses
