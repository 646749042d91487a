"""The paper's claim at toy scale: one training run of one arm on a held-out condition, scored as
it trains.

CtrLoRA claims that with a pretrained Base ControlNet a new condition is learnt from about 1,000
pairs in far fewer steps than a ControlNet trained for it from the SD UNet. The arms, all trained
on the same pairs in the same order with the same noise, batch, objective and optimizer (AdamW,
torch's defaults), and all scored by ``engine.demo.evaluate`` with the same sampler, seeds, steps
and guidance:

- ``adapter`` (b): a CtrLoRA adapter on the frozen base, with ``ctrlora fit``'s own trainer;
- ``controlnet`` (c): what a user would train instead, a standard ControlNet (diffusers'
  ``ControlNetModel.from_unet``, its pixel-space conditioning embedding learnt from scratch, every
  weight trained, as diffusers' ``train_controlnet.py``): ``engine.demo.standard_controlnet``;
- ``scratch`` (d): our Base ControlNet architecture (VAE condition embedding) initialised from the
  UNet, every weight trained with the condition's adapter (``train-base`` on one condition);
- ``full`` (e): the pretrained base fully fine-tuned with the condition's adapter.

A run is one process's work: load, train to the last step of ``curve`` and evaluate after each of
its step counts (in the process, on the live model: no reloading between points).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.demo.settings import EvalSettings
from engine.progress import ProgressCallback, report

ARMS = {
    "adapter": "(b) CtrLoRA adapter fitted on the base",
    "controlnet": "(c) standard ControlNet from the UNet (diffusers)",
    "scratch": "(d) our base architecture from the UNet",
    "full": "(e) the base fully fine-tuned",
}


@dataclass
class ArmRun:
    """Everything that decides one run's result (also its key in the results)."""

    arm: str
    data: str  # training pairs (fit layout); the first ``pairs`` of them are used
    eval_data: str  # held-out pairs, scored after each step count of ``curve``
    kind: str  # the fidelity measure (the condition)
    pairs: int
    curve: tuple[int, ...]
    lr: float
    seed: int = 0
    batch: int = 16
    rank: int = 16
    resolution: int = 32
    eval: EvalSettings = field(default_factory=lambda: EvalSettings(steps=20, guidance=5.0))
    eval_pairs: int = 64
    base: str = ""  # which pretrained base, by name (part of the key where runs differ by it)

    def __post_init__(self):
        if self.arm not in ARMS:
            raise ValueError(f"unknown arm {self.arm!r}; one of {', '.join(ARMS)}")
        self.curve = tuple(sorted(set(int(n) for n in self.curve)))

    @property
    def key(self) -> str:
        on = f"-on-{self.base}" if self.base else ""
        return f"{self.arm}{on}-{self.kind}-{self.pairs}p-seed{self.seed}-lr{self.lr:g}-{self.curve[-1]}steps"

    def as_dict(self) -> dict:
        return {**asdict(self), "curve": list(self.curve)}


def _base_tuning_trainer():
    from engine.models import adapters
    from engine.training.fit import AdapterTrainer

    class BaseTuningTrainer(AdapterTrainer):
        """The adapter and every weight of the Base ControlNet train (``train-base`` on one
        condition: arms (d) and (e)); the base's own zero convs and norms never act while the
        condition is routed, so they get no gradient, as in train-base."""

        def _add_trainable(self, controlnet, config):
            params = super()._add_trainable(controlnet, config)
            taken = {id(p) for p in params.values()}
            own = {f"{n}.{p}" for n in adapters.routed_layers(controlnet) for p in ("weight", "bias")}
            params.update({name: p for name, p in controlnet.named_parameters()
                           if id(p) not in taken and name not in own})
            return params

    return BaseTuningTrainer


def bare_and_ceiling(sd_dir: str | Path, base_dir: str | Path, eval_data: str | Path, kind: str,
                     settings: EvalSettings, eval_pairs: int) -> dict:
    """The base with no adapter on the held-out pairs (where every arm starts from, in the
    half-way rule) and the data's own targets' score (the ceiling)."""
    from engine.demo.evaluate import evaluate
    from engine.generation.pipeline import CtrLoraPipeline
    from engine.models.storage import load_base, load_sd
    from engine.training.pairs import scan_folder

    sd, base = load_sd(sd_dir), load_base(base_dir)
    pairs = scan_folder(eval_data).pairs[:eval_pairs]
    with torch.no_grad():  # borrow: computed exactly as the arms' live models are scored
        result = evaluate(CtrLoraPipeline(sd, base, borrow=True), None, pairs, kind, settings)
    return result.as_dict()


