"""``ctrlora encode-shards``: run the frozen encoders once over raw training shards (latent shards)."""

from __future__ import annotations

from pathlib import Path

import typer

from ctrlora_cli.console import interactive, out
from ctrlora_cli.options import DeviceOpt, JsonOpt, SdOpt, examples, print_json, retold
from engine.training.settings import TrainBaseSettings

EncodeSdOpt = retold(SdOpt, "The SD model whose VAE and tokenizer encode the shards (store name; a base: its SD).")


def register(app: typer.Typer) -> None:
    app.command("encode-shards", epilog=examples(
        "ctrlora encode-shards /data/shards /data/latents --sd sd15",
        "ctrlora encode-shards '/data/shards/*.tar' /data/latents --sd sd15 --part 2/4",
    ))(encode_shards)


def encode_shards(
    source: str = typer.Argument(..., metavar="IN", help="Raw shards: a folder of .tar files or a glob."),
    target: Path = typer.Argument(..., metavar="OUT", help="Folder for the latent shards (resumed if it holds some)."),
    sd: EncodeSdOpt = None,
    resolution: int = typer.Option(TrainBaseSettings.resolution, "--resolution", help=TrainBaseSettings.help_of("resolution")),
    batch: int = typer.Option(8, "--batch", help="Images per VAE call."),
    part: str = typer.Option("1/1", "--part", help="I/N: encode every N-th shard from the I-th, so that N processes "
                             "(machines, GPUs) share the work into one OUT; the last to finish writes the manifest."),
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Pre-encode training shards (VAE posteriors in fp16, token ids) so train-base streams latents, without the VAE."""
    from engine.checks import at_least, multiple_of
    from engine.errors import SettingError, UsageError

    multiple_of("resolution", resolution, 8)
    at_least("batch", batch, 1)
    index, sep, count = part.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise SettingError("part", f"expects I/N with 1 <= I <= N, e.g. 2/8, not {part!r}")
    if not sd:
        raise UsageError("missing --sd; pass --sd NAME (the SD model train-base will use)")

    from ctrlora_cli.progress import progress_bars
    from ctrlora_cli.store.results import resolve_init
    from ctrlora_cli.store.store import Store
    from engine.runtime import resolve_device
    from engine.training.latent_shards import encode_shards as encode, input_shards

    inputs = input_shards(source)
    store = Store()
    sd_name, _ = resolve_init(store, sd, None)
    dev = resolve_device(device)
    with progress_bars(interactive() and not as_json) as callback:
        summary = encode(inputs, target.expanduser().absolute(), store.folder(sd_name), resolution, dev, batch=batch,
                         part=int(index) - 1, parts=int(count), callback=callback)
    if as_json:
        print_json(summary)
        return
    done = f"{summary['encoded']} shard(s) encoded, {summary['skipped']} already done"
    if "conditions" in summary:
        counts = ", ".join(f"{c} {n}" for c, n in summary["conditions"].items())
        out.print(f"{done}; {summary['out']} holds {summary['shards']} latent shards ({counts}): train with "
                  f"train-base --shards '{summary['out']}/*.tar', or fit {summary['out']}", highlight=False)
    else:
        out.print(f"{done}; {summary['shards done']} of {summary['shards']} shards are done (the other parts' "
                  f"processes write the rest; the manifest comes with the last)", highlight=False)
