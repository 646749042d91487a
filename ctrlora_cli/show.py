"""``ctrlora show NAME``: one entry's manifest, parameter counts and files."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

from ctrlora_cli.completion import any_name
from ctrlora_cli.console import ask, out
from ctrlora_cli.options import JsonOpt, examples, print_json
from ctrlora_cli.store import sources
from ctrlora_cli.store.parameters import parameter_counts
from ctrlora_cli.store.store import Store
from ctrlora_cli.tables import human_size, print_table


def register(app: typer.Typer) -> None:
    app.command("show", epilog=examples(
        'ctrlora show canny',
        'ctrlora show canny --json',
    ))(show)


def show(
    name: str | None = typer.Argument(None, show_default=False, help="A store name (see: ctrlora list).",
                                      autocompletion=any_name),
    as_json: JsonOpt = False,
) -> None:
    """Show a model: what it is, where it came from, its parameters and files."""
    store = Store()
    if name is None:
        name = ask("Model to show", "which model? e.g. ctrlora show base (see: ctrlora list)")
    manifest = store.get(name)
    params = parameter_counts(store, manifest)
    if as_json:
        print_json(dict(manifest.to_json(), size=manifest.size, parameters=params))
        return
    from rich.table import Table

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    rows = [("name", manifest.name), ("kind", manifest.kind), ("architecture", manifest.arch),
            ("condition", manifest.condition), ("rank", manifest.rank and str(manifest.rank)),
            ("pairs with", manifest.sd and f"{manifest.sd} (Stable Diffusion)" + _gone(store, manifest.sd)),
            ("made for", manifest.made_for and f"base {manifest.made_for['name']}" + _gone(store, manifest.made_for["name"])),
            ("source", sources.detail(manifest.source)),
            ("converted from", manifest.converted_from and _converted(manifest.converted_from)),
            ("labels", ", ".join(manifest.labels)), ("notes", manifest.notes),
            ("created", manifest.created), ("size", human_size(manifest.size))]
    for key, value in rows:
        if value:
            facts.add_row(key, escape(str(value)))
    for key, value in params.items():
        facts.add_row("parameters" if key == "total" else f"  {key}", f"{value:,}")
    shown = {"base", "base_digest"} if manifest.made_for else set()  # the "made for" row
    for key, value in sorted(manifest.extra.items()):
        if key in shown:
            continue
        facts.add_row(escape(key), escape(json.dumps(value) if not isinstance(value, str) else value))
    print_table(facts)
    files = Table(box=None, header_style="bold", pad_edge=False, title=None)
    files.add_column("FILE", overflow="fold")
    files.add_column("SIZE", justify="right")
    files.add_column("DIGEST", no_wrap=True)
    for record in manifest.files:
        files.add_row(escape(record.path), human_size(record.size), record.digest[:19])
    out.print()
    print_table(files)


def _gone(store: Store, name: str) -> str:
    return "" if store.exists(name) else " (not in the store)"


def _converted(info: dict) -> str:
    text = f"{info.get('file')} ({info.get('format', '?')}, sha256 {str(info.get('sha256', ''))[:12]}...)"
    if info.get("embedded_adapter_rank"):
        text += f"; its embedded rank-{info['embedded_adapter_rank']} condition was left out"
    return text
