"""``ctrlora env``: the environment variables ctrlora reads, their values now, defaults and
meaning (from ``ctrlora_cli.envconfig``)."""

from __future__ import annotations

import typer
from rich.markup import escape

from ctrlora_cli import envconfig
from ctrlora_cli.options import JsonOpt, examples, print_json
from ctrlora_cli.tables import print_table


def register(app: typer.Typer) -> None:
    app.command("env", epilog=examples(
        'ctrlora env',
        'ctrlora env --json',
    ))(env)


def env(as_json: JsonOpt = False) -> None:
    """Show the environment variables ctrlora reads: value now, default, meaning."""
    variables = envconfig.describe()
    if as_json:
        print_json(variables)
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("VARIABLE", "VALUE", "DEFAULT", "MEANING"):
        table.add_column(column, no_wrap=column == "VARIABLE")
    for v in variables:
        table.add_row(v["name"], escape(v["value"] if v["value"] is not None else "-"), escape(v["default"]),
                      escape(v["help"]))
    print_table(table)
