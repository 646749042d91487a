import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CTRLORA_SHARED", REPO.parent / "shared"))
REF_TINY = SHARED / "data" / "ref-tiny"
# The suite's numbers are the same on every CPU: --precision auto means fp32 here (and in every
# subprocess) unless the run sets CTRLORA_CPU_BF16; tests of bf16 ask for it.
os.environ.setdefault("CTRLORA_CPU_BF16", "0")
# Commands that tests run in this process (hub_fixtures.cli) find the libraries as quiet as in
# ctrlora's own process: its settings for them, made before any test imports them. The
# subprocesses that run_cli starts get the environment without them (ctrlora sets them itself).
_SET_BY_USER = set(os.environ)
from ctrlora_cli import envconfig  # noqa: E402  (light: no torch)

envconfig.quiet_libraries()


@pytest.fixture(scope="session")
def ref_tiny() -> Path:
    if not (REF_TINY / "reference_outputs.safetensors").is_file():
        pytest.fail(f"reference fixture not found at {REF_TINY} (set CTRLORA_SHARED to the shared/ folder)")
    return REF_TINY


def cli_env(env: dict | None = None) -> dict:
    """The environment ``run_cli`` runs ``ctrlora`` in (``env`` on top); for a test that starts
    ``[sys.executable, "-m", "ctrlora_cli", ...]`` itself (to act while it runs)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    full_env.setdefault("HF_HUB_DISABLE_XET", "1")
    # No timed progress lines on stderr (a slow machine would add them to what tests compare);
    # tests of those lines set it.
    full_env.setdefault("CTRLORA_LOG_EVERY", "0")
    for name in envconfig.LIBRARY_DEFAULTS:
        if name not in _SET_BY_USER:
            full_env.pop(name, None)
    if env:
        full_env.update(env)
    return full_env


def run_cli(*args: str, env: dict | None = None, input: str | None = None, cwd: str | Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``ctrlora`` from this source tree in a real subprocess (no terminal attached)."""
    return subprocess.run([sys.executable, "-m", "ctrlora_cli", *args], capture_output=True, text=True,
                          env=cli_env(env), input=input, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_store_template(tmp_path_factory) -> Path:
    """A store holding the random ``tiny`` base and ``tiny-sd``, built once per session."""
    from ctrlora_cli.store.store import Store
    from ctrlora_cli.store.tiny import pull_tiny

    root = tmp_path_factory.mktemp("store-template")
    pull_tiny(Store(root), "tiny")
    return root


@pytest.fixture()
def tiny_store(tiny_store_template, tmp_path, monkeypatch):
    """A private copy of the tiny store, with CTRLORA_HOME pointing at it."""
    import shutil

    from ctrlora_cli.store.store import Store

    root = tmp_path / "ctrlora-home"
    shutil.copytree(tiny_store_template, root, ignore=shutil.ignore_patterns("views", ".lock"))
    monkeypatch.setenv("CTRLORA_HOME", str(root))
    return Store(root)


@pytest.fixture()
def one_thread():
    """torch on one thread in this process for the test (tiny models: a second thread only
    contends), as the subprocesses that tests start with OMP_NUM_THREADS=1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cpu_bf16_from_env():
    """The engine's CPU bf16 choice as CTRLORA_CPU_BF16 says, again before each test (a test may
    have changed it in this process)."""
    from ctrlora_cli.envconfig import apply_cpu_bf16

    apply_cpu_bf16()
    yield


def ctrl_c_as_at_a_terminal() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: a shell without job control
    starts background jobs (a CI script run with ``&``) with SIGINT ignored, children inherit
    that, and Python then never turns Ctrl-C into KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
