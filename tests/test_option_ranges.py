"""Every numeric option of every command is range-checked before any work: an out-of-range value
(NaN and infinities too) is refused with one line naming the flag and its range, exit 2, and
nothing is written (the store and the working folder are left as they were)."""

import shutil

import pytest
from PIL import Image

from conftest import run_cli
from pairs import make_pairs

CASES = {
    "gen": [("--steps", "0"), ("--steps", "1001"), ("--guidance", "nan"), ("--guidance", "-1"),
            ("--strength", "inf"), ("--seed", "-1"), ("--seed", "4294967296"), ("--width", "60"),
            ("--height", "8192"), ("--batch", "0")],
    "gen-cond": [("--cond", "tiny-canny={image}:nan"), ("--cond", "tiny-canny={image}:1:0.6-0.4")],
    "fit": [("--rank", "0"), ("--steps", "0"), ("--batch", "0"), ("--grad-accum", "0"), ("--lr", "0"),
            ("--lr", "nan"), ("--resolution", "60"), ("--drop-prompt", "1.5"), ("--val-every", "-1"),
            ("--save-every", "-1"), ("--seed", "-1"), ("--workers", "0")],
    "eval": [("--count", "0"), ("--steps", "0"), ("--guidance", "nan"), ("--seed", "-1"), ("--batch", "0")],
    "world make": [("--count", "0"), ("--size", "1024"), ("--seed", "-1")],
    "world train-sd": [("--size", "48"), ("--count", "0"), ("--vae-steps", "-1"), ("--unet-steps", "-1"),
                       ("--batch", "0"), ("--vae-batch", "0"), ("--seed", "-1")],
    "prep": [("--param", "low=-1"), ("--param", "sigma=nan")],
}
# What each command is given besides the bad value: everything else right, so that only the
# value is refused.
BASE_ARGS = {
    "gen": ["gen", "--cond", "tiny-canny={image}", "-p", "a cat"],
    "gen-cond": ["gen", "-p", "a cat"],
    "fit": ["fit", "{pairs}", "--name", "new", "--base", "tiny"],
    "eval": ["eval", "tiny-canny", "{world}"],
    "world make": ["world", "make", "{work}/made", "-c", "canny", "-n", "1"],
    "world train-sd": ["world", "train-sd", "--name", "toy"],
    "prep": ["prep", "canny", "{image}", "-o", "{work}/edges.png"],
}


@pytest.fixture(scope="module")
def places(tiny_store_template, tmp_path_factory):
    """A store (a copy of the tiny one), a working folder, and the inputs, made once."""
    root = tmp_path_factory.mktemp("ranges")
    home, work, inputs = root / "home", root / "work", root / "inputs"
    shutil.copytree(tiny_store_template, home, ignore=shutil.ignore_patterns(".lock"))
    work.mkdir()
    inputs.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(inputs / "cond.png")
    make_pairs(inputs / "pairs", n=1)
    made = run_cli("world", "make", str(inputs / "world"), "-c", "canny", "-n", "1")
    assert made.returncode == 0, made.stderr
    return {"home": home, "work": work, "image": inputs / "cond.png", "pairs": inputs / "pairs",
            "world": inputs / "world"}


def _state(*folders) -> dict:
    """Every file and folder under ``folders`` with its size and modification time."""
    return {str(p): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for folder in folders for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("command, flag, value", [(c, f, v) for c, cases in CASES.items() for f, v in cases],
                         ids=[f"{c} {f} {v}" for c, cases in CASES.items() for f, v in cases])
def test_an_out_of_range_value_is_refused_in_one_line_before_any_work(places, command, flag, value):
    fill = {k: str(v) for k, v in places.items()}
    args = [a.format(**fill) for a in BASE_ARGS[command] + [flag, value]]
    before = _state(places["home"], places["work"])
    result = run_cli(*args, env={"CTRLORA_HOME": str(places["home"])}, cwd=places["work"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}: "), result.stderr
    if value.lstrip("-").isdigit() and flag not in ("--cond", "--param"):
        assert lines[0].endswith(f"not {value}") or lines[0].endswith(f"not {float(value)}"), lines[0]
    assert "must" in lines[0]  # the allowed range is named: "must be at least 1", "must satisfy ..."
    assert _state(places["home"], places["work"]) == before


def test_ranges_are_checked_before_questions_and_the_store():
    """A bad value in an empty store is refused for itself, not for the missing models (the
    store is not even read), and train-sd refuses a taken name before it trains."""
    result = run_cli("fit", "nowhere", "--lr", "inf", env={"CTRLORA_HOME": "/nonexistent/store"})
    assert result.returncode == 2 and result.stderr.strip() == "error: --lr: must be a finite number, not inf"
    result = run_cli("eval", "none", "nowhere", "--guidance", "-0.5", env={"CTRLORA_HOME": "/nonexistent/store"})
    assert result.stderr.strip() == "error: --guidance: must be at least 0, not -0.5"


def test_world_train_sd_refuses_a_taken_name_before_any_work(places):
    before = _state(places["home"], places["work"])
    result = run_cli("world", "train-sd", "--name", "tiny-sd", env={"CTRLORA_HOME": str(places["home"])},
                     cwd=places["work"])
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: 'tiny-sd' is already in the store (sd from random tiny); use another "
                                     "--name, or --force to replace it")
    assert _state(places["home"], places["work"]) == before
