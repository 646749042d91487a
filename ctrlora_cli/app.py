"""The ``ctrlora`` command: a Typer app with one module per command."""

from __future__ import annotations

import importlib
import sys

import typer

from ctrlora_cli import __version__, envconfig
from ctrlora_cli.conventions import house_rules
from ctrlora_cli.options import examples

app = typer.Typer(
    name="ctrlora",
    help="CtrLoRA on Stable Diffusion 1.5: one shared Base ControlNet, one small adapter per condition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    epilog=examples("ctrlora pull tiny", "ctrlora list", "ctrlora gen --help", "ctrlora --install-completion")
    + "\n\nSettings from the environment (CTRLORA_HOME, CTRLORA_OFFLINE, HF_TOKEN, ...): ctrlora env",
)

# Each module defines ``register(app)``; the order is the order of ``ctrlora --help``.
COMMAND_MODULES: tuple[str, ...] = ("pull", "list", "show", "rm", "verify", "export", "gen", "fit", "train_base",
                                    "encode_shards", "evaluate", "prep", "world", "ui", "env")


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
house_rules(app)


def _click_exceptions():
    try:  # Typer >= 0.2x carries its own copy of click
        from typer._click import exceptions
    except ImportError:  # older Typer runs on click itself
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    """``ctrlora`` with ``argv`` (default: the process's own arguments); exits with its code."""
    from engine.errors import CtrloraError, SettingError

    click = _click_exceptions()

    try:
        # standalone_mode=False: click hands usage errors to us instead of drawing its box, so
        # every bad input reads the same: one line, exit 2.
        code = app(args=argv, prog_name="ctrlora", standalone_mode=False)
    except CtrloraError as exc:
        # The engine names its setting (grad_accum); the user typed a flag (--grad-accum).
        message = f"--{exc.setting.replace('_', '-')}: {exc}" if isinstance(exc, SettingError) else str(exc)
        _error(message)
        sys.exit(exc.exit_code)
    except click.NoArgsIsHelpError as exc:  # bare "ctrlora" or a group without its command: the help
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "ctrlora"
        _error(f"{_one_line(exc.format_message())} (see '{command} --help')")
        sys.exit(2)
    except click.ClickException as exc:  # a file option that cannot be opened, and the like
        _error(_one_line(exc.format_message()))
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(message: str) -> str:
    # Typer words some refusals over several lines ("Value error, ..."); a log keeps one.
    return " ".join(message.replace("Value error, ", "").split())


def _error(message: str) -> None:
    from rich.markup import escape

    from ctrlora_cli.console import err

    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
