"""``ctrlora eval ADAPTER DATA``: how well an adapter's images follow their conditions."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ctrlora_cli.console import interactive, out
from ctrlora_cli.options import BaseOpt, DeviceOpt, JsonOpt, Precision, PrecisionOpt, SdOpt, SeedOpt, StepsOpt
from ctrlora_cli.options import print_json, retold
from engine.errors import UsageError

BARE = "none"  # ADAPTER value for the base alone, with no adapter
EvalStepsOpt = retold(StepsOpt, "Denoising steps per image.")
EvalSeedOpt = retold(SeedOpt, "Image i uses seed + i.")


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)


def evaluate(
    adapter: str = typer.Argument(..., help="Adapter (store name or .safetensors file), or 'none' for the bare base.",
                                  show_default=False),
    data: Path = typer.Argument(..., help="Held-out pairs in the fit layout (e.g. from 'ctrlora world make').",
                                show_default=False),
    base: BaseOpt = None,
    sd: SdOpt = None,
    kind: str | None = typer.Option(None, "--kind", help="Fidelity measure (default: the adapter's condition, else "
                                                         "the data set's, from its world.json)."),
    count: int | None = typer.Option(None, "--count", "-n", help="Evaluate the first N pairs (default: all)."),
    steps: EvalStepsOpt = 20,
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim | unipc | euler-a | dpm++"),
    seed: EvalSeedOpt = 0,
    batch: int = typer.Option(16, "--batch", help="Pairs generated together (memory, not the scores)."),
    save: Path | None = typer.Option(None, "--save", help="Also keep the generated images in this folder."),
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    as_json: JsonOpt = False,
) -> None:
    """Score an adapter on held-out pairs: generate from each condition, re-extract, compare."""
    from ctrlora_cli.progress import progress_bars
    from ctrlora_cli.store.resolve import adapter_file, base_folders, default_base, load_pipeline
    from ctrlora_cli.store.store import NotInStore, Store
    from engine.files import sha256_file
    from engine.training.pairs import describe_problems, scan_folder
    from engine.demo.evaluate import EvalSettings
    from engine.demo.evaluate import evaluate as run_eval
    from engine.demo.fidelity import KINDS

    for flag, value in (("--count", count), ("--batch", batch)):  # --steps: its option's own check
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    store = Store()
    bare = adapter.lower() == BARE
    adapters, condition = [], None
    try:  # a missing model is bad input here (exit 2), as in gen
        adapter_base = None if bare or Path(adapter).suffix == ".safetensors" else _adapter_base(store, adapter)
        base_manifest, cn_dir, sd_dir = base_folders(store, base or adapter_base or default_base(store), sd)
        if not bare:
            path, meta = adapter_file(store, adapter, base_manifest)
            adapters.append((path, meta, sha256_file(path)))
            condition = meta.get("condition")
    except NotInStore as exc:
        raise UsageError(str(exc)) from None
    kind = _kind(kind, condition, data, KINDS)

    show = interactive() and not as_json
    with progress_bars(show) as callback:
        pairs = scan_folder(data, callback=callback)
    if pairs.skipped:
        raise UsageError(f"{data}: {describe_problems(pairs.skipped, pairs.folder)}; fix or remove them")
    chosen = pairs.pairs[:count] if count else pairs.pairs

    pipe, names, _, _ = load_pipeline(sd_dir, cn_dir, adapters, device, precision.value, False)
    name = None if bare else next(iter(names.values()))
    settings = EvalSettings(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, batch=batch)
    with progress_bars(show) as callback:
        result = run_eval(pipe, name, chosen, kind, settings, save_dir=save, callback=callback)

    label = "the bare base" if bare else adapter
    summary = {"adapter": None if bare else adapter, "base": base_manifest.name, "data": str(data),
               "pairs": len(chosen), "steps": steps, "guidance": guidance, "seed": seed, **result.as_dict()}
    if as_json:
        print_json(summary)
        return
    direction = "higher" if result.higher_is_better else "lower"
    others = ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items() if k not in ("count", result.metric))
    out.print(f"{label} on {base_manifest.name}, {len(chosen)} {kind} pairs: [bold]{result.metric} "
              f"{result.value:.4f}[/bold] ({direction} is better; {others})", highlight=False)
    out.print(f"the data's own targets score {result.metric} {result.ceiling[result.metric]:.4f}", highlight=False)


def _adapter_base(store, name: str) -> str | None:
    """The base an adapter entry was made on, when it says so and the store still holds it."""
    manifest = store.get(name)
    base = (manifest.extra or {}).get("base")
    return base if base and store.exists(base) else None


def _kind(kind: str | None, condition: str | None, data: Path, kinds: tuple[str, ...]) -> str:
    if kind is None and condition in kinds:
        kind = condition
    if kind is None:
        about = Path(data) / "world.json"
        if about.is_file():
            kind = json.loads(about.read_text(encoding="utf-8")).get("condition")
    if kind is None:
        raise UsageError(f"cannot tell which fidelity measure to use; give --kind ({', '.join(kinds)})")
    if kind not in kinds:
        raise UsageError(f"no fidelity measure for {kind!r}; give --kind, one of {', '.join(kinds)}")
    return kind
