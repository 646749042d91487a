import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CTRLORA_SHARED", REPO.parent / "shared"))
REF_TINY = SHARED / "data" / "ref-tiny"


@pytest.fixture(scope="session")
def ref_tiny() -> Path:
    if not (REF_TINY / "reference_outputs.safetensors").is_file():
        pytest.fail(f"reference fixture not found at {REF_TINY} (set CTRLORA_SHARED to the shared/ folder)")
    return REF_TINY


def run_cli(*args: str, env: dict | None = None, input: str | None = None, cwd: str | Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``ctrlora`` from this source tree in a real subprocess (no terminal attached)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    full_env.setdefault("HF_HUB_DISABLE_XET", "1")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "ctrlora_cli", *args], capture_output=True, text=True,
                          env=full_env, input=input, cwd=cwd, timeout=timeout)
