"""End-to-end store checks with real ``ctrlora`` subprocesses: SIGKILL mid-download, concurrent
pulls of the same model, and the commands' output as a user sees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from filelock import FileLock

from conftest import REPO, ctrl_c_as_at_a_terminal, run_cli
from hub_fixtures import BASE_FILE, cli, hub, hub_server, store_env, tiny_sd_folder  # noqa: F401
from ctrlora_cli.store.store import Store


def _spawn(env: dict, *args: str) -> subprocess.Popen:
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "ctrlora_cli", *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_at_a_terminal)


@pytest.mark.slow
def test_sigkill_during_a_pull_leaves_the_store_consistent(store_env, hub):
    store = Store(store_env["CTRLORA_HOME"])
    hub.rate = 1_500_000  # the 14.8 MB base takes about 10 s
    proc = _spawn(store_env, "pull", "hf://test/ctrlora/" + BASE_FILE, "--name", "killed")
    deadline = time.time() + 120
    while time.time() < deadline:
        parts = store.partials()
        if parts and parts[0].stat().st_size > 2_000_000:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    hub.rate = None

    assert store.list() == []
    listing = cli("list")
    assert listing.code == 0 and "is empty" in listing.out and "1 unfinished download(s)" in listing.out
    assert cli("verify").code == 0
    with FileLock(str(store.root / ".lock"), timeout=1):  # no stale lock
        pass
    kept = store.partials()[0].stat().st_size

    hub.log.clear()
    again = cli("pull", "hf://test/ctrlora/" + BASE_FILE, "--name", "killed")
    assert again.code == 0, again.err
    assert [g.range for g in hub.gets(BASE_FILE)] == [f"bytes={kept}-"]
    assert store.get("killed").kind == "base" and store.partials() == []
    assert cli("verify").code == 0


@pytest.mark.slow
def test_two_concurrent_pulls_of_the_same_model(store_env, hub):
    hub.rate = 4_000_000  # the tiny SD's 18 MB take about 5 s
    procs = [_spawn(store_env, "pull", "sd:test/tiny-sd", "--name", "shared-sd") for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    said = sorted(out.startswith("shared-sd is up to date") for out, _ in outputs)
    assert said == [False, True]  # one pulled it, the other waited and found it done
    assert len(hub.gets("unet/diffusion_pytorch_model.fp16.safetensors")) == 1
    store = Store(store_env["CTRLORA_HOME"])
    assert [m.name for m in store.list()] == ["shared-sd"] and cli("verify").code == 0


@pytest.mark.slow
def test_commands_as_a_user_sees_them(store_env, hub):
    """Real subprocesses, no terminal: what a script or a log shows."""
    pulled = run_cli("pull", "tiny-official", env=store_env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.splitlines() == [
        f"pulled tiny-official-sd (sd, tiny) from test/tiny-sd@{hub.repos['test/tiny-sd'].commit[:12]}",
        f"pulled tiny-official (base, tiny, sd tiny-official-sd) from test/ctrlora@"
        f"{hub.repos['test/ctrlora'].commit[:12]} {BASE_FILE}"]
    listing = run_cli("list", env=store_env)
    assert listing.returncode == 0 and "tiny-official-sd" in listing.stdout and "\x1b[" not in listing.stdout
    assert run_cli("show", "tiny-official", env=store_env).returncode == 0
    refused = run_cli("rm", "tiny-official-sd", env=store_env)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: not removing tiny-official-sd without confirmation (no terminal); tiny-official would point to "
        "nothing: pass -y")
    removed = run_cli("rm", "-y", "tiny-official-sd", env=store_env)
    assert removed.returncode == 0 and "base 'tiny-official' paired with 'tiny-official-sd'" in removed.stderr
    offline = run_cli("pull", "tiny-cond1", env=dict(store_env, CTRLORA_OFFLINE="1"))
    assert offline.returncode == 1 and len(offline.stderr.strip().splitlines()) == 1
    assert "Traceback" not in offline.stderr
    assert run_cli("verify", env=store_env).returncode == 0
