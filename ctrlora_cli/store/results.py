"""What ``fit``, ``train-base`` and ``world train-sd`` take from the store and put into it: the
model a run starts from, and its results as store entries."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ctrlora_cli.store.store import Manifest, NameTaken, Store
from engine.errors import UsageError


def weights_digest(manifest: Manifest) -> str:
    """The digest of an entry's weights file, as the store recorded it ("" when it has none)."""
    return manifest.weights_digest or ""


def add_fitted_adapter(store: Store, name: str, result, base: Manifest, config, data: Path, run_dir: Path) -> None:
    """``fit``'s adapter (an ``engine.training.fit.FitResult``) as the store entry ``name`` (an
    entry of that name is replaced: ``fit`` claimed the name first)."""
    store.add(name, "adapter", {"adapter.safetensors": result.adapter_file}, arch=base.arch, condition=config.condition,
              rank=config.rank,
              source={"type": "fit", "data": str(Path(data).resolve()), "run_dir": str(Path(run_dir).resolve())},
              notes=f"fitted on {base.name} from {result.pairs} pairs",
              labels=list(base.labels),
              extra={"steps": result.steps, "pairs": result.pairs, "data_digest": result.data_digest,
                     "base": base.name, "base_digest": result.base_digest, "final_loss": result.final_loss,
                     "lr": config.lr, "batch": config.batch, "grad_accum": config.grad_accum,
                     "resolution": config.resolution, "precision": config.precision, "seed": config.seed})


def resolve_init(store: Store, init: str, sd: str | None) -> tuple[str, Path | None]:
    """``train-base --init``: (SD entry for the frozen parts, base folder to continue or None to
    copy the UNet)."""
    manifest = store.get(init)
    if manifest.kind == "sd":
        return sd or init, None
    if manifest.kind == "base":
        from ctrlora_cli.store.resolve import base_folders

        _, controlnet_dir, _ = base_folders(store, init, sd)
        return sd or manifest.sd, controlnet_dir
    raise UsageError(f"--init {init!r} is an adapter; give an SD model or a base")


def add_trained_base(store: Store, result: Path, run: Path, out_name: str, sd_name: str, steps: int,
                     force: bool = False) -> dict:
    """``train-base``'s result folder as the official split: base ``out_name`` and adapters
    ``out_name-COND``, each adapter recording its base by name and weights digest; returns the
    run's summary with the entries' names. Every name is claimed before anything is stored (the
    command claimed those it knew up front; the conditions of shards are known only now). The
    result folder is removed once stored: the store holds it, and nothing keeps a second copy."""
    from engine.formats.adapter_file import read_adapter_metadata

    summary = json.loads((result / "summary.json").read_text())
    names = {condition: f"{out_name}-{condition}" for condition in summary["conditions"]}
    try:
        for name in (out_name, *names.values()):
            store.claim(name, force, "--out")
    except NameTaken as exc:
        raise NameTaken(f"{exc}; the trained run is kept in {run}: store it by running the same command with "
                        f"--resume and --force, or another --out") from None
    source = {"type": "train-base", "run": str(run)}
    files = {f"controlnet/{p.name}": p for p in sorted((result / "controlnet").iterdir()) if p.is_file()}
    base = store.add(out_name, "base", files, arch=summary["arch"], sd=sd_name, source=source,
                     extra={"steps": steps, "conditions": summary["conditions"],
                            "zero_convs_and_norms_from": summary["base_zero_convs_from"]})
    for condition, name in names.items():
        path = result / "adapters" / f"{condition}.safetensors"
        meta = read_adapter_metadata(path)
        store.add(name, "adapter", {"adapter.safetensors": path}, arch=summary["arch"], condition=condition,
                  rank=meta["rank"], source=source,
                  extra={"base": out_name, "base_digest": base.weights_digest, "steps": steps})
    shutil.rmtree(result)
    return {"base": out_name, "base_digest": base.weights_digest, "adapters": list(names.values()), "run": str(run),
            **summary}


def add_toy_sd(store: Store, name: str, settings, out_dir: Path | None = None, progress=None) -> dict:
    """Train the demo's toy SD (``engine.demo.toy_sd.ToySDSettings``) and add it as sd entry
    ``name``; returns the training summary (plus ``name``, and ``folder`` with ``out_dir``)."""
    import tempfile

    from engine.demo.toy_sd import train_toy_sd

    store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.root, prefix=".train-sd-") as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp) / "sd"
        result = train_toy_sd(settings, out=folder, progress=progress)
        summary = dict(result.summary, name=name)
        store.add_folder(name, "sd", folder, source={"type": "world", "preset": "demo", "size": settings.size,
                                                     "count": settings.count, "seed": settings.seed},
                         labels=["demo"], extra=summary,
                         notes="toy SD trained on the demo world (ctrlora world train-sd)")
    if out_dir is not None:
        summary["folder"] = str(out_dir)
    return summary


def run_removal_hint(store: Store, run: Path) -> str:
    """How else to clear a run folder that holds a run: ``ctrlora rm`` of the entries made in it
    when that removes it (it lies in the store's runs/), else deleting it."""
    real = Path(os.path.realpath(run))
    made_here = [m.name for m in store.list() if store.run_of(m) == real]
    if made_here and real in store.runs_freed_by(made_here)[0]:
        return f"`ctrlora rm {' '.join(made_here)}` (which removes the run folder with them)"
    return "delete the folder"
