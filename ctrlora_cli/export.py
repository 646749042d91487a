"""``ctrlora export NAME -o FILE``: an adapter or base written for other tools (the work is done
by ``ctrlora_cli.store.export``; this module parses, calls and renders)."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from ctrlora_cli.console import ask, say, warn
from ctrlora_cli.options import JsonOpt, examples, print_json
from ctrlora_cli.store.export import export_entry
from ctrlora_cli.store.store import Store
from ctrlora_cli.tables import human_size


class Format(str, enum.Enum):
    official = "official"
    ours = "ours"


class Dtype(str, enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"


def register(app: typer.Typer) -> None:
    app.command("export", epilog=examples(
        "ctrlora export canny -o ctrlora_sd15_canny_rank128.safetensors",
        "ctrlora export mybase -o ctrlora_sd15_basecn700k.ckpt",
        "ctrlora export mosaic -o mosaic.safetensors --format ours --dtype fp16",
    ))(export)


def export(
    name: str | None = typer.Argument(None, show_default=False, help="An adapter or base in the store (see: ctrlora list)."),
    out: Path | None = typer.Option(None, "--out", "-o", show_default=False,
                                    help="The file to write: .safetensors, or .ckpt for a pickled dict (a base in "
                                         "our format: a folder)."),
    fmt: Format = typer.Option(Format.official, "--format", case_sensitive=False,
                               help="official: the published CtrLoRA layout (the reference code, ComfyUI-Advanced-"
                                    "ControlNet); ours: the store's own format."),
    dtype: Dtype = typer.Option(Dtype.fp32, "--dtype", case_sensitive=False,
                                help="Precision of the weights written (the official files are fp32)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: JsonOpt = False,
) -> None:
    """Write an adapter or base as a file the reference code and ComfyUI load.

    Examples: ctrlora export canny -o ctrlora_sd15_canny_rank128.safetensors |
    ctrlora export base -o basecn.ckpt | ctrlora export mosaic -o mosaic.safetensors --format ours --dtype fp16
    """
    if name is None:
        name = ask("Model to export", "which model? e.g. ctrlora export canny -o canny.safetensors", batch=as_json)
    if out is None:
        out = Path(ask("File to write", "where to? pass -o FILE (e.g. -o canny.safetensors)", batch=as_json))
    done = export_entry(Store(), name, out, fmt.value, dtype.value, force)
    if as_json:
        print_json(done)
        return
    what = f"{done['kind']} {done['condition']}, rank {done['rank']}" if done["kind"] == "adapter" else done["kind"]
    say(f"wrote {done['path']} ({what}, {done['arch']}, {done['format']} layout, {done['dtype']}, "
        f"{done['tensors']} tensors, {human_size(done['bytes'])})")
    for note in done["notes"]:
        warn(note) if "will not load" in note else say(f"note: {note}")
