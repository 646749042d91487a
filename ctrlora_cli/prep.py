"""``ctrlora prep``: make condition images from a picture or a folder, with a built-in extractor
or an annotator network (``engine.annotators``)."""

from __future__ import annotations

from pathlib import Path

import typer

from ctrlora_cli.completion import extractor_kinds
from ctrlora_cli.console import ask, out
from ctrlora_cli.options import DeviceOpt, JsonOpt, examples, print_json
from ctrlora_cli.progress import progress_bars
from engine.errors import SettingError
from engine.progress import report


def register(app: typer.Typer) -> None:
    app.command("prep", epilog=examples(
        'ctrlora prep canny photo.png -o edges.png --param low=50 --param high=150',
        'ctrlora prep mosaic photo.png -o mosaic.png --param block=16',
        'ctrlora prep --list',
    ))(prep)


def prep(
    kind: str | None = typer.Argument(None, help="Condition kind: canny, grayscale, blur, mosaic, palette, "
                                                 "outpainting, inpainting, bbox, sketch, or with an annotator "
                                                 "network: depth, normal, seg, hed, hedsketch, lineart, "
                                                 "lineart_coarse, openpose (see --list).",
                                  autocompletion=extractor_kinds),
    image: Path | None = typer.Argument(None, help="The picture to make the condition from, or a folder of them."),
    output: Path | None = typer.Option(None, "-o", "--out",
                                       help="Where to write it (.png, .jpg, .webp; default: IMAGE-KIND.png in the "
                                            "current folder); for a folder, the folder to write into (default: "
                                            "FOLDER-KIND)."),
    param: list[str] = typer.Option([], "--param", metavar="KEY=VALUE",
                                    help="A parameter, e.g. --param low=50 --param high=150; repeatable."),
    device: DeviceOpt = "auto",
    batch: int = typer.Option(4, "--batch", help="Images of one size through an annotator network at once."),
    force: bool = typer.Option(False, "--force", help="Replace files already in the output folder."),
    list_kinds: bool = typer.Option(False, "--list", help="List the kinds, their parameters and annotators."),
    as_json: JsonOpt = False,
) -> None:
    """Make a condition image (edges, masks, depth, pose, ...) from a picture or a folder of them."""
    from engine import annotators
    from engine.demo import extractors

    if list_kinds:
        _list(as_json)
        return
    if kind is None or image is None:
        refusal = ("give KIND and IMAGE, e.g. ctrlora prep canny photo.png -o edges.png "
                   "(ctrlora prep --list shows the kinds)")
        kind = kind or ask(f"Condition kind ({', '.join([*extractors.SPECS, *annotators.ANNOTATORS])})", refusal,
                           batch=as_json)
        image = image or Path(ask("Image file or folder", refusal, batch=as_json))

    annotator = annotators.resolve(kind)
    if annotator is not None:
        name, params = annotator.kind, annotators.check_params(annotator, _parse_params(param))
    else:
        name = extractors.resolve_kind(kind)
        params = extractors.SPECS[name].check(_parse_params(param))  # before torch loads (engine.images)
    from engine.checks import at_least
    from engine.images import check_writable_image_path, load_image, save_image

    at_least("batch", batch, 1)
    from ctrlora_cli.annotate import pairs_for

    pairs = pairs_for(image, output, name, force)
    if annotator is not None:
        from ctrlora_cli.annotate import weights
        from engine.runtime import resolve_device

        annotators.require(name)
        folder, device = weights(annotator), resolve_device(device)
    else:
        check_writable_image_path(pairs[0][1])
    if image.is_dir():
        pairs[0][1].parent.mkdir(parents=True, exist_ok=True)
    pictures = (load_image(source) for source, _ in pairs)
    with progress_bars(False if as_json or len(pairs) == 1 else None) as on_progress:
        if annotator is not None:
            made = annotators.annotate(name, pictures, folder, device=device, batch=batch, on_progress=on_progress,
                                       total=len(pairs), **params)
        else:
            made = (extractors.extract(name, p, **params) for p in pictures)
        for done, ((_, target), condition) in enumerate(zip(pairs, made), 1):
            save_image(condition, target)
            if annotator is None:
                report(on_progress, name, done, len(pairs))
    if as_json:
        print_json({"kind": name, "image": str(image), "output": str(pairs[0][1]) if image.is_file() else
                    str(pairs[0][1].parent), "count": len(pairs), "size": list(condition.size),
                    "params": _jsonable(params)})
    elif image.is_file():
        out.print(f"wrote {pairs[0][1]} ({name}, {condition.width}x{condition.height})", highlight=False)
    else:
        out.print(f"wrote {len(pairs)} images to {pairs[0][1].parent} ({name})", highlight=False)


def _parse_params(items: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingError("param", f"expects KEY=VALUE, not {item!r}")
        params[key.strip()] = value.strip()
    return params


def _jsonable(params: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def _list(as_json: bool) -> None:
    from engine.demo.extractors import ALIASES, SPECS

    if as_json:
        kinds = [{"kind": spec.name, "help": spec.help,
                  "aliases": sorted(a for a, n in ALIASES.items() if n == spec.name),
                  "params": [{"name": p.name, "type": p.type, "default": _jsonable({"d": p.default})["d"],
                              "help": p.help, "min": p.min, "max": p.max, "choices": list(p.choices) or None}
                             for p in spec.params]}
                 for spec in SPECS.values()]
        from ctrlora_cli.annotate import listing

        print_json({"kinds": kinds, "annotators": listing()})
        return
    from rich.markup import escape
    from rich.table import Table

    for spec in SPECS.values():
        aliases = sorted(a for a, n in ALIASES.items() if n == spec.name)
        also = f" [dim](also: {', '.join(aliases)})[/dim]" if aliases else ""
        out.print(f"[bold]{spec.name}[/bold]: {escape(spec.help)}{also}", highlight=False)
        if spec.params:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(no_wrap=True)
            grid.add_column()
            for p in spec.params:
                grid.add_row(f"  --param {escape(p.describe())}", escape(p.help))
            out.print(grid, highlight=False)
    from ctrlora_cli.annotate import show_listing

    show_listing(out)
