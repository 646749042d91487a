"""``ctrlora show NAME``: one entry's manifest, parameter counts and files."""

from __future__ import annotations

import json
import math

import typer
from rich.markup import escape

from ctrlora_cli.console import ask, out
from ctrlora_cli.list import human_size, print_table, source_label
from ctrlora_cli.store.store import Manifest, Store


def register(app: typer.Typer) -> None:
    app.command("show")(show)


def show(
    name: str | None = typer.Argument(None, show_default=False, help="A store name (see: ctrlora list)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a model: what it is, where it came from, its parameters and files."""
    store = Store()
    if name is None:
        name = ask("Model to show", "which model? e.g. ctrlora show base (see: ctrlora list)")
    manifest = store.get(name)
    params = parameter_counts(store, manifest)
    if as_json:
        typer.echo(json.dumps(dict(manifest.to_json(), size=manifest.size, parameters=params), indent=2))
        return
    from rich.table import Table

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    rows = [("name", manifest.name), ("kind", manifest.kind), ("architecture", manifest.arch),
            ("condition", manifest.condition), ("rank", manifest.rank and str(manifest.rank)),
            ("pairs with", manifest.sd and f"{manifest.sd} (Stable Diffusion)"),
            ("source", _source_detail(manifest.source)),
            ("converted from", manifest.converted_from and _converted(manifest.converted_from)),
            ("labels", ", ".join(manifest.labels)), ("notes", manifest.notes),
            ("created", manifest.created), ("size", human_size(manifest.size))]
    for key, value in rows:
        if value:
            facts.add_row(key, escape(str(value)))
    for key, value in params.items():
        facts.add_row("parameters" if key == "total" else f"  {key}", f"{value:,}")
    for key, value in sorted(manifest.extra.items()):
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


def _source_detail(source: dict) -> str:
    if source.get("type") == "hub":
        text = f"hf://{source['repo']}" + (f"/{source['path']}" if source.get("path") else "")
        text += f" at {source.get('revision')} = {source.get('commit')}"
        return text + (f" ({source['endpoint']})" if source.get("endpoint") else "")
    if source.get("type") == "local":
        return source.get("path", "")
    return source_label(source)


def _converted(info: dict) -> str:
    text = f"{info.get('file')} ({info.get('format', '?')}, sha256 {str(info.get('sha256', ''))[:12]}...)"
    if info.get("embedded_adapter_rank"):
        text += f"; its embedded rank-{info['embedded_adapter_rank']} condition was left out"
    return text


def parameter_counts(store: Store, manifest: Manifest) -> dict[str, int]:
    """Parameter counts from the safetensors headers (no tensor is read, torch is not needed)."""
    counts: dict[str, int] = {}
    for record in manifest.files:
        blob = store.blob_path(record.digest)
        if not record.path.endswith(".safetensors") or not blob.is_file():
            continue
        for key, shape in _safetensors_shapes(blob).items():
            group = _group(manifest.kind, record.path, key)
            counts[group] = counts.get(group, 0) + math.prod(shape)
    total = sum(counts.values())
    if manifest.kind == "base":
        return {"total": total}
    return {"total": total, **dict(sorted(counts.items()))}


def _safetensors_shapes(path) -> dict[str, list[int]]:
    """The tensor shapes in a safetensors header: 8 bytes of length (little endian), then JSON."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > 100_000_000:
            return {}
        header = json.loads(f.read(length))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _group(kind: str, path: str, key: str) -> str:
    if kind == "adapter":
        if ".lora_A." in key or ".lora_B." in key:
            return "LoRA"
        if key.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
            return "zero convs"
        return "norms"
    return path.split("/")[0] if "/" in path else "weights"
