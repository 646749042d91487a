"""Options shared by several commands, declared once (Typer ``Annotated`` aliases), and the one
JSON printer. A command module writes ``base: BaseOpt = None`` instead of declaring ``--base``
again, so the flag, its help text and its checks are the same everywhere."""

from __future__ import annotations

import enum
import json
import sys
from typing import Annotated, Any

import typer

from ctrlora_cli.completion import base_names, sd_names


class Precision(str, enum.Enum):
    """``auto`` is decided by ``engine.runtime.resolve_precision`` for the device and the job."""

    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


BaseOpt = Annotated[str | None, typer.Option("--base", help="Base ControlNet in the store (default: the adapter's "
                                             "base, else the only one, else 'base').", autocompletion=base_names)]
SdOpt = Annotated[str | None, typer.Option("--sd", help="Stable Diffusion model in the store (default: the base's).",
                                           autocompletion=sd_names)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (auto: cuda when present).")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", case_sensitive=False,
                                                 help="auto: fp16 on GPU for generation, bf16 for training; "
                                                      "on CPU bf16 where it is native (AVX512-BF16, AMX), else "
                                                      "fp32.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of text.")]
# Numbers carry no Typer ranges: every command checks its numbers through engine.checks, so that
# each refusal reads the same ("--steps: must be between 1 and 1000, not 0") and NaN is refused too.
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed, 0 to 2**32-1 (the same seed gives the same "
                                                     "result).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Number of steps.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask; go on after warnings (as without a terminal).")]


class LogTo(str, enum.Enum):
    tensorboard = "tensorboard"


LogToOpt = Annotated[LogTo | None, typer.Option("--log-to", case_sensitive=False,
                                                help="Also log loss, lr and it/s to TensorBoard, in RUN/tensorboard "
                                                     "(needs: pip install 'ctrlora\\[tensorboard]').")]


def print_json(data: Any) -> None:
    """The one way a command prints JSON: indented, UTF-8 kept, one document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def examples(*commands: str) -> str:
    """A command's Examples section, the one way a command declares it (as its help epilog:
    ``app.command("pull", epilog=examples("ctrlora pull base", ...))``): real, runnable
    commands, one a line."""
    from rich.markup import escape

    return "Examples:\n" + "\n".join(escape(command) for command in commands)  # Typer dedents them anyway


def retold(alias: Any, help: str, *, optional: bool = False) -> Any:
    """``alias`` (one of the options above) with a command's own help text, and with ``optional``
    also None as its value (the command then fills in a default of its own, e.g. from a recipe).
    The flag and its checks stay the ones declared above."""
    import copy
    import typing

    kind, info = typing.get_args(alias)
    info = copy.copy(info)
    info.help = help
    return Annotated[kind | None if optional else kind, info]
