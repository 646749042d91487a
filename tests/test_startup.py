"""Start-up stays cheap by structure (bench/startup.py measures the seconds; no timings here):
commands that compute nothing load no model library, and nothing of ours needs peft."""

import ast
import tomllib

import pytest

from conftest import REPO, run_cli

HEAVY = ("torch", "diffusers", "transformers", "peft")


def _imported(stderr: str) -> set[str]:
    """The modules a process loaded, from ``-X importtime``'s lines (PYTHONPROFILEIMPORTTIME=1)."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


# `gen --help` in-process: tests/test_cli_basics.py. These go through the real entry point.
@pytest.mark.parametrize("args", [("--help",), ("list", "--json")])
def test_commands_that_compute_nothing_import_no_model_library(args, tmp_path):
    done = run_cli(*args, env={"PYTHONPROFILEIMPORTTIME": "1", "CTRLORA_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = _imported(done.stderr)
    assert "ctrlora_cli.app" in loaded  # the lines were read: the check can see an import
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}, sorted(m for m in loaded if m.split(".")[0] in HEAVY)


def test_nothing_of_ours_imports_peft_and_no_install_pulls_it():
    """LoRA is our own layer (engine.models.lora): peft is neither imported nor a dependency."""
    offenders = []
    for path in [*REPO.glob("engine/**/*.py"), *REPO.glob("ctrlora_cli/**/*.py"), *REPO.glob("bench/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names if n.split(".")[0] == "peft"]
    assert offenders == []
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert requirements and not [r for r in requirements if r.split(">")[0].split("=")[0].split("[")[0].strip() == "peft"]