def run_to_file(run: ArmRun, sd_dir, base_dir, cache_dir, path: str | Path, threads: int) -> dict:
    """``run_arm`` in a worker process with ``threads`` threads; the result written whole to
    ``path`` (a run interrupted before it is written is done again)."""
    from engine.files import write_json

    torch.set_num_threads(threads)
    result = run_arm(run, sd_dir, base_dir, cache_dir)
    write_json(Path(path), result, sort_keys=False)
    return result


def run_arm(run: ArmRun, sd_dir: str | Path, base_dir: str | Path, cache_dir: str | Path,
            callback: ProgressCallback | None = None) -> dict:
    """Train ``run.arm`` to ``run.curve[-1]`` steps, scoring it after each step count of the curve.
    Returns the run's settings, its curve (value and every score per step count), the trainable
    parameters and the seconds spent training and evaluating."""
    from engine.demo.evaluate import evaluate
    from engine.models.storage import load_base, load_sd
    from engine.training.fit import ADAPTER, AdapterTrainer, FitConfig
    from engine.training.pairs import LatentCache, PairSet, encode_pairs, scan_folder

    started = time.perf_counter()
    sd = load_sd(sd_dir)
    found = scan_folder(run.data)
    if len(found) < run.pairs:
        raise ValueError(f"{run.data} holds {len(found)} pairs, fewer than the {run.pairs} asked for")
    pairs = PairSet(found.folder, found.layout, found.pairs[:run.pairs])
    held_out = scan_folder(run.eval_data).pairs[:run.eval_pairs]
    config = FitConfig(condition=run.kind, rank=run.rank, steps=run.curve[-1], batch=run.batch, lr=run.lr,
                       resolution=run.resolution, precision="fp32", seed=run.seed, save_every=0, device="cpu")
    data = encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, run.resolution, LatentCache(cache_dir),
                        batch_size=2, workers=1, condition=run.kind, condition_pixels=run.arm == "controlnet")

    if run.arm == "controlnet":
        from engine.demo.standard_controlnet import (StandardControlNetPipeline, StandardControlNetTrainer,
                                                     build_standard_controlnet)
        from engine.generation.sampling import vae_scale_factor

        controlnet = build_standard_controlnet(sd.unet, vae_scale_factor(sd.vae), seed=run.seed)
        trainer = StandardControlNetTrainer(sd.unet, controlnet, sd.scheduler, data, config)
        adapter = None

        def pipeline():
            return StandardControlNetPipeline(sd, trainer.controlnet, device=trainer.device)
    else:
        from engine.generation.pipeline import CtrLoraPipeline
        from engine.models.controlnet import BaseControlNetModel

        controlnet = BaseControlNetModel.from_unet(sd.unet) if run.arm == "scratch" else load_base(base_dir)
        trainer = (AdapterTrainer if run.arm == "adapter" else _base_tuning_trainer())(
            sd.unet, controlnet, sd.scheduler, data, config)
        adapter = ADAPTER

        def pipeline():
            return CtrLoraPipeline(sd, trainer.controlnet, device=trainer.device, borrow=True)

    trainable = trainer.trainable_parameters()
    curve, train_seconds, eval_seconds = [], 0.0, 0.0
    loss = float("nan")
    for target in run.curve:
        clock = time.perf_counter()
        while trainer.step < target:
            loss = trainer.train_step()
            report(callback, "train", trainer.step, run.curve[-1], loss=loss)
        train_seconds += time.perf_counter() - clock
        clock = time.perf_counter()
        with torch.no_grad():
            result = evaluate(pipeline(), adapter, held_out, run.kind, run.eval)
        eval_seconds += time.perf_counter() - clock
        curve.append({"steps": target, "value": result.value, "scores": result.scores, "loss": loss})
        report(callback, "eval", target, run.curve[-1], **{result.metric: result.value})
    return {"run": run.as_dict(), "key": run.key, "metric": result.metric, "higher_is_better": result.higher_is_better,
            "curve": curve, "ceiling": result.ceiling, "trainable_parameters": trainable,
            "train_seconds": round(train_seconds, 2), "eval_seconds": round(eval_seconds, 2),
            "seconds": round(time.perf_counter() - started, 2), "threads": torch.get_num_threads()}


def steps_to(curve: list[tuple[int, float]], threshold: float, higher: bool) -> float | None:
    """The step count at which a (mean) curve first passes ``threshold``, linearly interpolated
    between the measured points before and after it (from step 0 at ``curve``'s start value is not
    assumed: before the first point there is no measurement); None when it never does."""
    previous = None
    for steps, value in curve:
        passed = value >= threshold if higher else value <= threshold
        if passed:
            if previous is None:
                return float(steps)
            (s0, v0) = previous
            if v0 == value:
                return float(steps)
            return s0 + (threshold - v0) / (value - v0) * (steps - s0)
        previous = (steps, value)
    return None
