"""``ctrlora list``: what the store holds (or, with --catalog, what ``ctrlora pull NAME`` fetches)."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

from ctrlora_cli.console import out, say
from ctrlora_cli.store.store import Store


def register(app: typer.Typer) -> None:
    app.command("list")(list_models)


def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    catalog: bool = typer.Option(False, "--catalog", help="List what `ctrlora pull NAME` can fetch instead."),
) -> None:
    """List the models in the local store."""
    if catalog:
        _list_catalog(as_json)
        return
    store = Store()
    manifests = store.list()
    if as_json:
        typer.echo(json.dumps([dict(m.to_json(), size=m.size) for m in manifests], indent=2))
        return
    if not manifests:
        say(f"The store ({store.root}) is empty. Try: ctrlora pull tiny (random, offline) or ctrlora pull base")
    else:
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("NAME", "KIND", "CONDITION", "RANK", "SIZE", "SOURCE", "DATE"):
            table.add_column(column, justify="right" if column in ("RANK", "SIZE") else "left",
                             no_wrap=column != "SOURCE")
        for m in manifests:
            table.add_row(m.name, m.kind, escape(m.condition or "-"), str(m.rank) if m.rank else "-",
                          human_size(m.size), escape(source_label(m.source)), m.created[:10])
        print_table(table)
    partials = store.partials()
    if partials:
        total = sum(p.stat().st_size for p in partials)
        say(f"{len(partials)} unfinished download(s), {human_size(total)}: the same pull continues them")


def source_label(source: dict) -> str:
    kind = source.get("type")
    if kind == "hub":
        return f"{source.get('repo')}@{str(source.get('commit', ''))[:7]}"
    if kind == "local":
        from pathlib import Path

        return Path(source.get("path", "")).name or "local"
    if kind == "random":
        return f"random ({source.get('preset')})"
    return str(kind or "-")


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


def _list_catalog(as_json: bool) -> None:
    from dataclasses import asdict

    from ctrlora_cli.store.catalog import load

    entries = load()
    if as_json:
        typer.echo(json.dumps({name: asdict(e) for name, e in entries.items()}, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "KIND", "CONDITION", "REPOSITORY", "NOTES"):
        table.add_column(column, no_wrap=column not in ("NOTES",))
    for e in entries.values():
        table.add_row(escape(e.name), e.kind, escape(e.condition or "-"), escape(e.repo), escape(e.notes))
    table.add_row("tiny", "base+sd", "-", "(made offline)", "random tiny model for trying every command")
    print_table(table)
