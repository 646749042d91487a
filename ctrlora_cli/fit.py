"""``ctrlora fit``: a new condition's adapter from a folder of pairs, straight into the store."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ctrlora_cli.console import ask, err, interactive, out, warn

DATA_HELP = """Folder of training pairs: either prompt.json (JSON lines {"source", "target", "prompt"}) with
source/ and target/, or source/ and target/ with matching file names and prompts in prompts.jsonl
({"name", "prompt"} lines) or one .txt per image."""


class Precision(str, Enum):
    bf16 = "bf16"
    fp32 = "fp32"


def register(app: typer.Typer) -> None:
    app.command("fit")(fit)


def fit(
    data: Path = typer.Argument(..., help=DATA_HELP, show_default=False),
    name: str | None = typer.Option(None, "--name", help="Store name of the new adapter (asked for when interactive)."),
    base: str | None = typer.Option(None, "--base",
                                    help="Base ControlNet to fit on (default: the only one, or 'base')."),
    sd: str | None = typer.Option(None, "--sd", help="Stable Diffusion model to use (default: the base's)."),
    rank: int = typer.Option(128, "--rank", help="LoRA rank."),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps."),
    batch: int = typer.Option(1, "--batch", help="Pairs per forward pass."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Forward passes per optimizer step."),
    lr: float = typer.Option(1e-5, "--lr", help="AdamW learning rate."),
    resolution: int = typer.Option(512, "--resolution", help="Training size (short side resized, centre crop)."),
    precision: Precision | None = typer.Option(None, "--precision", help="[default: bf16 on GPU, fp32 on CPU]",
                                               show_default=False),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing",
                                            help="Recompute activations: less memory, slower."),
    drop_prompt: float = typer.Option(0.3, "--drop-prompt", help="Probability of training on the empty prompt."),
    val_every: int = typer.Option(0, "--val-every", help="Save a validation grid every N steps (0: never)."),
    val_prompt: list[str] = typer.Option([], "--val-prompt",
                                         help="Validation prompt (repeatable; default: the first pair's)."),
    val_cond: list[Path] = typer.Option([], "--val-cond",
                                        help="Validation condition image (repeatable; default: the first two pairs')."),
    save_every: int = typer.Option(100, "--save-every", help="Write a checkpoint every N steps (0: only at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed for the adapter's init, the data order and the noise."),
    workers: int = typer.Option(4, "--workers", help="Threads that read and decode images."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out bad pairs instead of stopping."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run folder [default: <store>/runs/NAME]",
                                        show_default=False),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Latent cache [default: <store>/cache/latents]",
                                          show_default=False),
    device: str | None = typer.Option(None, "--device", help="cuda, cuda:1, cpu, ... [default: cuda when present]",
                                      show_default=False),
) -> None:
    """Fit a new condition's adapter on a Base ControlNet from about 1,000 image pairs."""
    from ctrlora_cli.store.resolve import base_folders, default_base
    from ctrlora_cli.store.names import validate_name
    from ctrlora_cli.store.store import Store
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
    from engine.training.fit import FitConfig
    from engine.training.fit import fit as run_fit
    from engine.models.storage import load_base, load_sd

    config = FitConfig(condition=name, rank=rank, steps=steps, batch=batch, grad_accum=grad_accum, lr=lr,
                       resolution=resolution, precision=precision.value if precision else None,
                       grad_checkpointing=grad_checkpointing,
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
                             config=config, resume=resume, base_digest=_base_digest(base_manifest),
                             callback=callback)
    except KeyboardInterrupt:
        err.print(f"interrupted; continue from the last checkpoint with the same command and --resume "
                  f"(run folder {run_dir})", highlight=False)
        raise typer.Exit(130)
    finally:
        del sd_components, controlnet
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    store.add(name, "adapter", {"adapter.safetensors": result.adapter_file}, arch=base_manifest.arch, condition=name,
              rank=rank,
              source={"type": "fit", "data": str(Path(data).resolve()), "run_dir": str(Path(run_dir).resolve())},
              notes=f"fitted on {base_manifest.name} from {result.pairs} pairs",
              labels=list(base_manifest.labels),
              extra={"steps": result.steps, "pairs": result.pairs, "data_digest": result.data_digest,
                     "base": base_manifest.name, "base_digest": result.base_digest, "final_loss": result.final_loss,
                     "lr": lr, "batch": batch, "grad_accum": grad_accum, "resolution": resolution,
                     "precision": config.precision, "seed": seed})
    out.print(f"fitted {name}: {result.steps} steps on {result.pairs} pairs in {_duration(result.seconds)}, "
              f"loss {result.final_loss:.4f} (moving average); run folder {result.run_dir}", highlight=False)
    out.print(f"use it: ctrlora gen --base {base_manifest.name} --cond {name}=CONDITION.png -p PROMPT", highlight=False)


def _base_digest(manifest) -> str:
    """The digest of the base's weights file, as the store recorded it."""
    for record in manifest.files:
        if record.path.endswith(".safetensors"):
            return record.digest
    return ""


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
