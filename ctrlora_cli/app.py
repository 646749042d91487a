"""The ``ctrlora`` command: a Typer app with one module per command."""

from __future__ import annotations

import importlib
import sys

import typer

from ctrlora_cli import __version__, envconfig

app = typer.Typer(
    name="ctrlora",
    help="CtrLoRA on Stable Diffusion 1.5: one shared Base ControlNet, one small adapter per condition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
    epilog="Settings from the environment (CTRLORA_HOME, CTRLORA_OFFLINE, HF_TOKEN, ...): ctrlora env",
)

# Each module defines ``register(app)``; the order is the order of ``ctrlora --help``.
COMMAND_MODULES: tuple[str, ...] = ("pull", "list", "show", "rm", "verify", "gen", "fit", "train_base", "evaluate", "prep", "world",
                                    "env")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctrlora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """CtrLoRA on Stable Diffusion 1.5."""


envconfig.quiet_libraries()  # before any command module imports huggingface_hub & co.
for _module in COMMAND_MODULES:
    importlib.import_module(f"ctrlora_cli.{_module}").register(app)


def main() -> None:
    from engine.errors import CtrloraError, SettingError

    try:
        app(prog_name="ctrlora")
    except CtrloraError as exc:
        from rich.markup import escape

        from ctrlora_cli.console import err

        # The engine names its setting (grad_accum); the user typed a flag (--grad-accum).
        message = f"--{exc.setting.replace('_', '-')}: {exc}" if isinstance(exc, SettingError) else str(exc)
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)

