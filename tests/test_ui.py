"""``ctrlora ui`` on the tiny store: the ``/generate`` API through gradio_client, and the page in a
real headless browser (Debian's chromium driven by Playwright). One app, started once as a real
subprocess on a free port, serves both."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli
from hub_fixtures import cli

CHROMIUM = Path("/usr/bin/chromium")
IN_CI = os.environ.get("CI") == "true"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def needs(module: str) -> None:
    """Skip without ``module`` outside CI, where it is optional; in CI it must be there."""
    try:
        __import__(module)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{module} is not installed; .ci/run installs it")
        pytest.skip(f"{module} is not installed (pip install 'ctrlora[ui]' playwright)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_store_template, tmp_path_factory):
    """(url, the folder it writes to, its CTRLORA_HOME, a condition image): the app on a copy of the
    tiny store (tiny, tiny-sd, tiny-canny)."""
    needs("gradio")
    root = tmp_path_factory.mktemp("ui")
    home = root / "home"
    shutil.copytree(tiny_store_template, home, ignore=shutil.ignore_patterns("views", ".lock"))
    cond = root / "cond.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(cond)
    port = _free_port()
    env = dict(os.environ, CTRLORA_HOME=str(home), PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False",
               **ONE_THREAD)
    proc = subprocess.Popen([sys.executable, "-m", "ctrlora_cli", "ui", "--port", str(port), "--out",
                             str(root / "out")], env=env, cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"the app did not start: {proc.stdout.read()}")
                time.sleep(0.5)
        yield url, root / "out", home, cond
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _recipe(path):
    from engine.generation.png_recipe import read_recipe

    return read_recipe(path)[0]


def test_generate_api_writes_pngs_that_gen_from_makes_again(app, tmp_path, monkeypatch, one_thread):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, out, home, cond = app
    client = Client(url, verbose=False)
    args = dict(base="tiny", sd="", conditions=[{"adapter": "tiny-canny", "weight": 0.8, "start": 0, "end": 0.5,
                                                 "prep": "grayscale"}],
                images=[handle_file(str(cond))], prompt="a red cat", negative="blurry", steps=2, guidance=5.0,
                scheduler="ddim", strength=1.0, seed=7, batch=2, width=48, height=0, api_name="/generate")
    gallery, summary = client.predict(**args)
    assert summary["seeds"] == [7, 8] and (summary["width"], summary["height"]) == (48, 48)
    assert [Path(p).name for p in summary["images"]] == ["ctrlora-7.png", "ctrlora-8.png"]
    served = Path(gallery[0]["image"])
    assert served.read_bytes() == (out / "ctrlora-7.png").read_bytes()  # the download carries the recipe
    recipe = _recipe(served)
    assert (recipe["prompt"], recipe["negative_prompt"], recipe["seed"], recipe["steps"], recipe["guidance"]) == (
        "a red cat", "blurry", 7, 2, 5.0)
    (entry,) = recipe["conditions"]
    assert (entry["adapter"], entry["weight"], entry["start"], entry["end"], entry["prep"]) == (
        "tiny-canny", 0.8, 0, 0.5, "grayscale")
    assert recipe["base"]["name"] == "tiny" and recipe["sd"]["name"] == "tiny-sd"
    with Image.open(served) as image:
        assert image.size == (48, 48)
        made = np.asarray(image.convert("RGB"))
    assert made.std() > 1  # an image, not a blank

    monkeypatch.setenv("CTRLORA_HOME", str(home))  # the command in this process, on one thread as the app
    again = cli("gen", "--from", str(served), "--out", str(tmp_path / "again.png"))
    assert again.code == 0, again.err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png").convert("RGB")), made)

    # Warm: the second request loads nothing; a bad setting is one line naming it.
    _, summary = client.predict(**dict(args, batch=1, seed=9))
    assert summary["seconds"]["load"] < 1.0
    with pytest.raises(AppError, match=r"^unknown adapter 'nosuch'"):
        client.predict(**dict(args, conditions=[{"adapter": "nosuch"}]))
    with pytest.raises(AppError, match=r"^width: .*multiple of 8"):
        client.predict(**dict(args, width=50))
    # Nothing but the uploads: a path the app did not receive is not served.
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{url}gradio_api/file={home / 'manifests'}", timeout=5)


def test_the_page_generates_and_a_dropped_png_restores_its_settings(app):
    needs("playwright")
    if not CHROMIUM.is_file():
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs it (apt-get install -y chromium)")
        pytest.skip(f"no {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    url, out, home, cond = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#generate")
            page.locator("#condition-0 input[type=file]").set_input_files(str(cond))
            page.get_by_label("Prompt", exact=True).fill("a blue dog")
            page.locator("#seed input").fill("11")
            page.locator("#steps input[type=number]").fill("2")
            page.locator("#steps input[type=number]").press("Enter")
            page.click("#generate")
            page.wait_for_selector("#results img", timeout=60_000)
            page.wait_for_function("document.querySelector('#status').innerText.includes('ctrlora-11.png')")
            recipe = _recipe(out / "ctrlora-11.png")
            assert (recipe["prompt"], recipe["seed"], recipe["steps"]) == ("a blue dog", 11, 2)

            page.reload()
            page.wait_for_selector("#generate")
            page.locator("#restore input[type=file]").set_input_files(str(out / "ctrlora-11.png"))
            page.wait_for_function("document.querySelector('#prompt textarea').value === 'a blue dog'")
            assert page.locator("#seed input").input_value() == "11"
            page.wait_for_timeout(500)
            page.click("#generate")  # the restored settings make the same image again
            page.wait_for_function("document.querySelector('#status').innerText.includes('ctrlora-11-1.png')")
            assert _recipe(out / "ctrlora-11-1.png")["conditions"][0]["adapter"] == "tiny-canny"
            assert np.array_equal(np.asarray(Image.open(out / "ctrlora-11-1.png")),
                                  np.asarray(Image.open(out / "ctrlora-11.png")))
        finally:
            browser.close()


def test_without_gradio_it_names_the_extra(tmp_path):
    fake = tmp_path / "gradio"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no gradio here')\n")
    result = run_cli("ui", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the app needs Gradio, an optional extra: pip install 'ctrlora[ui]'"]


def test_only_loopback_hosts_count_as_local():
    from ctrlora_cli.ui import _local

    assert _local("127.0.0.1") and _local("::1") and _local("localhost")
    assert not _local("0.0.0.0") and not _local("192.168.1.4") and not _local("example.org")


def test_the_store_tab_says_what_rm_takes_along_before_removing(tiny_store):
    from ctrlora_cli.webui import store_tab

    assert [row[:3] for row in store_tab.table(tiny_store)] == [
        ["tiny", "base", "-"], ["tiny-canny", "adapter", "canny"], ["tiny-sd", "sd", "-"]]
    question = store_tab.removal(tiny_store, ["tiny-sd"])
    assert question.startswith("Remove tiny-sd (sd, ") and question.endswith("leaving tiny pointing to nothing?")
    assert tiny_store.exists("tiny-sd")  # asking removes nothing
    assert store_tab.remove(tiny_store, ["tiny-sd"]).startswith("removed tiny-sd; freed ")
    assert not tiny_store.exists("tiny-sd") and tiny_store.exists("tiny")


def test_a_drawing_is_laid_on_white_and_adapters_follow_their_base(tiny_store, tmp_path):
    from ctrlora_cli.webui import handlers

    drawing = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    drawing.putpixel((3, 4), (0, 0, 0, 255))
    drawing.save(tmp_path / "canvas.png")
    flat = np.asarray(Image.open(handlers.flatten(str(tmp_path / "canvas.png"))))
    assert flat[4, 3].tolist() == [0, 0, 0] and flat[0, 0].tolist() == [255, 255, 255]
    assert handlers.adapters_for(tiny_store, "tiny") == ["tiny-canny"]
    assert handlers.adapters_for(tiny_store, "nosuch") == []
