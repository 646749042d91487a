"""``ctrlora world``: data sets from the procedurally drawn demo world."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ctrlora_cli.console import interactive, out
from engine.errors import UsageError

world_app = typer.Typer(help="The demo world: drawn scenes of coloured shapes with exact conditions, offline.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(world_app, name="world")


@world_app.command("make")
def make(
    folder: Path = typer.Argument(..., help="Folder to write the pairs to (created if missing)."),
    condition: str | None = typer.Option(None, "--condition", "-c",
                                         help="Which condition the source images show (see 'ctrlora world "
                                              "conditions')."),
    count: int | None = typer.Option(None, "--count", "-n", help="Number of pairs."),
    size: int = typer.Option(64, "--size", help="Image side in pixels (a multiple of 8, 32 to 512)."),
    seed: int = typer.Option(0, "--seed", help="World seed: the same seed draws the same scenes."),
    force: bool = typer.Option(False, "--force", help="Replace a data set already in FOLDER."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of text."),
) -> None:
    """Write COUNT (condition, scene, caption) pairs in the fit layout: prompt.json, source/, target/."""
    from engine import world

    if condition is None or count is None:
        if not interactive() or as_json:
            missing = "--condition" if condition is None else "--count"
            raise UsageError(f"give {missing}, e.g. ctrlora world make data/canny --condition canny --count 1000")
        condition = condition or typer.prompt(f"Condition ({', '.join(world.CONDITIONS)})")
        count = count if count is not None else typer.prompt("Number of pairs", type=int)

    from ctrlora_cli.progress import progress_bars

    with progress_bars(enabled=None if not as_json else False) as callback:
        index = world.write_dataset(folder, condition, count, size=size, seed=seed, overwrite=force,
                                    progress=callback)
    if as_json:
        print(json.dumps({"folder": str(folder), "prompt_file": str(index), "condition": condition, "count": count,
                          "size": size, "seed": seed, "base": condition in world.BASE_CONDITIONS}))
    else:
        which = "base" if condition in world.BASE_CONDITIONS else "held-out"
        out.print(f"wrote {count} {condition} pairs ({which} condition, {size}x{size}, seed {seed}) to {folder}",
                  highlight=False)


@world_app.command("conditions")
def conditions(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the world's conditions: the base set (for the Base ControlNet) and the held-out set."""
    from engine.world import BASE_CONDITIONS, CONDITION_HELP, CONDITIONS

    if as_json:
        print(json.dumps([{"condition": c, "set": "base" if c in BASE_CONDITIONS else "held-out",
                           "help": CONDITION_HELP[c]} for c in CONDITIONS], indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("condition", style="bold")
    table.add_column("set")
    table.add_column("what the source image shows")
    for c in CONDITIONS:
        table.add_row(c, "base" if c in BASE_CONDITIONS else "held-out", CONDITION_HELP[c])
    out.print(table)
