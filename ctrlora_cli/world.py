"""``ctrlora world``: data sets from the procedurally drawn demo world."""

from __future__ import annotations

from pathlib import Path

import typer

from ctrlora_cli.completion import world_conditions
from ctrlora_cli.console import ask, out
from ctrlora_cli.options import JsonOpt, SeedOpt, examples, print_json, retold
from engine.demo.settings import ToySDSettings
from engine.errors import UsageError

TOY = ToySDSettings()  # the defaults
WorldSeedOpt = retold(SeedOpt, "World seed: the same seed draws the same scenes.")
TrainSdSeedOpt = retold(SeedOpt, "World and training seed.")

world_app = typer.Typer(help="The demo world: drawn scenes of coloured shapes with exact conditions, offline.",
                        no_args_is_help=True, epilog=examples(
                            "ctrlora world conditions",
                            "ctrlora world make data/canny --condition canny --count 1000",
                            "ctrlora world train-sd --name demo-sd"))


def register(app: typer.Typer) -> None:
    app.add_typer(world_app, name="world")


@world_app.command("make", epilog=examples(
    "ctrlora world make data/canny --condition canny --count 1000",
    "ctrlora world make heldout --condition sketch -n 100 --seed 1",
    "ctrlora world make ./demo --condition seg -n 1 --size 32 --seed 7 --json",
))
def make(
    folder: Path = typer.Argument(..., help="Folder to write the pairs to (created if missing)."),
    condition: str | None = typer.Option(None, "--condition",
                                         help="Which condition the source images show (see 'ctrlora world "
                                              "conditions').", autocompletion=world_conditions),
    count: int | None = typer.Option(None, "--count", "-n", help="Number of pairs."),
    size: int = typer.Option(64, "--size", help="Image side in pixels (a multiple of 8, 32 to 512)."),
    seed: WorldSeedOpt = 0,
    force: bool = typer.Option(False, "--force", help="Replace a data set already in FOLDER."),
    as_json: JsonOpt = False,
) -> None:
    """Write COUNT (condition, scene, caption) pairs in the fit layout: prompt.json, source/, target/."""
    from engine.demo import world

    world.check_dataset(condition, count, size, seed)  # what is given, before asking for the rest
    if condition is None or count is None:
        missing = "--condition" if condition is None else "--count"
        refusal = f"give {missing}, e.g. ctrlora world make data/canny --condition canny --count 1000"
        condition = condition or ask(f"Condition ({', '.join(world.CONDITIONS)})", refusal, batch=as_json)
        count = count if count is not None else ask("Number of pairs", refusal, type=int, batch=as_json)

    from ctrlora_cli.progress import progress_bars

    with progress_bars(enabled=None if not as_json else False) as callback:
        index = world.write_dataset(folder, condition, count, size=size, seed=seed, force=force,
                                    progress=callback)
    if as_json:
        print_json({"folder": str(folder), "prompt_file": str(index), "condition": condition, "count": count,
                    "size": size, "seed": seed, "base": condition in world.BASE_CONDITIONS})
    else:
        which = "base" if condition in world.BASE_CONDITIONS else "held-out"
        out.print(f"wrote {count} {condition} pairs ({which} condition, {size}x{size}, seed {seed}) to {folder}",
                  highlight=False)


@world_app.command("conditions", epilog=examples("ctrlora world conditions", "ctrlora world conditions --json"))
def conditions(as_json: JsonOpt = False) -> None:
    """List the world's conditions: the base set (for the Base ControlNet) and the held-out set."""
    from engine.demo.world import BASE_CONDITIONS, CONDITION_HELP, CONDITIONS

    if as_json:
        print_json([{"condition": c, "set": "base" if c in BASE_CONDITIONS else "held-out",
                     "help": CONDITION_HELP[c]} for c in CONDITIONS])
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("condition", style="bold")
    table.add_column("set")
    table.add_column("what the source image shows")
    for c in CONDITIONS:
        table.add_row(c, "base" if c in BASE_CONDITIONS else "held-out", CONDITION_HELP[c])
    out.print(table)


@world_app.command("train-sd", epilog=examples(
    "ctrlora world train-sd --name demo-sd",
    "ctrlora world train-sd --name quick-sd --vae-steps 50 --unet-steps 100 --json",
))
def train_sd(
    name: str | None = typer.Option(None, "--name", help="Store name of the sd entry to make, e.g. demo-sd."),
    size: int = typer.Option(TOY.size, "--size", help="Image side in pixels (a multiple of 32, 32 to 256)."),
    count: int = typer.Option(TOY.count, "--count", "-n", help="World scenes to train on."),
    vae_steps: int = typer.Option(TOY.vae_steps, "--vae-steps", help="VAE training steps (0 or more)."),
    unet_steps: int = typer.Option(TOY.unet_steps, "--unet-steps", help="Text encoder + UNet steps (0 or more)."),
    batch: int = typer.Option(TOY.batch, "--batch", help="Scenes per text encoder + UNet step."),
    vae_batch: int = typer.Option(TOY.vae_batch, "--vae-batch", help="Images per VAE step."),
    prediction: str = typer.Option(TOY.prediction, "--prediction",
                                   help="What the UNet predicts: v_prediction or epsilon (SD1.5's)."),
    seed: TrainSdSeedOpt = TOY.seed,
    out_dir: Path | None = typer.Option(None, "--out", help="Also keep the SD folder (diffusers layout) here."),
    force: bool = typer.Option(False, "--force", help="Replace an entry NAME already in the store."),
    as_json: JsonOpt = False,
) -> None:
    """Train the demo's toy SD (VAE, text encoder, UNet of the demo preset) on world scenes and add
    it to the store as an sd entry. About 22 minutes on 2 CPU cores with the defaults."""
    from ctrlora_cli.store.names import validate_name
    from ctrlora_cli.store.store import Store

    # Ranges first, before the question and before torch loads.
    settings = ToySDSettings(size=size, count=count, vae_steps=vae_steps, unet_steps=unet_steps, batch=batch,
                             vae_batch=vae_batch, prediction=prediction, seed=seed).check()
    if name is None:
        name = ask("Store name for the toy SD", "give --name, e.g. ctrlora world train-sd --name demo-sd",
                   default="demo-sd", batch=as_json)
    validate_name(name)
    store = Store()
    store.claim(name, force, "--name")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a folder; pick another --out")
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir} is not empty; pick another --out or add --force")

    from ctrlora_cli.progress import progress_bars
    from ctrlora_cli.store.results import add_toy_sd

    with progress_bars(enabled=None if not as_json else False, describe=_describe) as callback:
        summary = add_toy_sd(store, name, settings, out_dir, callback)
    if as_json:
        print_json(summary)
        return
    out.print(f"added {name} (sd, demo preset, {size}x{size}): VAE mse {summary['vae_mse_last']:.4f} "
              f"(trivial {summary['vae_mse_trivial']:.4f}), UNet loss {_fmt(summary['unet_loss_first'])} -> "
              f"{_fmt(summary['unet_loss_last'])}, latent scale {summary['scaling_factor']:.3f}", highlight=False,
              soft_wrap=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _describe(update) -> str:
    loss = update.info.get("loss")
    return "" if loss is None else f"loss {loss:.4f}"
