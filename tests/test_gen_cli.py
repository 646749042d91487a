"""``ctrlora gen`` end to end on the tiny store: outputs, recipes, reproduction, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from hub_fixtures import cli
from engine.demo.world import write_dataset
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
def test_gen_writes_recipes_and_reproduces(gen_store, one_thread):
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
    # What AUTOMATIC1111, Civitai and ComfyUI read: a `parameters` text, and no `prompt`/`workflow` chunk.
    chunks = Image.open(paths[1]).text
    assert "prompt" not in chunks and "workflow" not in chunks
    prompt, negative, fields = a1111_fields(chunks["parameters"])
    assert (prompt, negative) == (long_prompt, "green")
    assert fields["Steps"] == "2" and fields["Seed"] == "6" and fields["Sampler"] == "DDIM"
    assert fields["CFG scale"] == "7.5" and fields["Size"] == f"{SIZE}x{SIZE}" and fields["CtrLoRA base"] == "tiny"
    assert fields["CtrLoRA"] == f"edge:0.8:0-1, {files['blur']}:1.2:0-0.5"
    assert "Model hash" not in fields  # tiny-sd is a diffusers folder: no single checkpoint file to hash
    grid_recipe, grid_conditions = read_recipe(summary["grid"])  # the grid carries the recipe too
    assert grid_recipe["seed"] == 5 and grid_recipe["seeds"] == [5, 6] and len(grid_conditions) == 2
    assert a1111_fields(Image.open(summary["grid"]).text["parameters"])[2]["Seed"] == "5"

    # From the file alone (the conditions come from the recipe), into a file named by --out; in
    # this process, on one thread as the first run.
    again = cli("gen", "--from", str(paths[1]), "--out", str(folder / "again.png"))
    assert again.code == 0, again.err
    assert again.out.strip() == str(folder / "again.png")
    made, remade = (np.asarray(Image.open(p), dtype=np.int16) for p in (paths[1], folder / "again.png"))
    assert np.abs(made - remade).max() <= 2  # batch of 2 against 1: float rounding only
    other = np.asarray(Image.open(paths[0]), dtype=np.int16)
    assert np.abs(other - remade).mean() > 5


def a1111_fields(text: str) -> tuple[str, str, dict]:
    """(prompt, negative prompt, fields) of an AUTOMATIC1111 `parameters` text, read as its
    format says: the last line holds `Key: value` pairs joined by ", ", a value holding a comma,
    colon or newline is a JSON string; above it the prompt, then `Negative prompt: ...`."""
    lines = text.split("\n")
    last, fields, i = lines.pop(), {}, 0
    while i < len(last):
        key_end = last.index(": ", i)
        key, i = last[i:key_end].strip(), key_end + 2
        if last[i] == '"':
            value, length = json.JSONDecoder().raw_decode(last[i:])
            i += length
        else:
            end = last.find(",", i)
            value, i = last[i:] if end < 0 else last[i:end], len(last) if end < 0 else end
        fields[key] = value
        assert last[i:i + 2] in (", ", ""), last[i:]
        i += 2
    text_lines = "\n".join(lines)
    prompt, _, negative = text_lines.partition("\nNegative prompt: ")
    return prompt, negative, fields


def test_parameters_text_follows_a1111_and_old_pngs_still_read(tmp_path):
    """Quoting (commas, colons, newlines in values), a non-Latin-1 prompt, a single-file SD's
    short hash, no Negative prompt line when there is none; and a PNG of the earlier layout
    (plain `prompt`, `seed`... chunks beside `ctrlora`) reads as before."""
    import base64
    import io

    from PIL import PngImagePlugin

    from engine.generation.png_recipe import save_png

    recipe = {"prompt": "a cat, sitting: 猫", "negative_prompt": "", "seed": 9, "steps": 3, "scheduler": "euler-a",
              "guidance": 7.0, "strength": 0.5, "width": 64, "height": 48, "base": {"name": "base", "digest": "d"},
              "sd": {"name": "sd15", "digest": "e", "checkpoint_sha256": "sha256:" + "6ce0161689" + "0" * 54},
              "conditions": [{"adapter": "canny", "weight": 1.0, "start": 0.0, "end": 0.5}]}
    save_png(tmp_path / "a.png", Image.new("RGB", (8, 8)), recipe, [Image.new("RGB", (64, 48))])
    prompt, negative, fields = a1111_fields(Image.open(tmp_path / "a.png").text["parameters"])
    assert (prompt, negative) == ("a cat, sitting: 猫", "")
    assert fields == {"Steps": "3", "Sampler": "Euler a", "CFG scale": "7", "Seed": "9", "Size": "64x48",
                      "Model hash": "6ce0161689", "Model": "sd15", "CtrLoRA base": "base", "CtrLoRA": "canny:1:0-0.5",
                      "CtrLoRA strength": "0.5"}
    assert read_recipe(tmp_path / "a.png")[0]["prompt"] == recipe["prompt"]

    old = PngImagePlugin.PngInfo()  # the layout of earlier versions
    old_recipe = {"format": "ctrlora-gen", "version": 1, **recipe, "negative_prompt": "dark"}
    for key in ("prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance"):
        old.add_itxt(key, str(old_recipe[key]))
    old.add_itxt("ctrlora", json.dumps(old_recipe), zip=True)
    cond = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(cond, format="PNG")
    old.add_itxt("ctrlora.condition.0", base64.b64encode(cond.getvalue()).decode(), zip=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "old.png", pnginfo=old)
    read, images = read_recipe(tmp_path / "old.png")
    assert read["negative_prompt"] == "dark" and read["conditions"] == recipe["conditions"]
    assert images[0].getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.slow
def test_gen_from_a_plain_a1111_png(gen_store):
    """An image with only A1111's `parameters` (as A1111 writes it): its prompt, negative prompt,
    seed, steps, size, CFG and sampler are used, the rest left out with a note; the conditions
    must be given."""
    from PIL import PngImagePlugin

    folder, _ = gen_store
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red house,\nby the sea\nNegative prompt: fog\nSteps: 1, Sampler: DPM++ 2M, "
                                "Schedule type: Karras, CFG scale: 5, Seed: 77, Size: 24x16, Model hash: 6ce0161689, "
                                'Lora hashes: "detail: 0123456789ab", Version: v1.10.1')
    Image.new("RGB", (48, 40)).save(folder / "a1111.png", pnginfo=info)
    from ctrlora_cli.gen_request import read_conditions
    from engine.errors import UsageError

    with pytest.raises(UsageError, match="no CtrLoRA conditions; give them with --cond"):
        read_conditions(folder / "a1111.png", [], [])

    made = run_cli("gen", "--from", str(folder / "a1111.png"), "--cond", f"edge={folder / 'a.png'}",
                   "--out", str(folder / "remade.png"), env=ONE_THREAD)
    assert made.returncode == 0, made.stderr
    [note] = made.stderr.strip().splitlines()
    assert note.startswith(f"note: {folder / 'a1111.png'} holds AUTOMATIC1111 parameters: using its prompt, "
                           "negative prompt, seed, steps, size, CFG scale, sampler; left out Schedule type: Karras; "
                           "Model hash: 6ce0161689; Lora hashes: detail: 0123456789ab; Version: v1.10.1"), note
    recipe, _ = read_recipe(folder / "remade.png")
    assert (recipe["prompt"], recipe["negative_prompt"]) == ("a red house,\nby the sea", "fog")
    assert (recipe["seed"], recipe["steps"], recipe["guidance"], recipe["scheduler"]) == (77, 1, 5.0, "dpm++")
    assert (recipe["width"], recipe["height"]) == (24, 16) and Image.open(folder / "remade.png").size == (24, 16)


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
    (["--from", "{d}/a.png"], "holds no ctrlora recipe nor AUTOMATIC1111 parameters"),
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


# -- nothing a user makes is replaced ----------------------------------------------------------

def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
def test_outputs_never_replace_a_file_unless_forced(gen_store, one_thread):
    """The first image from a real process, the ones after it in this process (no start-up each)."""
    folder, _ = gen_store
    out = folder / "out"
    args = ["gen", "--cond", f"edge={folder / 'a.png'}", "-p", "a cat", "--steps", "1", "--seed", "7"]
    first = run_cli(*args, "--out", str(out), "--grid", env=ONE_THREAD)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [str(out / "ctrlora-7.png"), str(out / "ctrlora-7-grid.png")]
    made = _files(out)
    # The same seed again: the next free number, for the image and the grid alike.
    again = cli(*args, "--out", str(out), "--grid")
    assert again.code == 0, again.err
    assert again.out.split() == [str(out / "ctrlora-7-1.png"), str(out / "ctrlora-7-1-grid.png")]
    assert {k: v for k, v in _files(out).items() if k in made} == made  # the first ones untouched

    # A file named by --out (or its grid) is refused before any model loads, and kept.
    mine = folder / "mine.png"
    mine.write_bytes(b"my own picture")
    for extra in ([], ["--grid"]):
        target = folder / "mine.png" if not extra else folder / "x.png"
        if extra:
            (folder / "x-grid.png").write_bytes(b"my own grid")
        refused = run_cli(*args, "--out", str(target), *extra)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        taken = mine if not extra else folder / "x-grid.png"
        assert refused.stderr.strip() == f"error: --out: {taken} already exists; pass --force to replace it, or pick " \
                                         "another name"
    assert mine.read_bytes() == b"my own picture" and not (folder / "x.png").exists()
    forced = cli(*args, "--out", str(mine), "--force")
    assert forced.code == 0, forced.err
    assert read_recipe(mine)[0]["seed"] == 7  # replaced, as asked


def test_a_file_made_while_generating_is_not_replaced(tmp_path):
    """The race: a name free when the outputs were decided is taken before the image is written.
    The file there is kept; a default name moves on to the next number, a named one too, with a
    warning; with --force it is replaced."""
    from ctrlora_cli.gen_outputs import output_paths, write_outputs
    from engine.files import atomic_path
    from engine.generation.pipeline import GenerationResult

    images = [Image.new("RGB", (8, 8), (k * 80, 0, 0)) for k in range(2)]
    result = GenerationResult(images=images, latents=torch.zeros(2), seeds=[3, 4], condition_seed=3, width=8,
                              height=8)
    warnings = []
    decided = output_paths(tmp_path, [3, 4], grid=True)
    (tmp_path / "ctrlora-3.png").write_bytes(b"theirs")  # after the decision, before the write
    written, grid = write_outputs(decided, result, {"prompt": "x"}, [], warnings.append)
    assert written == [str(tmp_path / "ctrlora-3-1.png"), str(tmp_path / "ctrlora-4.png")] and not warnings
    assert grid == str(tmp_path / "ctrlora-3-grid.png")
    assert (tmp_path / "ctrlora-3.png").read_bytes() == b"theirs"

    named = output_paths(tmp_path / "named.png", [3])
    (tmp_path / "named.png").write_bytes(b"theirs")
    written, _ = write_outputs(named, result, {"prompt": "x"}, [], warnings.append)
    assert written == [str(tmp_path / "named-1.png")] and (tmp_path / "named.png").read_bytes() == b"theirs"
    assert warnings == [f"{tmp_path / 'named.png'} appeared while generating; wrote {tmp_path / 'named-1.png'} instead"]
    forced = output_paths(tmp_path / "named.png", [3], force=True)
    assert write_outputs(forced, result, {"prompt": "x"}, [], warnings.append)[0] == [str(tmp_path / "named.png")]
    assert read_recipe(tmp_path / "named.png")[0]["seed"] == 3

    # engine.files: replace=False keeps a file another process made while this one wrote.
    with pytest.raises(FileExistsError):
        with atomic_path(tmp_path / "late.bin", replace=False) as tmp:
            tmp.write_bytes(b"ours")
            (tmp_path / "late.bin").write_bytes(b"theirs")
    assert (tmp_path / "late.bin").read_bytes() == b"theirs"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


# -- adapters on their own base ----------------------------------------------------------------

@pytest.fixture()
def two_bases(gen_store, tiny_store):
    """The gen store plus 'other': a base of the same architecture (tiny) with other weights."""
    base = load_base(tiny_store.folder("tiny") / "controlnet")
    with torch.no_grad():
        for param in base.parameters():
            param.mul_(1.01)
    from engine.models.storage import save_base

    folder = gen_store[0] / "other-base"
    save_base(base, folder / "controlnet")
    tiny_store.add_folder("other", "base", folder, arch="tiny", sd="tiny-sd")
    return gen_store[0]


def _on_a_terminal(args, answer: str, env: dict):
    """Run ``ctrlora ARGS`` with a terminal as stdin and stdout, answering ``answer``."""
    import os
    import pty
    import subprocess
    import sys

    from conftest import REPO

    controller, terminal = pty.openpty()
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    proc = subprocess.Popen([sys.executable, "-m", "ctrlora_cli", *args], stdin=terminal, stdout=terminal,
                            stderr=subprocess.PIPE, env=full_env, text=True)
    os.close(terminal)
    screen = b""
    while b"Go on?" not in screen:
        chunk = os.read(controller, 1024)
        assert chunk, screen
        screen += chunk
    os.write(controller, answer.encode() + b"\n")
    _, stderr = proc.communicate(timeout=120)
    os.close(controller)
    return proc.returncode, stderr


@pytest.mark.slow
def test_an_adapter_runs_on_its_own_base_and_warns_on_another(two_bases, tiny_store, tmp_path, one_thread):
    """gen in a real process (nothing on stderr) and at a real terminal; the other runs in this
    process (no start-up each)."""
    folder = two_bases
    cond = ["--cond", f"tiny-canny={folder / 'a.png'}", "-p", "a cat", "--steps", "1", "--seed", "1"]
    # Two bases in the store, no --base: the adapter's own (it used to refuse to guess).
    own = run_cli("gen", *cond, "--out", str(folder / "own.png"), env=ONE_THREAD)
    assert own.returncode == 0 and own.stderr == "", own.stderr
    assert read_recipe(folder / "own.png")[0]["base"]["name"] == "tiny"

    # Another base of the same architecture: it runs, with a warning naming both.
    warning = ("warning: adapter 'tiny-canny' was made for base 'tiny', not 'other' (same architecture, tiny): it "
               "runs, but may follow its condition less well; pass --base tiny to use its own")
    other = cli("gen", *cond, "--base", "other", "--out", str(folder / "other.png"))
    assert other.code == 0 and other.err.strip() == warning, other.err
    assert read_recipe(folder / "other.png")[0]["base"]["name"] == "other"

    # At a terminal it asks first; No stops before anything is written.
    code, stderr = _on_a_terminal(["gen", *cond, "--base", "other", "--out", str(folder / "asked.png")], "n",
                                  {"CTRLORA_HOME": str(tiny_store.root)})
    assert code == 1 and warning in " ".join(stderr.split()) and not (folder / "asked.png").exists()

    # eval alike: the adapter's base by default, a warning on another.
    data = tmp_path / "world"
    write_dataset(data, "canny", 1, size=64)
    scored = cli("eval", "tiny-canny", str(data), "--steps", "1", "--json")
    assert scored.code == 0 and json.loads(scored.out)["base"] == "tiny" and scored.err == ""
    elsewhere = cli("eval", "tiny-canny", str(data), "--steps", "1", "--json", "--base", "other", "-y")
    assert elsewhere.code == 0 and json.loads(elsewhere.out)["base"] == "other"
    assert elsewhere.err.strip() == warning
