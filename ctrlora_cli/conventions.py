"""What every command's face shares, applied in one place (``house_rules(app)``, called by
``ctrlora_cli.app`` once all commands are registered): flags shown without a value placeholder
in ``--help``, and short flags that used to mean something else still read, or refused with the
new spelling. Each short flag means one long flag across all commands (tests/test_cli_conventions.py)."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

# Short flags renamed so that each means one long flag everywhere: (command path, old short) ->
# (the long flag it stood for there, whether it still reads as that). Not where that is unsafe:
# -n is --count elsewhere, so a count typed in gen must not become its negative prompt.
OLD_SHORT_FLAGS: dict[tuple[str, str], tuple[str, bool]] = {
    ("gen", "-n"): ("--negative", False),
    ("prep", "-p"): ("--param", True),            # -p is gen's --prompt
    ("world make", "-c"): ("--condition", True),  # -c is gen's --cond
}


def _no_flag_placeholder(params: list[Any]) -> list[Any]:
    # Typer's Rich help prints a flag's type (<bool>) as if it took a value; an empty metavar
    # prints nothing there (plain-text help already leaves flags bare). The help option and
    # the completion options join the params late: hence here, not at construction.
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    def get_params(self, ctx):
        return _no_flag_placeholder(super().get_params(ctx))

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _renamed(ctx.command_path.partition(" ")[2], args))


class Group(TyperGroup):
    def get_params(self, ctx):
        return _no_flag_placeholder(super().get_params(ctx))


def _renamed(command: str, args: list[str]) -> list[str]:
    """``args`` with this command's old short flags spelled as their long flags (``-cseg`` too);
    an old short flag that is no longer safe is refused, naming the new spelling."""
    from engine.errors import UsageError

    olds = {short: old for (path, short), old in OLD_SHORT_FLAGS.items() if path == command}
    if not olds:
        return args
    result: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return result + args[i:]
        short = arg[:2]
        if short in olds and not arg.startswith("--"):
            long, kept = olds[short]
            if not kept:
                raise UsageError(f"{short} no longer means {long} here ({short} is --count in world and eval); "
                                 f"write {long}")
            result += [long] + ([arg[2:]] if len(arg) > 2 else [])
        else:
            result.append(arg)
    return result


def house_rules(app: typer.Typer) -> None:
    """Every command and group of ``app`` (sub-apps too) built with the classes above."""
    from typer.models import DefaultPlaceholder

    if isinstance(app.info.cls, DefaultPlaceholder) or app.info.cls is None:
        app.info.cls = Group
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = Command
    for group in app.registered_groups:
        house_rules(group.typer_instance)
