"""``ctrlora fit``: a new condition's adapter from a folder of pairs (or of latent shards), straight into the store."""

from __future__ import annotations

from pathlib import Path

import typer

from ctrlora_cli import envconfig
from ctrlora_cli.console import ask, err, interactive, out, warn
from ctrlora_cli.options import BaseOpt, DeviceOpt, JsonOpt, LogToOpt, Precision, PrecisionOpt, SdOpt, SeedOpt, StepsOpt
from ctrlora_cli.options import examples, print_json, retold
from engine.training.settings import FitConfig

DATA_HELP = """Folder of training pairs: either prompt.json (JSON lines {"source", "target", "prompt"}) with
source/ and target/, or source/ and target/ with matching file names and prompts in prompts.jsonl
({"name", "prompt"} lines) or one .txt per image. Or a folder of latent shards (`ctrlora encode-shards`' OUT):
trained from without loading the VAE."""
FIT = FitConfig()  # the defaults
FitBaseOpt = retold(BaseOpt, "Base ControlNet to fit on (default: with --resume, the run's; else the only one, or "
                             "'base').")
FitStepsOpt = retold(StepsOpt, "Optimizer steps.")
FitSeedOpt = retold(SeedOpt, "Seed for the adapter's init, the data order and the noise.")
FitPrecisionOpt = retold(PrecisionOpt, "auto: bf16 on GPU and on CPUs with native bf16 (AVX512-BF16, AMX), "
                                       "else fp32; fp32 or bf16 (fit keeps fp32 master weights either way).")


def register(app: typer.Typer) -> None:
    app.command("fit", epilog=examples("ctrlora fit ./my-pairs --name mosaic", "ctrlora fit ./my-pairs --name mosaic "
                                       "--resume", "ctrlora fit ./my-pairs --name mosaic --steps 200 --json",
                                       "ctrlora fit /data/latents --name mosaic --condition mosaic"))(fit)


