"""``ctrlora list``: what the store holds (or, with --catalog, what ``ctrlora pull NAME`` fetches)."""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.markup import escape

from ctrlora_cli.console import say
from ctrlora_cli.options import JsonOpt, examples, print_json
from ctrlora_cli.store import sources
from ctrlora_cli.store.store import Store
from ctrlora_cli.tables import human_size, print_table


def register(app: typer.Typer) -> None:
    app.command("list", epilog=examples("ctrlora list", "ctrlora list --catalog", "ctrlora list --json"))(list_models)


def list_models(
    as_json: JsonOpt = False,
    catalog: bool = typer.Option(False, "--catalog", help="List what `ctrlora pull NAME` can fetch instead."),
) -> None:
    """List the models in the local store."""
    if catalog:
        _list_catalog(as_json)
        return
    store = Store()
    manifests = store.list()
    names = {m.name for m in manifests}
    missing = {m.name: store.missing_links(m, names) for m in manifests}
    made_for = {m.name: _made_for(store, m, manifests) for m in manifests}
    if as_json:
        print_json([dict(m.to_json(), size=m.size, missing=dict(missing[m.name]), made_for=made_for[m.name])
                    for m in manifests])
        return
    if not manifests:
        say(f"The store ({store.root}) is empty. Try: ctrlora pull tiny (random, offline) or ctrlora pull base")
    else:
        from rich.table import Table

        columns = ["NAME", "KIND", "CONDITION", "BASE", "RANK", "SIZE", "SOURCE", "DATE"]
        broken = [name for name, links in missing.items() if links]
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in columns + (["MISSING"] if broken else []):
            table.add_column(column, justify="right" if column in ("RANK", "SIZE") else "left",
                             no_wrap=column != "SOURCE")
        for m in manifests:
            row = [m.name, m.kind, escape(m.condition or "-"), _base_label(made_for[m.name]),
                   str(m.rank) if m.rank else "-",
                   human_size(m.size), escape(sources.label(m.source)), m.created[:10]]
            if broken:
                row.append(", ".join(f"{kind} {name}" for kind, name in missing[m.name]) or "-")
            table.add_row(*row)
        print_table(table)
        if broken:
            say(f"{', '.join(broken)}: made for or paired with a model no longer in the store (MISSING); pull it "
                f"again, or pass --base/--sd to the commands that use them")
    partials = store.partials()
    if partials:
        total = sum(p.stat().st_size for p in partials)
        say(f"{len(partials)} unfinished download(s), {human_size(total)}: the same pull continues them")


def _made_for(store: Store, manifest, manifests: list) -> dict | None:
    """For an adapter: the base it was made for as recorded (name, weights digest) and the store's
    base with those weights now ("in_store": that name, another name it was renamed to, or None)."""
    from ctrlora_cli.store.resolve import recorded_base

    record = manifest.made_for
    return dict(record, in_store=recorded_base(store, record, manifests)) if record else None


def _base_label(record: dict | None) -> str:
    if record is None:
        return "-"
    now = record["in_store"]
    return escape(record["name"] if now in (None, record["name"]) else f"{now} (recorded as {record['name']})")


def _list_catalog(as_json: bool) -> None:
    from ctrlora_cli.store.catalog import load

    entries = load()
    if as_json:
        print_json({name: asdict(e) for name, e in entries.items()})
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "KIND", "CONDITION", "REPOSITORY", "NOTES"):
        table.add_column(column, no_wrap=column not in ("NOTES",))
    for e in entries.values():
        table.add_row(escape(e.name), e.kind, escape(e.condition or "-"), escape(e.repo), escape(e.notes))
    table.add_row("tiny", "base+sd", "-", "(made offline)", "random tiny model for trying every command")
    print_table(table)
