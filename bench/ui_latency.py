"""``ctrlora ui`` against ``ctrlora gen``: seconds from clicking Generate to the image on the
page (the first click, which loads the models, and warm clicks), and a whole ``ctrlora gen`` for
the same settings, on the demo model (``ctrlora pull demo``, offline). Drives the page in Debian's
chromium with Playwright; optionally saves a screenshot of the page (README's docs/ui.png). Prints JSON.

    python bench/ui_latency.py [--repeats 3] [--steps 20] [--screenshot docs/ui.png]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a large red triangle on a magenta background"


def cli(*args: str, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ctrlora_cli", *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    opts = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="ctrlora-ui-bench-"))
    env = dict(os.environ, CTRLORA_HOME=str(work / "home"), PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False")
    cli("pull", "demo", env=env)
    cli("world", "make", str(work / "demo"), "-c", "seg", "-n", "1", "--size", "32", "--seed", "7", env=env)
    cond = work / "demo" / "source" / "0.png"
    gen_args = ["gen", "--cond", f"demo-seg={cond}", "-p", PROMPT, "--seed", "1", "--steps", str(opts.steps),
                "--out", str(work / "gen")]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ctrlora_cli", "ui", "--port", str(port), "--out",
                               str(work / "ui")], env=env, cwd=work, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=opts.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#generate")
            page.locator("#adapter-0 input").fill("demo-seg")
            page.locator("#adapter-0 input").press("Enter")
            page.locator("#condition-0 input[type=file]").set_input_files(str(cond))
            page.get_by_label("Prompt", exact=True).fill(PROMPT)
            page.locator("#seed input").fill("1")
            page.locator("#steps input[type=number]").fill(str(opts.steps))
            page.locator("#steps input[type=number]").press("Enter")
            page.wait_for_timeout(1000)

            shown = "[...document.querySelectorAll('#results img')].map(i => i.src)"

            def click() -> float:  # until the new image is on the page
                before = page.evaluate(shown)
                started = time.perf_counter()
                page.click("#generate")
                page.wait_for_function(f"b => {shown}.some(s => !b.includes(s))", arg=before, timeout=600_000)
                return time.perf_counter() - started

            clicks, gen = [click()], []  # the first click loads the models
            for _ in range(opts.repeats):  # taken in turns, so both see the same machine
                gen.append(cli(*gen_args, env=env))
                clicks.append(click())
            if opts.screenshot:
                page.wait_for_timeout(500)
                page.screenshot(path=str(opts.screenshot), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    warm = statistics.median(clicks[1:])
    print(json.dumps({"model": f"demo (32x32, {opts.steps} steps, ddim)", "ui_first_click_s": round(clicks[0], 3),
                      "ui_warm_click_s": round(warm, 3), "gen_command_s": round(statistics.median(gen), 3),
                      "gen_over_ui_warm": round(statistics.median(gen) / warm, 2), "repeats": opts.repeats}, indent=1))


if __name__ == "__main__":
    main()
