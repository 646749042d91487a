"""Tables and sizes as the store's commands (list, show, rm, env) print them."""

from __future__ import annotations

from ctrlora_cli.console import out


def print_table(renderable) -> None:
    """At a terminal, fit its width; in a pipe or a log keep the natural width (Rich would cut at 80)."""
    if out.is_terminal:
        out.print(renderable, highlight=False)
    else:
        from rich.console import Console

        Console(file=out.file, width=240, highlight=False).print(renderable)


def human_size(n: int) -> str:
    from rich.filesize import decimal

    return decimal(n)
