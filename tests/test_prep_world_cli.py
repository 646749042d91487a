"""``ctrlora prep`` and ``ctrlora world`` end to end, in real subprocesses."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import run_cli
from engine.demo.extractors import SPECS, extract
from engine.demo.world import BASE_CONDITIONS, CONDITIONS, HELD_OUT_CONDITIONS, make_scene


@pytest.fixture()
def picture(tmp_path):
    path = tmp_path / "photo.png"
    image = Image.new("RGB", (96, 64), (200, 200, 40))
    ImageDraw.Draw(image).ellipse((20, 10, 60, 50), fill=(30, 60, 200))
    image.save(path)
    return path


def test_prep_writes_the_condition(picture, tmp_path):
    out = tmp_path / "edges" / "canny.png"
    result = run_cli("prep", "canny", str(picture), "-o", str(out), "-p", "low=50", "-p", "high=120")
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    expected = extract("canny", Image.open(picture), low=50, high=120)
    assert (np.asarray(Image.open(out)) == np.asarray(expected)).all()
    assert [p.name for p in out.parent.iterdir()] == ["canny.png"]  # no temp file left


def test_prep_default_output_and_json(picture, tmp_path):
    result = run_cli("prep", "pixelate", str(picture), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "mosaic" and report["output"] == "photo-mosaic.png" and report["size"] == [96, 64]
    assert (tmp_path / "photo-mosaic.png").is_file()


def test_prep_list():
    text = run_cli("prep", "--list")
    assert text.returncode == 0
    for kind in SPECS:
        assert kind in text.stdout
    assert "low=100" in text.stdout and "annotator" in text.stdout
    listed = json.loads(run_cli("prep", "--list", "--json").stdout)
    assert [k["kind"] for k in listed["kinds"]] == list(SPECS)
    assert {a["kind"] for a in listed["annotators"]} >= {"depth", "normal", "seg", "hed", "openpose", "lineart"}


@pytest.mark.parametrize("args, message", [
    (["canny", "{missing}"], "image not found"),
    (["canny", "{garbage}"], "cannot read"),
    (["depth", "{picture}"], "needs an annotator network's weights ('annotator-depth'), not in the store; fetch "
                             "them once with: ctrlora pull annotator-depth"),
    (["canny", "{picture}", "-p", "low=abc"], "canny: low must be a number"),
    (["canny", "{picture}", "-p", "low"], "--param: expects KEY=VALUE"),
    (["canny", "{picture}", "-p", "low=-1"], "--param: canny: low must be at least 0, not -1.0"),
    (["canny", "{picture}", "-o", "{tmp}/out.txt"], "cannot tell the image format"),
    ([], "give KIND and IMAGE"),
])
def test_prep_errors_are_one_line_exit_2_and_write_nothing(args, message, picture, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    fill = {"missing": str(tmp_path / "nope.png"), "garbage": str(garbage), "picture": str(picture),
            "tmp": str(out)}
    args = [a.format(**fill) for a in args]
    if "-o" not in args and args:
        args += ["-o", str(out / "result.png")]
    result = run_cli("prep", *args, cwd=out)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert list(out.iterdir()) == []


def test_world_make_and_conditions(tmp_path):
    folder = tmp_path / "mosaic"
    result = run_cli("world", "make", str(folder), "--condition", "mosaic", "--count", "4", "--size", "128",
                     "--seed", "9")
    assert result.returncode == 0, result.stderr
    assert "wrote 4 mosaic pairs" in result.stdout and "held-out" in result.stdout
    records = [json.loads(line) for line in (folder / "prompt.json").read_text().splitlines()]
    assert len(records) == 4
    for i, record in enumerate(records):
        assert record["prompt"] == make_scene(i, 9, 128).caption
        assert Image.open(folder / record["source"]).size == (128, 128)
        assert (folder / record["target"]).is_file()

    again = run_cli("world", "make", str(folder), "-c", "mosaic", "-n", "2")
    assert again.returncode == 2 and "--force" in again.stderr and len(records) == 4

    listed = json.loads(run_cli("world", "conditions", "--json").stdout)
    assert [c["condition"] for c in listed] == list(CONDITIONS)
    assert {c["condition"] for c in listed if c["set"] == "base"} == set(BASE_CONDITIONS)
    assert {c["condition"] for c in listed if c["set"] == "held-out"} == set(HELD_OUT_CONDITIONS)


@pytest.mark.parametrize("args, message", [
    (["--condition", "openpose", "--count", "3"], "unknown world condition 'openpose'"),
    (["--condition", "canny"], "give --count"),
])
def test_world_make_errors(args, message, tmp_path):
    result = run_cli("world", "make", str(tmp_path / "d"), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "d").exists()
