"""``ctrlora prep``: make a condition image from a picture with a built-in extractor."""

from __future__ import annotations

from pathlib import Path

import typer

from ctrlora_cli.completion import extractor_kinds
from ctrlora_cli.console import ask, out
from ctrlora_cli.options import JsonOpt, examples, print_json
from engine.errors import SettingError


def register(app: typer.Typer) -> None:
    app.command("prep", epilog=examples(
        'ctrlora prep canny photo.png -o edges.png --param low=50 --param high=150',
        'ctrlora prep mosaic photo.png -o mosaic.png --param block=16',
        'ctrlora prep --list',
    ))(prep)


def prep(
    kind: str | None = typer.Argument(None, help="Condition kind: canny, grayscale, blur, mosaic, palette, "
                                                 "outpainting, inpainting, bbox, sketch (see --list).",
                                  autocompletion=extractor_kinds),
    image: Path | None = typer.Argument(None, help="The picture to make the condition from."),
    output: Path | None = typer.Option(None, "-o", "--out",
                                       help="Where to write it (.png, .jpg, .webp; default: IMAGE-KIND.png "
                                            "in the current folder)."),
    param: list[str] = typer.Option([], "--param", metavar="KEY=VALUE",
                                    help="An extractor parameter, e.g. --param low=50 --param high=150; repeatable."),
    list_kinds: bool = typer.Option(False, "--list", help="List the built-in kinds and their parameters."),
    as_json: JsonOpt = False,
) -> None:
    """Make a condition image (edges, masks, mosaic, ...) from a picture, with no network."""
    from engine.demo import extractors

    if list_kinds:
        _list(as_json)
        return
    if kind is None or image is None:
        refusal = ("give KIND and IMAGE, e.g. ctrlora prep canny photo.png -o edges.png "
                   "(ctrlora prep --list shows the kinds)")
        kind = kind or ask(f"Condition kind ({', '.join(extractors.SPECS)})", refusal, batch=as_json)
        image = image or Path(ask("Image file", refusal, batch=as_json))

    name = extractors.resolve_kind(kind)
    params = extractors.SPECS[name].check(_parse_params(param))  # before torch loads (engine.images)

    from engine.images import check_writable_image_path, load_image, save_image

    output = check_writable_image_path(output or Path(f"{image.stem}-{name}.png"))
    picture = load_image(image)
    condition = extractors.extract(name, picture, **params)
    save_image(condition, output)
    if as_json:
        print_json({"kind": name, "image": str(image), "output": str(output), "size": list(condition.size),
                    "params": _jsonable(params)})
    else:
        out.print(f"wrote {output} ({name}, {condition.width}x{condition.height})", highlight=False)


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
    from engine.demo.extractors import ALIASES, NEEDS_ANNOTATOR, SPECS

    if as_json:
        kinds = [{"kind": spec.name, "help": spec.help,
                  "aliases": sorted(a for a, n in ALIASES.items() if n == spec.name),
                  "params": [{"name": p.name, "type": p.type, "default": _jsonable({"d": p.default})["d"],
                              "help": p.help, "min": p.min, "max": p.max, "choices": list(p.choices) or None}
                             for p in spec.params]}
                 for spec in SPECS.values()]
        print_json({"kinds": kinds, "needs_annotator": list(NEEDS_ANNOTATOR)})
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
    out.print(f"Need an annotator network (give a ready condition image instead): {', '.join(NEEDS_ANNOTATOR)}",
              highlight=False)
