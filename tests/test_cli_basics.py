from conftest import run_cli
from ctrlora_cli import __version__


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ctrlora {__version__}"


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "Base ControlNet" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
