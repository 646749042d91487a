"""``ctrlora pull``: fetch or import models into the local store (the work is done by
``ctrlora_cli.store.pull``; this module parses, calls and renders its events)."""

from __future__ import annotations

import typer

from ctrlora_cli.byte_progress import ByteBars
from ctrlora_cli.console import ask, warn
from ctrlora_cli.completion import base_names, sd_names
from ctrlora_cli.options import JsonOpt, examples, print_json
from ctrlora_cli.store.events import Message
from ctrlora_cli.store.pull import pull as pull_source
from ctrlora_cli.store.store import Store


def register(app: typer.Typer) -> None:
    app.command("pull", epilog=examples(
        'ctrlora pull base',
        'ctrlora pull canny',
        'ctrlora pull tiny',
        'ctrlora pull ./my_adapter.ckpt --name mosaic --condition mosaic',
        'ctrlora pull ./dreamshaper_8.safetensors --kind sd',
        'ctrlora pull canny --json',
    ))(pull)


def pull(
    source: str | None = typer.Argument(None, show_default=False, help="'base', an adapter ('canny', ...), 'sd15', 'demo' (offline), 'tiny' (random, offline), "
                                           "hf://owner/repo/path, sd:owner/repo, or a local file or folder."),
    name: str | None = typer.Option(None, "--name", help="Store name (default: from the source)."),
    revision: str | None = typer.Option(None, "--revision", help="Hub branch, tag or commit to pin."),
    kind: str | None = typer.Option(None, "--kind", help="Expect this kind: base, adapter or sd (default: detected)."),
    sd: str | None = typer.Option(None, "--sd", help="For a base: the SD model (store name) it pairs with.",
                                  autocompletion=sd_names),
    base: str | None = typer.Option(None, "--base", help="For an adapter: the base (store name) it was made for.",
                                    autocompletion=base_names),
    condition: str | None = typer.Option(None, "--condition", help="For an adapter: the condition's name."),
    force: bool = typer.Option(False, "--force", help="Fetch again and replace an existing entry of that name."),
    as_json: JsonOpt = False,
) -> None:
    """Fetch or import a model into the local store."""
    if source is None:
        source = ask("What to pull (base, canny, ..., demo, tiny, hf://..., a file)",
                     "what to pull? e.g. ctrlora pull base (see: ctrlora list --catalog)", batch=as_json)
    store = Store()
    before = {m.name: m.to_json() for m in store.list()}
    results: list[str] = []
    try:
        with ByteBars() as bars:
            def listen(event) -> None:  # with --json the results go into the one document
                if as_json and isinstance(event, Message) and event.level == "result":
                    results.append(event.text)
                else:
                    bars(event)

            pull_source(store, source, name=name, revision=revision, kind=kind, sd=sd, base=base,
                        condition=condition, force=force, on_event=listen)
    except KeyboardInterrupt:
        if source not in ("tiny", "demo"):  # made offline: nothing downloaded to continue from
            warn("interrupted: the same pull continues from the bytes already downloaded")
        raise
    if as_json:
        pulled = [m for m in store.list() if before.get(m.name) != m.to_json()]
        print_json({"source": source, "pulled": [m.name for m in pulled], "messages": results,
                    "entries": [dict(m.to_json(), size=m.size) for m in pulled]})
