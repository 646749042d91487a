"""The face's side of ``prep`` beyond one image and a built-in extractor: which files a folder
maps to, annotators' weights from the store (or the pull that fetches them), and the listing
``prep --list`` shows."""

from __future__ import annotations

from pathlib import Path


def weights(annotator) -> Path:
    """The store folder holding ``annotator``'s weights; a missing entry names its pull."""
    from ctrlora_cli.store.store import Store
    from engine.errors import UsageError

    store = Store()
    if not store.exists(annotator.entry):
        raise UsageError(f"{annotator.kind} needs an annotator network's weights ({annotator.entry!r}), not in the "
                         f"store; fetch them once with: ctrlora pull {annotator.entry}")
    return store.folder(annotator.entry)


def prepared(kind: str, image, **params):
    """One image through an annotator (for ``gen --prep``): the extra and the weights checked first."""
    from engine import annotators

    annotator = annotators.resolve(kind)
    annotators.require(annotator.kind)
    return next(iter(annotators.annotate(annotator.kind, [image], weights(annotator), **params)))


def listing() -> list[dict]:
    from engine.annotators import ANNOTATORS

    return [{"kind": a.kind, "network": a.network, "source": a.source, "pull": f"ctrlora pull {a.entry}",
             "reference": a.reference, "differs": a.differs or None, "adapter_saw": a.adapter,
             "params": [{"name": p.name, "type": p.type, "default": p.default, "help": p.help, "min": p.min,
                         "max": p.max} for p in a.params]}
            for a in ANNOTATORS.values()]


def show_listing(out) -> None:
    from rich.markup import escape

    out.print("[bold]Annotators[/bold] (a network; weights through ctrlora pull; needs pip install "
              "'ctrlora\\[annotators]'):", highlight=False)
    for item in listing():
        params = " ".join(f"-p {p['name']}={p['default']}" for p in item["params"])
        out.print(f"[bold]{item['kind']}[/bold]: {escape(item['network'])} from {escape(item['source'])} "
                  f"([dim]{item['pull']}[/dim]); {escape(params)}", highlight=False)
        out.print(f"  reference: {escape(item['reference'])}" + (f"; ours differs: {escape(item['differs'])}"
                                                                  if item["differs"] else "; ours is the same"),
                  highlight=False)


_IMAGES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def pairs_for(image: Path, output: Path | None, kind: str, force: bool) -> list[tuple[Path, Path]]:
    """(picture, where its condition goes) for an image, or for every image in a folder; a folder's
    outputs (PNG, by name) that exist already are refused unless --force."""
    from engine.errors import UsageError

    if not image.is_dir():
        return [(image, output or Path(f"{image.stem}-{kind}.png"))]
    sources = sorted(p for p in image.iterdir() if p.suffix.lower() in _IMAGES and p.is_file())
    if not sources:
        raise UsageError(f"{image} holds no images ({', '.join(_IMAGES)})")
    target = output or image.with_name(f"{image.name}-{kind}")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file; -o for a folder of images names a folder")
    pairs = [(p, target / f"{p.stem}.png") for p in sources]
    taken = [str(t) for _, t in pairs if t.exists()]
    if taken and not force:
        raise UsageError(f"{len(taken)} outputs exist already ({taken[0]}, ...); add --force to replace them")
    return pairs
