"""``ctrlora eval ADAPTER DATA``: how well an adapter's images follow their conditions."""

from __future__ import annotations

from pathlib import Path

import typer

from ctrlora_cli.completion import adapter_names, fidelity_kinds
from ctrlora_cli.console import go_on_despite, interactive, out
from ctrlora_cli.options import BaseOpt, DeviceOpt, JsonOpt, Precision, PrecisionOpt, SdOpt, SeedOpt, StepsOpt, examples
from ctrlora_cli.options import YesOpt, print_json, retold
from engine.demo.settings import EvalSettings
from engine.generation.settings import SCHEDULERS
from engine.errors import UsageError

EVAL = EvalSettings()  # the defaults
BARE = "none"  # ADAPTER value for the base alone, with no adapter
EvalStepsOpt = retold(StepsOpt, "Denoising steps per image.")
EvalSeedOpt = retold(SeedOpt, "Image i uses seed + i.")


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=examples(
        'ctrlora eval demo-sketch heldout',
        'ctrlora eval none heldout --base demo --kind sketch',
        'ctrlora eval mine.safetensors pairs/ --kind canny -n 50 --save out/ --json',
    ))(evaluate)


def evaluate(
    adapter: str = typer.Argument(..., help="Adapter (store name or .safetensors file), or 'none' for the bare base.",
                                  show_default=False, autocompletion=adapter_names),
    data: Path = typer.Argument(..., help="Held-out pairs in the fit layout (e.g. from 'ctrlora world make').",
                                show_default=False),
    base: BaseOpt = None,
    sd: SdOpt = None,
    kind: str | None = typer.Option(None, "--kind", help="Fidelity measure (default: the adapter's condition, else "
                                                         "the data set's, from its world.json).",
                                        autocompletion=fidelity_kinds),
    count: int | None = typer.Option(None, "--count", "-n", help="Evaluate the first N pairs (default: all)."),
    steps: EvalStepsOpt = EVAL.steps,
    guidance: float = typer.Option(EVAL.guidance, "--guidance", help="Classifier-free guidance scale, at least 0."),
    scheduler: str = typer.Option(EVAL.scheduler, "--scheduler", help=" | ".join(SCHEDULERS)),
    seed: EvalSeedOpt = EVAL.seed,
    batch: int = typer.Option(EVAL.batch, "--batch", help="Pairs generated together (memory, not the scores)."),
    save: Path | None = typer.Option(None, "--save", help="Also keep the generated images in this folder."),
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score an adapter on held-out pairs: generate from each condition, re-extract, compare."""
    from engine.checks import at_least

    # Ranges first, before anything loads.
    settings = EvalSettings(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, batch=batch).check()
    if count is not None:
        at_least("count", count, 1)

    from ctrlora_cli.progress import progress_bars
    from ctrlora_cli.store.resolve import adapter_file, base_folders, base_for, base_warning, load_pipeline
    from ctrlora_cli.store.store import NotInStore, Store
    from engine.files import sha256_file
    from engine.training.pairs import describe_problems, scan_folder
    from engine.demo.evaluate import evaluate as run_eval
    from engine.demo.fidelity import KINDS

    store = Store()
    bare = adapter.lower() == BARE
    adapters, condition, warnings = [], None, []
    try:  # a missing model is bad input here (exit 2), as in gen
        base_manifest, cn_dir, sd_dir = base_folders(store, base_for(store, [] if bare else [adapter], base), sd)
        if not bare:
            path, meta = adapter_file(store, adapter, base_manifest)
            adapters.append((path, meta, sha256_file(path)))
            condition = meta.get("condition")
            warnings = [w for w in [base_warning(store, adapter, base_manifest)] if w]
    except NotInStore as exc:
        raise UsageError(str(exc)) from None
    kind = _kind(kind, condition, data, KINDS)
    go_on_despite(warnings, yes, batch=as_json)

    show = interactive() and not as_json
    with progress_bars(show) as callback:
        pairs = scan_folder(data, callback=callback)
    if pairs.skipped:
        raise UsageError(f"{data}: {describe_problems(pairs.skipped, pairs.folder)}; fix or remove them")
    chosen = pairs.pairs[:count] if count else pairs.pairs

    pipe, names, _, _ = load_pipeline(sd_dir, cn_dir, adapters, device, precision.value, False)
    name = None if bare else next(iter(names.values()))
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


def _kind(kind: str | None, condition: str | None, data: Path, kinds: tuple[str, ...]) -> str:
    from engine.demo.world import recorded_condition

    if kind is None and condition in kinds:
        kind = condition
    if kind is None:
        kind = recorded_condition(data)
    if kind is None:
        raise UsageError(f"cannot tell which fidelity measure to use; give --kind ({', '.join(kinds)})")
    if kind not in kinds:
        raise UsageError(f"no fidelity measure for {kind!r}; give --kind, one of {', '.join(kinds)}")
    return kind