def fit(
    data: Path = typer.Argument(..., help=DATA_HELP, show_default=False),
    name: str | None = typer.Option(None, "--name", help="Store name of the new adapter (asked for when interactive)."),
    condition: str | None = typer.Option(None, "--condition", help="The condition's name, recorded in the adapter "
                                                                   "(what eval measures); of latent shards, the one "
                                                                   "to fit [default: the data's own (world.json, the "
                                                                   "shards' only one), else NAME]", show_default=False),
    base: FitBaseOpt = None,
    sd: SdOpt = None,
    rank: int = typer.Option(FIT.rank, "--rank", help="LoRA rank, at least 1."),
    steps: FitStepsOpt = FIT.steps,
    batch: int = typer.Option(FIT.batch, "--batch", help="Pairs per forward pass."),
    grad_accum: int = typer.Option(FIT.grad_accum, "--grad-accum", help="Forward passes per optimizer step."),
    lr: float = typer.Option(FIT.lr, "--lr", help="AdamW learning rate, above 0."),
    resolution: int = typer.Option(FIT.resolution, "--resolution",
                                   help="Training size, a multiple of 8 (short side resized, centre crop)."),
    precision: FitPrecisionOpt = Precision(FIT.precision),
    grad_checkpointing: bool = typer.Option(FIT.grad_checkpointing, "--grad-checkpointing",
                                            help="Recompute activations: less memory, slower."),
    drop_prompt: float = typer.Option(FIT.drop_prompt, "--drop-prompt",
                                      help="Probability of training on the empty prompt, 0 to 1."),
    val_every: int = typer.Option(FIT.val_every, "--val-every", help="Save a validation grid every N steps (0: never)."),
    val_prompt: list[str] = typer.Option([], "--val-prompt",
                                         help="Validation prompt (repeatable; default: the first pair's)."),
    val_cond: list[Path] = typer.Option([], "--val-cond",
                                        help="Validation condition image (repeatable; default: the first two pairs')."),
    save_every: int = typer.Option(FIT.save_every, "--save-every",
                                   help="Write a checkpoint every N steps (0: only at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace an entry NAME in the store; without --resume, also "
                                                      "start over a run left in --run-dir."),
    seed: FitSeedOpt = FIT.seed,
    workers: int = typer.Option(FIT.workers, "--workers", help="Threads that read and decode images."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out bad pairs instead of stopping."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run folder [default: <store>/runs/NAME]",
                                        show_default=False),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Latent cache [default: <store>/cache/latents]",
                                          show_default=False),
    device: DeviceOpt = FIT.device,
    as_json: JsonOpt = False,
    log_to: LogToOpt = None,
) -> None:
    """Fit a new condition's adapter on a Base ControlNet from about 1,000 image pairs."""
    from dataclasses import replace

    from ctrlora_cli.store.names import validate_name
    from ctrlora_cli.store.store import Store
    from engine.errors import SettingError, UsageError

    # Ranges first (no torch): nobody should answer a question only to have --lr refused after it.
    config = FitConfig(rank=rank, steps=steps, batch=batch, grad_accum=grad_accum, lr=lr, resolution=resolution,
                       precision=precision.value, grad_checkpointing=grad_checkpointing, drop_prompt=drop_prompt,
                       val_every=val_every, val_prompts=list(val_prompt), val_conds=[str(p) for p in val_cond],
                       save_every=save_every, seed=seed, workers=workers, device=device).check()
    if condition is not None and not condition.strip():
        raise SettingError("condition", "must not be empty")
    from ctrlora_cli.tensorboard_log import TensorBoardLog, check_available

    check_available(log_to)
    store = Store()
    if name is None:
        name = ask("Name for the new adapter", "missing --name: the store name for the new adapter", batch=as_json)
    validate_name(name)
    store.claim(name, force, "--name")
    run_dir = run_dir or store.run_folder(name, "fit")

    from ctrlora_cli.store.resolve import base_folders, default_base, run_base
    from ctrlora_cli.store.results import add_fitted_adapter, weights_digest
    from engine.demo.world import recorded_condition
    from engine.training import fit as fitting
    from engine.models.storage import unet_width
    from engine.training.latent_shards import fit_source, read_condition

    try:
        fitting.check_run_folder(run_dir, resume, restart=force)
    except fitting.RunFolderTaken as exc:
        raise SettingError("run_dir", f"{run_dir} already holds a run of {name!r} ({exc.progress}); continue it with "
                                      "--resume, start over in it with --force, or delete the folder") from None
    base = base or (run_base(store, run_dir) if resume else None) or default_base(store)
    base_manifest, controlnet_dir, sd_dir = base_folders(store, base, sd)
    envconfig.apply_cpu_bf16()  # CTRLORA_CPU_BF16, before auto is decided
    latent = fit_source(data, condition and condition.strip(), config, sd_dir)  # None: a folder of pairs
    picked = latent[2] if latent else (condition or recorded_condition(data) or name).strip()
    config = replace(config, condition=picked).resolved(width=unet_width(sd_dir))
    cache_dir = cache_dir or store.root / "cache" / "latents"

    # The cheap checks are done; now the heavy work.
    import torch

    from ctrlora_cli.progress import describe_fit, duration, progress_bars
    from engine.training.pairs import describe_problems, scan_folder
    from engine.models.storage import load_base, load_sd

    show = interactive()
    with progress_bars(show, describe=describe_fit) as callback:
        if latent:
            pairs = read_condition(data, *latent, callback)  # the condition picked: config.condition
        else:
            pairs = scan_folder(data, skip_bad=skip_bad, workers=workers, callback=callback)
    if not latent and pairs.skipped:
        warn(f"left out {describe_problems(pairs.skipped, pairs.folder)}")
    if show:
        kind = "from latent shards" if latent else f"({pairs.layout} layout)"
        err.print(f"{len(pairs)} pairs {kind} of condition {config.condition!r}; training on "
                  f"{config.device} in {config.precision}; run folder {run_dir}", highlight=False)

    # From latent shards the VAE is loaded only for validation grids (--val-every), never for training.
    sd_components = load_sd(sd_dir, vae=not latent or bool(config.val_every))
    controlnet = load_base(controlnet_dir)
    board = TensorBoardLog(run_dir) if log_to else None
    try:
        with progress_bars(show, describe=describe_fit) as callback:
            result = fitting.fit(pairs, sd=sd_components, controlnet=controlnet, run_dir=run_dir, cache_dir=cache_dir,
                                 config=config, resume=resume, restart=force, base_digest=weights_digest(base_manifest),
                                 callback=board.fit_listener(callback) if board else callback)
    except KeyboardInterrupt:
        err.print(f"interrupted; continue from the last checkpoint with the same command and --resume "
                  f"(run folder {run_dir})", highlight=False)
        raise typer.Exit(130)
    finally:
        if board:
            board.close()
        del sd_components, controlnet
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    try:  # again: the name may have been taken while this ran
        store.claim(name, force, "--name")
    except UsageError as exc:
        raise UsageError(f"{exc} (the adapter is in {result.adapter_file})") from None
    add_fitted_adapter(store, name, result, base_manifest, config, data, run_dir)
    if as_json:
        print_json({"name": name, "condition": config.condition, "base": base_manifest.name, "steps": result.steps,
                    "pairs": result.pairs, "seconds": round(result.seconds, 1), "final_loss": result.final_loss,
                    "resumed_from": result.resumed_from, "run_dir": str(result.run_dir)})
        return
    about = f" (condition {config.condition})" if config.condition != name else ""
    out.print(f"fitted {name}{about}: {result.steps} steps on {result.pairs} pairs in "
              f"{duration(result.seconds)}, loss {result.final_loss:.4f} (moving average); run folder "
              f"{result.run_dir}", highlight=False, soft_wrap=True)  # one line in logs
    out.print(f"use it: ctrlora gen --cond {name}=CONDITION.png -p PROMPT", highlight=False)
