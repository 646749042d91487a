"""``CtrLoraPipeline.from_store`` / ``from_pretrained`` / ``generate``: the Python API in three lines."""

import os

import pytest
import torch
from PIL import Image

from ctrlora_cli.store.paths import CtrLoraPipeline, store_paths
from engine.errors import UsageError
from engine.models.adapters import adapter_names


def _random_adapter(store, name):
    """An adapter whose every value is random (the tiny one equals its base: zero convs are 0)."""
    from ctrlora_cli.store.pull import pull
    from engine.formats.adapter_file import save_adapter_file
    from engine.formats.tensors import load_tensor_file

    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.1
             for k, v in load_tensor_file(store.file("tiny-canny", "adapter.safetensors")).items()}
    path = store.root.parent / f"{name}.safetensors"
    save_adapter_file(path, state, rank=4, alpha=4, base_arch="tiny", condition=name)
    pull(store, str(path), name=name, base="tiny")


def test_three_lines_from_the_store_and_the_same_from_a_folder(tiny_store, tmp_path):
    Image.new("RGB", (37, 35), (200, 30, 60)).save(tmp_path / "edges.png")  # not a multiple of 8: cropped to 32x32
    _random_adapter(tiny_store, "mosaic")

    pipe = CtrLoraPipeline.from_store("mosaic", resolver=store_paths, device="cpu")
    result = pipe.generate("a red square", {"mosaic": tmp_path / "edges.png"}, seed=3, steps=1)
    assert result.images[0].size == (32, 32) and (result.width, result.height) == (32, 32)

    # The same model laid out as a pretrained folder (links to the store's views), other names.
    folder = tmp_path / "pretrained"
    (folder / "adapters").mkdir(parents=True)
    os.symlink(tiny_store.folder("tiny-sd"), folder / "sd")
    os.symlink(tiny_store.folder("tiny") / "controlnet", folder / "controlnet")
    os.symlink(tiny_store.file("mosaic", "adapter.safetensors"), folder / "adapters" / "edges.safetensors")
    again = CtrLoraPipeline.from_pretrained(folder, device="cpu")
    assert adapter_names(again.controlnet) == ["edges"]
    same = again.generate("a red square", {"edges": (Image.open(tmp_path / "edges.png"), 1.0)}, seed=3, steps=1)
    assert torch.equal(same.latents, result.latents)
    other = again.generate("a red square", {"edges": (tmp_path / "edges.png", 0.0)}, seed=3, steps=1)
    assert not torch.equal(other.latents, result.latents)  # the condition's weight reaches the images


def test_bad_paths_are_one_clear_error(tiny_store, tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        CtrLoraPipeline.from_pretrained(tmp_path / "nothing")
    with pytest.raises(UsageError, match="not in the store"):
        CtrLoraPipeline.from_store("nosuch", resolver=store_paths)
    paths = store_paths(["tiny-canny"])
    assert paths.adapters == {"tiny-canny": tiny_store.file("tiny-canny", "adapter.safetensors")}
    assert (paths.base / "config.json").is_file() and (paths.sd / "unet").is_dir()
