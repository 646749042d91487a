"""``ctrlora fit``: a new condition's adapter from a folder of pairs, straight into the store."""

from __future__ import annotations

from pathlib import Path

import typer

from ctrlora_cli.console import ask, err, interactive, out, warn
from ctrlora_cli.options import BaseOpt, DeviceOpt, Precision, PrecisionOpt, SdOpt, SeedOpt, StepsOpt, retold
from engine.training.settings import FitConfig

DATA_HELP = """Folder of training pairs: either prompt.json (JSON lines {"source", "target", "prompt"}) with
source/ and target/, or source/ and target/ with matching file names and prompts in prompts.jsonl
({"name", "prompt"} lines) or one .txt per image."""
FIT = FitConfig()  # the defaults
FitBaseOpt = retold(BaseOpt, "Base ControlNet to fit on (default: the only one, or 'base').")
FitStepsOpt = retold(StepsOpt, "Optimizer steps.")
FitSeedOpt = retold(SeedOpt, "Seed for the adapter's init, the data order and the noise.")
FitPrecisionOpt = retold(PrecisionOpt, "auto: bf16 on GPU, fp32 on CPU; fp32 or bf16 (fit keeps fp32 master "
                                       "weights either way).")


def register(app: typer.Typer) -> None:
    app.command("fit")(fit)


def fit(
    data: Path = typer.Argument(..., help=DATA_HELP, show_default=False),
    name: str | None = typer.Option(None, "--name", help="Store name of the new adapter (asked for when interactive)."),
    base: FitBaseOpt = None,
    sd: SdOpt = None,
    rank: int = typer.Option(FIT.rank, "--rank", help="LoRA rank."),
    steps: FitStepsOpt = FIT.steps,
    batch: int = typer.Option(FIT.batch, "--batch", help="Pairs per forward pass."),
    grad_accum: int = typer.Option(FIT.grad_accum, "--grad-accum", help="Forward passes per optimizer step."),
    lr: float = typer.Option(FIT.lr, "--lr", help="AdamW learning rate."),
    resolution: int = typer.Option(FIT.resolution, "--resolution",
                                   help="Training size (short side resized, centre crop)."),
    precision: FitPrecisionOpt = Precision(FIT.precision),
    grad_checkpointing: bool = typer.Option(FIT.grad_checkpointing, "--grad-checkpointing",
                                            help="Recompute activations: less memory, slower."),
    drop_prompt: float = typer.Option(FIT.drop_prompt, "--drop-prompt",
                                      help="Probability of training on the empty prompt."),
    val_every: int = typer.Option(FIT.val_every, "--val-every", help="Save a validation grid every N steps (0: never)."),
    val_prompt: list[str] = typer.Option([], "--val-prompt",
                                         help="Validation prompt (repeatable; default: the first pair's)."),
    val_cond: list[Path] = typer.Option([], "--val-cond",
                                        help="Validation condition image (repeatable; default: the first two pairs')."),
    save_every: int = typer.Option(FIT.save_every, "--save-every",
                                   help="Write a checkpoint every N steps (0: only at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last checkpoint."),
    seed: FitSeedOpt = FIT.seed,
    workers: int = typer.Option(FIT.workers, "--workers", help="Threads that read and decode images."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out bad pairs instead of stopping."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run folder [default: <store>/runs/NAME]",
                                        show_default=False),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Latent cache [default: <store>/cache/latents]",
                                          show_default=False),
    device: DeviceOpt = FIT.device,
) -> None:
    """Fit a new condition's adapter on a Base ControlNet from about 1,000 image pairs."""
    from ctrlora_cli.store.resolve import base_folders, default_base
    from ctrlora_cli.store.names import validate_name
    from ctrlora_cli.store.store import Store
    from ctrlora_cli.store.results import add_fitted_adapter, weights_digest
    from engine.errors import UsageError

    store = Store()
    if name is None:
        name = ask("Name for the new adapter", "missing --name: the store name for the new adapter")
    validate_name(name)
    if store.exists(name):
        raise UsageError(f"{name!r} is already in the store; pick another --name")
    base_manifest, controlnet_dir, sd_dir = base_folders(store, base or default_base(store), sd)
    # The cheap checks are done; now the heavy libraries.
    import torch

    from ctrlora_cli.progress import progress_bars
    from engine.training.pairs import describe_problems, scan_folder
    from engine.training.fit import fit as run_fit
    from engine.models.storage import load_base, load_sd

    config = FitConfig(condition=name, rank=rank, steps=steps, batch=batch, grad_accum=grad_accum, lr=lr,
                       resolution=resolution, precision=precision.value, grad_checkpointing=grad_checkpointing,
                       drop_prompt=drop_prompt, val_every=val_every, val_prompts=list(val_prompt),
                       val_conds=[str(p) for p in val_cond], save_every=save_every, seed=seed, workers=workers,
                       device=device).resolved()
    run_dir = run_dir or store.root / "runs" / name
    cache_dir = cache_dir or store.root / "cache" / "latents"

    show = interactive()
    with progress_bars(show, describe=_describe) as callback:
        pairs = scan_folder(data, skip_bad=skip_bad, workers=workers, callback=callback)
    if pairs.skipped:
        warn(f"left out {describe_problems(pairs.skipped, pairs.folder)}")
    if show:
        err.print(f"{len(pairs.pairs)} pairs ({pairs.layout} layout); training on {config.device} in "
                  f"{config.precision}; run folder {run_dir}", highlight=False)

    sd_components = load_sd(sd_dir)
    controlnet = load_base(controlnet_dir)
    try:
        with progress_bars(show, describe=_describe) as callback:
            result = run_fit(pairs, sd=sd_components, controlnet=controlnet, run_dir=run_dir, cache_dir=cache_dir,
                             config=config, resume=resume, base_digest=weights_digest(base_manifest),
                             callback=callback)
    except KeyboardInterrupt:
        err.print(f"interrupted; continue from the last checkpoint with the same command and --resume "
                  f"(run folder {run_dir})", highlight=False)
        raise typer.Exit(130)
    finally:
        del sd_components, controlnet
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    add_fitted_adapter(store, name, result, base_manifest, config, data, run_dir)
    out.print(f"fitted {name}: {result.steps} steps on {result.pairs} pairs in {_duration(result.seconds)}, "
              f"loss {result.final_loss:.4f} (moving average); run folder {result.run_dir}", highlight=False)
    out.print(f"use it: ctrlora gen --base {base_manifest.name} --cond {name}=CONDITION.png -p PROMPT", highlight=False)


def _describe(event) -> str:
    info = event.info
    if event.task == "train":
        parts = [f"loss {info['loss_smooth']:.4f}", f"{info['it_s']:.2f} it/s", f"{info['images_s']:.1f} img/s"]
        if info.get("eta_s") is not None:
            parts.append(f"ETA {_duration(info['eta_s'])}")
        if info.get("memory_gb") is not None:
            parts.append(f"GPU {info['memory_gb']:.1f} GB")
        return " · ".join(parts)
    if event.task == "encode" and "cached" in info:
        return f"{info['cached']} already cached"
    if event.task == "validate":
        return f"step {info['step']}"
    return ""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
