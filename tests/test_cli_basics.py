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


def test_every_usage_error_is_one_line_naming_the_flag():
    """Typer's own refusals read like ours: one line on stderr, exit 2, the command's --help named."""
    cases = [(("frobnicate",), "No such command 'frobnicate'", "'ctrlora --help'"),
             (("gen", "--steps", "many"), "'--steps'", "'ctrlora gen --help'"),
             (("eval", "a", "b", "--precision", "fp8"), "'fp8' is not one of", "'ctrlora eval --help'"),
             (("rm",), "Missing argument", "'ctrlora rm --help'")]
    for args, what, hint in cases:
        result = run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("error: ") and what in lines[0] and hint in lines[0], lines[0]


def test_an_engine_setting_is_worded_as_the_flag():
    """SettingError("grad_accum", ...) from the engine reaches the user as --grad-accum."""
    result = run_cli("train-base", "x=.", "--out", "x", "--grad-accum", "0", "--print-command")
    assert result.returncode == 2 and result.stderr.startswith("error: --grad-accum: "), result.stderr


def test_the_app_and_help_import_no_model_library():
    """Start-up: the command table and --help load no torch, diffusers, transformers or peft (each
    command imports them when it needs them); `ctrlora gen --help` answers without them too."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys, ctrlora_cli.app as app; from typer.testing import CliRunner; "
            "CliRunner().invoke(app.app, ['gen', '--help']); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
