"""Bad weights files are refused with one line that names the problem."""

import pytest
import torch

from engine.formats.official import convert_official_adapter, convert_official_base
from engine.formats.tensors import load_tensor_file
from engine.models.controlnet import BaseControlNetModel
from engine.errors import CheckpointError
from engine.models.presets import unet_config

TINY = BaseControlNetModel.config_from_unet(unet_config("tiny"))


@pytest.fixture(scope="module")
def official_adapter(ref_tiny):
    return load_tensor_file(ref_tiny / "adapter_cond0.ckpt")


def _one_line(exc):
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_unknown_key(official_adapter):
    state = dict(official_adapter)
    state["control_model.input_blocks.1.1.mystery.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as exc:
        convert_official_adapter(state, TINY)
    assert "1 unknown keys" in _one_line(exc) and "mystery" in str(exc.value)


def test_missing_keys_count_and_first(official_adapter):
    state = {k: v for k, v in official_adapter.items() if "zero_convs" not in k}
    with pytest.raises(CheckpointError) as exc:
        convert_official_adapter(state, TINY)
    assert "24 missing keys (first: controlnet_down_blocks.0.weight" in _one_line(exc)


def test_misshaped_key(official_adapter):
    state = dict(official_adapter)
    state["control_model.zero_convs.0.0.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as exc:
        convert_official_adapter(state, TINY)
    assert "1 mis-shaped keys (first: controlnet_down_blocks.0.bias (7,) != (32,))" in _one_line(exc)


def test_adapter_of_another_architecture(official_adapter):
    with pytest.raises(CheckpointError) as exc:
        convert_official_adapter(official_adapter, BaseControlNetModel.config_from_unet(unet_config("sd15")))
    assert "mis-shaped" in _one_line(exc)


def test_base_without_prefix_is_refused(ref_tiny):
    state = {k.replace("control_model.", ""): v for k, v in load_tensor_file(ref_tiny / "base.ckpt").items()}
    with pytest.raises(CheckpointError) as exc:
        convert_official_base(state, TINY)
    assert "lack the 'control_model.' prefix" in _one_line(exc)


def test_truncated_ckpt(ref_tiny, tmp_path):
    data = (ref_tiny / "adapter_cond0.ckpt").read_bytes()
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_tensor_file(bad)
    assert "truncated or damaged" in _one_line(exc)


def test_truncated_safetensors(ref_tiny, tmp_path):
    data = (ref_tiny / "adapter_cond1.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_tensor_file(bad)
    assert "truncated or damaged" in _one_line(exc)


class Payload:
    """Anything but plain tensors: a pickle that would run code when loaded unsafely."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    bad = tmp_path / "evil.ckpt"
    torch.save({"control_model.x": Payload()}, bad)
    with pytest.raises(CheckpointError) as exc:
        load_tensor_file(bad)
    assert "more than plain tensors" in _one_line(exc)
    assert "this must never run" not in capsys.readouterr().out


def test_non_dict_and_non_tensor_values(tmp_path):
    as_list = tmp_path / "list.ckpt"
    torch.save([torch.zeros(1)], as_list)
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        load_tensor_file(as_list)
    mixed = tmp_path / "mixed.ckpt"
    torch.save({"a": torch.zeros(1), "step": 3}, mixed)
    with pytest.raises(CheckpointError, match="1 entries are not tensors"):
        load_tensor_file(mixed)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_tensor_file(tmp_path / "nope.safetensors")
