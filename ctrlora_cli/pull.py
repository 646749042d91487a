"""``ctrlora pull``: fetch or import models into the local store."""

from __future__ import annotations

import tempfile

import typer

from ctrlora_cli.console import out
from ctrlora_cli.store import Store, validate_name


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)


def pull(
    source: str = typer.Argument(..., help="What to pull: 'tiny' (random tiny base, offline)."),
    name: str | None = typer.Option(None, "--name", help="Store name (default: from the source)."),
) -> None:
    """Fetch or import a model into the local store."""
    store = Store()
    if source == "tiny":
        _pull_random(store, "tiny", name or "tiny")
        return
    raise typer.BadParameter(f"unknown source {source!r}", param_hint="SOURCE")


def _pull_random(store: Store, preset: str, name: str) -> None:
    from engine.arch import arch_id
    from engine.models import make_random_model

    validate_name(name)
    sd_name = f"{name}-sd"
    with tempfile.TemporaryDirectory(dir=_tmp_parent(store)) as tmp:
        config = make_random_model(preset, f"{tmp}/sd", f"{tmp}/base/controlnet")
        labels = ["random-weights"]
        note = "randomly initialised: for trying commands offline, not for real images"
        store.add_folder(sd_name, "sd", f"{tmp}/sd", source={"type": "random", "preset": preset}, labels=labels,
                         notes=note)
        store.add_folder(name, "base", f"{tmp}/base", arch=arch_id(config), sd=sd_name,
                         source={"type": "random", "preset": preset}, labels=labels, notes=note)
    out.print(f"pulled {name} (base, {preset}, random weights) and {sd_name} (sd)")


def _tmp_parent(store: Store):
    store.root.mkdir(parents=True, exist_ok=True)
    return store.root
