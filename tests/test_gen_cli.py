"""``ctrlora gen`` end to end on the tiny store: outputs, recipes, reproduction, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from engine.models import adapters
from engine.formats.adapter_file import save_adapter_file
from engine.generation.png_recipe import read_recipe
from engine.models.storage import load_base

SIZE = 64


@pytest.fixture(scope="module")
def adapter_files(tiny_store_template, tmp_path_factory):
    """Adapter files for the tiny base: 'edge' and 'blur' (random, non-zero), 'alien' (made for
    another base); and condition images (one a damaged file)."""
    from ctrlora_cli.store.store import Store

    folder = tmp_path_factory.mktemp("gen-inputs")
    base = load_base(Store(tiny_store_template).folder("tiny") / "controlnet")
    files = {}
    for i, name in enumerate(("edge", "blur")):
        adapters.add_adapter(base, name, rank=4)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in adapters.adapter_parameters(base, name).values():
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
        files[name] = save_adapter_file(folder / f"{name}.safetensors", adapters.adapter_state_dict(base, name),
                                        rank=4, alpha=4, base_arch="tiny", condition=name)
    files["alien"] = save_adapter_file(folder / "alien.safetensors", adapters.adapter_state_dict(base, "edge"),
                                       rank=4, alpha=4, base_arch="sd15", condition="edge")
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (SIZE + 5, SIZE)), ("b.png", (SIZE * 2, SIZE * 2))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_text("not an image")
    return folder, files


@pytest.fixture()
def gen_store(tiny_store, adapter_files, tmp_path):
    """The tiny store with those adapters stored; (a fresh folder holding the inputs, adapter files)."""
    import shutil

    inputs, files = adapter_files
    for name, path in files.items():
        arch = "sd15" if name == "alien" else "tiny"
        tiny_store.add(name, "adapter", {"adapter.safetensors": path}, arch=arch, condition="edge", rank=4)
    for image in ("a.png", "b.png", "broken.png"):
        shutil.copy(inputs / image, tmp_path / image)
    return tmp_path, files


# Tiny models: one thread is faster, and much faster on a loaded machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.slow
def test_gen_writes_recipes_and_reproduces(gen_store):
    folder, files = gen_store
    long_prompt = " ".join(["a red circle above a blue square"] * 12)
    result = run_cli("gen", "--cond", f"edge={folder / 'a.png'}:0.8", "--cond", f"{files['blur']}={folder / 'b.png'}:1.2:0-0.5",
                     "--prep", "edge=grayscale", "-p", long_prompt, "--negative", "green", "--steps", "2",
                     "--seed", "5", "--batch", "2", "--out", str(folder / "out"), "--grid", "--json", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "cut off" in result.stderr  # the long prompt is truncated, with a warning
    summary = json.loads(result.stdout)
    assert summary["seeds"] == [5, 6] and (summary["width"], summary["height"]) == (SIZE, SIZE)
    paths = [folder / "out" / "ctrlora-5.png", folder / "out" / "ctrlora-6.png"]
    assert summary["images"] == [str(p) for p in paths]
    grid = Image.open(summary["grid"])
    assert grid.size == (4 * SIZE, SIZE)  # two conditions, two results

    recipe, cond_images = read_recipe(paths[1])
    assert recipe["seed"] == 6 and recipe["condition_seed"] == 5 and recipe["steps"] == 2
    assert recipe["prompt"] == long_prompt and recipe["negative_prompt"] == "green"
    assert recipe["scheduler"] == "ddim" and recipe["guidance"] == 7.5 and recipe["base"]["name"] == "tiny"
    edge, blur = recipe["conditions"]
    assert (edge["adapter"], edge["weight"], edge["start"], edge["end"], edge["prep"]) == ("edge", 0.8, 0, 1, "grayscale")
    assert (blur["weight"], blur["start"], blur["end"]) == (1.2, 0, 0.5)
    assert edge["digest"].startswith("sha256:") and edge["digest"] != blur["digest"]
    assert recipe["base"]["digest"].startswith("sha256:")
    gray = np.asarray(cond_images[0])
    assert cond_images[0].size == (SIZE, SIZE) and (gray[..., 0] == gray[..., 1]).all()  # prepped, then stored

    # From the file alone (the conditions come from the recipe), into a file named by --out.
    again = run_cli("gen", "--from", str(paths[1]), "--out", str(folder / "again.png"), env=ONE_THREAD)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(folder / "again.png")
    made, remade = (np.asarray(Image.open(p), dtype=np.int16) for p in (paths[1], folder / "again.png"))
    assert np.abs(made - remade).max() <= 2  # batch of 2 against 1: float rounding only
    other = np.asarray(Image.open(paths[0]), dtype=np.int16)
    assert np.abs(other - remade).mean() > 5


BAD = [
    (["--cond", "edge={d}/missing.png"], "not found"),
    (["--cond", "edge={d}/broken.png"], "not a readable image"),
    (["--cond", "nosuch={d}/a.png"], "unknown adapter 'nosuch'"),
    (["--cond", "alien={d}/a.png"], "made for a sd15 base"),
    (["--cond", "edge"], "expected NAME=IMAGE"),
    (["--cond", "edge={d}/a.png:heavy"], "--cond: 'edge={d}/a.png:heavy': weight 'heavy' is not a number"),
    (["--cond", "edge={d}/a.png:1:0.5-1.5"], "0 <= START < END <= 1"),
    (["--cond", "edge={d}/a.png:1:late"], "must be START-END"),
    (["--cond", "edge={d}/a.png", "--width", "60"], "--width: must be a multiple of 8 from 8 to 4096, not 60"),
    (["--cond", "edge={d}/a.png", "--out", "{d}/out/x.jpg"], "give a .png file or a folder"),
    (["--cond", "edge={d}/a.png", "--scheduler", "plms"], "--scheduler: must be one of ddim, unipc"),
    (["--cond", "edge={d}/a.png", "--prep", "depth"], "needs an annotator"),
    (["--from", "{d}/a.png"], "holds no ctrlora recipe"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(gen_store, args, message):
    folder, _ = gen_store
    args = [a.format(d=folder) for a in args]
    if "--out" not in args:
        args += ["--out", str(folder / "out")]
    result = run_cli("gen", *args, "-p", "a cat", "--steps", "1")
    assert result.returncode == 2, result.stderr
    assert message.format(d=folder) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (folder / "out").exists() or not any((folder / "out").iterdir())


@pytest.mark.parametrize("command", [["gen", "--cond", "edge=a.png", "-p", "a cat"], ["eval", "none", "pairs"],
                                     ["fit", "pairs", "--name", "x"], ["train-base", "pairs", "--out", "x", "--init", "y"]])
def test_an_unknown_precision_is_refused_alike_before_any_work(command, tmp_path):
    """One --precision for every command (once a KeyError in eval): refused as a usage error
    (exit 2) naming the choices, before the store is read (this store is empty)."""
    result = run_cli(*command, "--precision", "fp8", env={"CTRLORA_HOME": str(tmp_path / "empty"), "COLUMNS": "200"},
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "store" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "Invalid value for '--precision'" in line]
    assert "'fp8' is not one of 'auto', 'fp32', 'fp16', 'bf16'" in line
