"""Fitting a new condition's adapter on a frozen Base ControlNet (the paper's "new condition" recipe).

Only the adapter trains: LoRA on the base's linear layers plus the condition's own zero convs and
transformer norms, started from the base's values (``engine.models.adapters.add_adapter``), so step 0
equals the base. AdamW (torch defaults, lr 1e-5), epsilon-MSE on SD1.5's schedule
(``engine.training.objective``), the prompt replaced by "" with probability 0.3, the condition never.

The data is a folder of pairs (``PairSet``: the VAE and CLIP encode them once into the latent cache) or
one condition of latent shards (``LatentSamples``, from ``ctrlora encode-shards``: the VAE is not
needed at all; CLIP turns the stored token ids into embeddings once).

What makes it cheap: the frozen encoders ran once (``engine.training.pairs``), so a step is the ControlNet
and the UNet only; gradients flow to the adapter alone (no weight gradients for the 1.2 B frozen
weights, which the reference computes and throws away); on GPU the frozen weights are held in bf16
under autocast while the adapter keeps fp32 master weights; attention is PyTorch's SDPA.

A run folder holds ``run.json`` (the settings), ``metrics.jsonl`` (one line per step),
``checkpoint.pt`` (the latest, written atomically), ``val/step-NNNNNN.png`` (validation grids),
``loss.png`` and, at the end, ``adapter.safetensors``. A killed run resumed with ``resume=True``
continues exactly: the data order is a pure function of (seed, position) and the checkpoint holds
the adapter, the optimizer and the random generator.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.models import adapters
from engine.models.storage import unet_width
from engine.training.latent_shards import LatentSamples, check_latent_shards, check_latent_validation
from engine.training.pairs import EncodedPairs, LatentCache, PairSet, encode_pairs, load_image
from engine.training.objective import controlled_eps, diffusion_loss
from engine.training.metrics import TENSORBOARD, truncate_metrics
from engine.training.settings import FitConfig  # its defaults and ranges; imported from here too
from engine.errors import SettingError, UsageError
from engine.files import atomic_path, write_json
from engine.images import image_grid, save_image
from engine.progress import ProgressCallback, report

ADAPTER = "new"  # the adapter's name inside the model (store names may hold '.', adapter names not)
CHECKPOINT_FORMAT = 1
# Settings that must not change when a run is resumed (steps, validation and saving may).
RESUME_FIXED = ("rank", "batch", "grad_accum", "lr", "resolution", "precision", "drop_prompt", "seed")
# What a run writes in its folder: all of it goes when a run starts over there (nothing else does).
RUN_FILES = ("run.json", "checkpoint.pt", "metrics.jsonl", "loss.png", "adapter.safetensors", "val", TENSORBOARD)


class RunFolderTaken(SettingError):
    """``run_dir`` already holds a run, and neither resuming nor restarting it was asked for."""

    def __init__(self, run_dir: Path, progress: str):
        super().__init__("run_dir", f"{run_dir} already holds a run ({progress}); resume it, restart it, or pick "
                                    "another run folder")
        self.run_dir, self.progress = run_dir, progress


@dataclass
class FitResult:
    adapter_file: Path
    run_dir: Path
    steps: int
    final_loss: float  # the moving average at the last step
    data_digest: str
    base_digest: str
    pairs: int
    seconds: float
    resumed_from: int = 0


# -- the training step -------------------------------------------------------------------------

class AdapterTrainer:
    """The adapter, its optimizer and the step; no files. ``bench/fit.py`` times this class.

    What trains, what the ControlNet is fed and how it predicts are hooks (``_add_trainable``,
    ``_batch``, ``_routing``, ``predict``): the demo's standard-ControlNet baseline
    (``engine.demo.standard_controlnet``) trains with the same data order, generator and objective."""

    predict = staticmethod(controlled_eps)  # diffusion_loss's ``predict``

    def __init__(self, unet, controlnet, scheduler, data: EncodedPairs, config: FitConfig):
        config = config.resolved(width=unet_width(unet))
        self.config = config
        self.device = torch.device(config.device)
        self.unet, self.controlnet, self.scheduler, self.data = unet, controlnet, scheduler, data
        self.autocast_dtype = torch.bfloat16 if config.precision == "bf16" else None

        unet.requires_grad_(False).eval()
        controlnet.requires_grad_(False).eval()
        self.params = self._add_trainable(controlnet, config)
        for p in self.params.values():
            p.requires_grad_(True)
        unet.to(self.device)
        controlnet.to(self.device)
        if self.autocast_dtype is not None:
            # Frozen weights in bf16 (autocast would cast them at every op); master weights fp32.
            unet.to(self.autocast_dtype)
            for p in controlnet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(self.autocast_dtype)
        if config.grad_checkpointing:
            unet.enable_gradient_checkpointing()
            controlnet.enable_gradient_checkpointing()
        _use_sdpa(unet, controlnet)
        self.data.to(self.device)
        # torch's AdamW defaults (weight decay 0.01), as the reference; fused: one kernel for all.
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.lr, fused=True)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.step = 0
        self._orders: dict[int, torch.Tensor] = {}

    def _add_trainable(self, controlnet, config: FitConfig) -> dict[str, torch.nn.Parameter]:
        """What trains, by name: the new adapter's parameters."""
        torch.manual_seed(config.seed)  # the LoRA down-projections' initial values
        adapters.add_adapter(controlnet, ADAPTER, rank=config.rank)
        return adapters.adapter_parameters(controlnet, ADAPTER)

    def _batch(self, indices: torch.Tensor, generator: torch.Generator, drop_prompt: float):
        """(target latents, what the ControlNet is fed, text embeddings) of ``indices``."""
        return self.data.sample_batch(indices, generator, drop_prompt)

    def _routing(self):
        return self.controlnet.routing.use(ADAPTER)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def samples_per_step(self) -> int:
        return self.config.batch * self.config.grad_accum

    def indices(self, position: int, count: int) -> torch.Tensor:
        """Samples ``position .. position+count`` of the endless stream of shuffled epochs: a
        pure function of the seed, so a resumed run draws what the killed one would have."""
        n = len(self.data)
        out = []
        for pos in range(position, position + count):
            epoch, offset = divmod(pos, n)
            if epoch not in self._orders:
                self._orders = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(
                    self.config.seed * 1_000_003 + epoch))}
            out.append(self._orders[epoch][offset])
        return torch.stack(out)

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> float:
        """One optimizer step over ``batch * grad_accum`` samples; returns the mean loss."""
        c = self.config
        total = 0.0
        position = self.step * self.samples_per_step
        for micro in range(c.grad_accum):
            idx = self.indices(position + micro * c.batch, c.batch)
            latents, cond, text = self._batch(idx, self.generator, c.drop_prompt)
            # Backward inside the routing too: gradient checkpointing reruns forward pieces then.
            with self._routing():
                with self.autocast():
                    loss = diffusion_loss(self.unet, self.controlnet, self.scheduler, latents, cond, text,
                                          generator=self.generator, predict=self.predict)
                (loss / c.grad_accum).backward()
            total += loss.item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / c.grad_accum

    @torch.no_grad()
    def loss_on(self, indices: torch.Tensor, seed: int) -> float:
        """The loss on fixed samples with fixed noise and timesteps (no prompt dropout)."""
        g = torch.Generator(self.device).manual_seed(seed)
        latents, cond, text = self._batch(indices, g, 0.0)
        with self.autocast(), self._routing():
            return diffusion_loss(self.unet, self.controlnet, self.scheduler, latents, cond, text, generator=g,
                                  predict=self.predict).item()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.params.items()}

    def state_dict(self) -> dict:
        return {"step": self.step, "adapter": self.adapter_state(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(state["adapter"][key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])


def _use_sdpa(*models) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in models:
        for module in model.modules():
            if hasattr(module, "set_processor") and hasattr(module, "processor"):
                module.set_processor(AttnProcessor2_0())


# -- the run -----------------------------------------------------------------------------------

def fit(pairs: PairSet | LatentSamples, *, sd, controlnet, run_dir: str | Path, cache_dir: str | Path,
        config: FitConfig, resume: bool = False, restart: bool = False, base_digest: str = "",
        callback: ProgressCallback | None = None) -> FitResult:
    """Fit an adapter on ``pairs`` (a folder's, or latent shards' samples of one condition).
    ``sd``: SD components (engine.models.storage.load_sd, fp32, CPU; from latent shards its VAE may
    be None: only validation grids need one); ``controlnet``: the frozen Base ControlNet (left
    bit-identical; the adapter lives beside it).
    A run already in ``run_dir`` is continued with ``resume``, or started over with ``restart``
    (its files are deleted once the new run's setup has worked); else it is refused."""
    if resume and config.precision == "auto":
        # auto keeps what the run began with (an older build, or another CPU, may have decided otherwise)
        began = ((saved_run(Path(run_dir)) or {}).get("identity") or {}).get("precision")
        if began in ("fp32", "bf16"):
            from dataclasses import replace

            config = replace(config, precision=began)
    config = config.resolved(width=unet_width(sd.unet))
    run_dir = Path(run_dir)
    started = time.perf_counter()
    checkpoint_path = run_dir / "checkpoint.pt"
    identity = {"data_digest": pairs.digest, "base_digest": base_digest,
                **{k: getattr(config, k) for k in RESUME_FIXED}}
    checkpoint = _open_run(run_dir, checkpoint_path, identity, resume, restart)

    device = torch.device(config.device)
    text_encoder = sd.text_encoder.to(device)
    validation = _Validation.build(config, pairs, run_dir)
    if isinstance(pairs, LatentSamples):  # encoded already: no VAE work (validation draws with it, if on)
        check_latent_shards(pairs.manifest, config.resolution, None)  # (the caller checked the VAE's identity)
        data = pairs.encoded(text_encoder, sd.tokenizer)
    else:
        data = encode_pairs(pairs, sd.vae.to(device), text_encoder, sd.tokenizer, config.resolution,
                            LatentCache(cache_dir), batch_size=8 if device.type == "cuda" else 2,
                            workers=config.workers, callback=callback, condition=config.condition)
    if validation:
        sd.vae.to(device)
    # Training needs no text encoder: its device memory back (validation encodes its few prompts on the CPU)
    sd.text_encoder = text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    if not resume:  # written once setup has worked, so a failed start leaves no run behind (nor loses one)
        _clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "run.json", {"identity": identity, "config": asdict(config)}, sort_keys=False)
    trainer = AdapterTrainer(sd.unet, controlnet, sd.scheduler, data, config)
    smooth = _Smoother()
    metrics_path = run_dir / "metrics.jsonl"
    resumed_from = 0
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        smooth.load(checkpoint["smooth"])
        resumed_from = trainer.step
    truncate_metrics(metrics_path, trainer.step)

    loss = float("nan")
    train_seconds, first_step = 0.0, trainer.step  # throughput counts training, not validation or saving
    with open(metrics_path, "a") as metrics:
        while trainer.step < config.steps:
            clock = time.perf_counter()
            loss = trainer.train_step()
            train_seconds += time.perf_counter() - clock
            step = trainer.step
            smoothed = smooth.update(loss)
            it_s = (step - first_step) / train_seconds if train_seconds > 0 else 0.0
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            info = {"loss": loss, "loss_smooth": smoothed, "it_s": it_s, "images_s": it_s * trainer.samples_per_step,
                    "eta_s": (config.steps - step) / it_s if it_s else None, "memory_gb": memory}
            metrics.write(json.dumps({"step": step, "lr": config.lr, **info}) + "\n")
            metrics.flush()
            report(callback, "train", step, config.steps, lr=config.lr, **info)
            if validation and (step % config.val_every == 0 or step == config.steps):
                validation.run(trainer, step, sd, callback)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                _save_checkpoint(checkpoint_path, trainer, smooth, identity)

    _save_checkpoint(checkpoint_path, trainer, smooth, identity)
    adapter_file = _write_adapter(run_dir / "adapter.safetensors", trainer, controlnet, config, identity, pairs)
    history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    draw_loss_curve(history, run_dir / "loss.png")
    adapters.delete_adapter(controlnet, ADAPTER)  # leave the caller's base as it came
    return FitResult(adapter_file, run_dir, trainer.step, history[-1]["loss_smooth"] if history else loss, pairs.digest,
                     base_digest, len(pairs), time.perf_counter() - started, resumed_from)


def saved_run(run_dir: str | Path) -> dict | None:
    """The ``run.json`` of the run in ``run_dir`` (``{"identity", "config"}``), or None."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None


def run_progress(run_dir: str | Path) -> str | None:
    """How far the run in ``run_dir`` got ("finished, 12 steps", "reached step 6 of 12"), or None
    when the folder holds no run."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists() and not (run_dir / "checkpoint.pt").exists():
        return None
    steps = (saved_run(run_dir) or {}).get("config", {}).get("steps", "?")
    if (run_dir / "adapter.safetensors").exists():
        return f"finished, {steps} steps"
    try:
        lines = (run_dir / "metrics.jsonl").read_text().split()
        step = json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        step = "?"
    return f"reached step {step} of {steps}"


def check_run_folder(run_dir: str | Path, resume: bool, restart: bool = False) -> None:
    """What ``fit`` refuses about ``run_dir`` before reading any data: a run there that is
    neither resumed nor restarted (``RunFolderTaken``), or nothing there to resume."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "run.json").exists():
            raise SettingError("resume", f"nothing to resume in {run_dir}: no run.json there; start without resuming")
        return
    progress = run_progress(run_dir)
    if progress is not None and not restart:
        raise RunFolderTaken(run_dir, progress)


def _open_run(run_dir: Path, checkpoint_path: Path, identity: dict, resume: bool, restart: bool) -> dict | None:
    check_run_folder(run_dir, resume, restart)
    if not resume:
        return None
    saved = (saved_run(run_dir) or {}).get("identity")
    if not isinstance(saved, dict):
        raise SettingError("resume", f"{run_dir / 'run.json'} is unreadable; start over")
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in identity.items() if saved.get(k) != v]
    if changed:
        raise SettingError("resume", f"cannot resume {run_dir} with other settings or data ({'; '.join(changed)}); "
                                     "use the original ones or start over")
    if not checkpoint_path.exists():
        return None  # killed before its first checkpoint: starting over is continuing
    try:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SettingError("resume", f"checkpoint {checkpoint_path} is unreadable ({type(exc).__name__}); "
                                     "start over") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise SettingError("resume", f"checkpoint {checkpoint_path} has an unknown format; start over")
    return state


def _clear_run(run_dir: Path) -> None:
    """Delete a run's files (``RUN_FILES``) from ``run_dir``, and nothing else there."""
    import shutil

    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _save_checkpoint(path: Path, trainer: AdapterTrainer, smooth: "_Smoother", identity: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **trainer.state_dict(), "smooth": smooth.state(),
                    "identity": json.dumps(identity)}, tmp)


def _write_adapter(path: Path, trainer: AdapterTrainer, controlnet, config: FitConfig, identity: dict,
                   pairs: PairSet | LatentSamples) -> Path:
    from engine.formats.adapter_file import save_adapter_file
    from engine.models.arch import arch_id

    provenance = {"type": "fit", "steps": trainer.step, "pairs": len(pairs), **identity}
    return save_adapter_file(path, trainer.adapter_state(), rank=config.rank, alpha=float(config.rank),
                             base_arch=arch_id(controlnet.config), condition=config.condition, provenance=provenance)


class _Smoother:
    """An exponential moving average of the loss, bias-corrected so early values mean something."""

    def __init__(self, beta: float = 0.98):
        self.beta, self.value, self.count = beta, 0.0, 0

    def update(self, x: float) -> float:
        self.count += 1
        self.value = self.beta * self.value + (1 - self.beta) * x
        return self.value / (1 - self.beta ** self.count)

    def state(self) -> dict:
        return {"value": self.value, "count": self.count}

    def load(self, state: dict) -> None:
        self.value, self.count = float(state["value"]), int(state["count"])


# -- validation --------------------------------------------------------------------------------

class _Validation:
    """Images from fixed conditions, prompts and noise every N steps, saved as one grid per step: a
    row per condition, its image then one result per prompt.

    Drawn by the generation pipeline borrowing the model in training (``CtrLoraPipeline(borrow=True)``,
    under the trainer's autocast): DDIM, classifier-free guidance whose unconditional branch keeps
    the condition, as ``ctrlora gen`` draws with the saved adapter. Every validation uses the same
    condition latents (seed + 1) and noise (seed + 2), so the grids show the adapter change."""

    def __init__(self, config: FitConfig, cond_images: list[torch.Tensor], prompts: list[str], folder: Path):
        self.config, self.cond_images, self.prompts, self.folder = config, cond_images, prompts, folder

    @classmethod
    def build(cls, config: FitConfig, pairs: PairSet | LatentSamples, run_dir: Path) -> "_Validation | None":
        if not config.val_every:
            return None
        if isinstance(pairs, LatentSamples):
            check_latent_validation(config)
            cond_paths, prompt = [Path(p) for p in config.val_conds], pairs.prompts[0]
        else:
            cond_paths = [Path(p) for p in config.val_conds] or [p.source for p in pairs.pairs[:2]]
            prompt = pairs.pairs[0].prompt
        for path in cond_paths:
            if not path.is_file():
                raise UsageError(f"validation condition {path} does not exist")
        prompts = list(config.val_prompts) or [prompt]
        try:
            images = [load_image(p, config.resolution) for p in cond_paths]
        except OSError as exc:
            raise UsageError(f"cannot read a validation condition: {exc}") from None
        return cls(config, images, prompts, run_dir / "val")

    @torch.no_grad()
    def run(self, trainer: AdapterTrainer, step: int, sd, callback) -> Path:
        from engine.generation.pipeline import CtrLoraPipeline
        from engine.generation.sampling import Condition, decode

        c = self.config
        pipe = CtrLoraPipeline(sd, trainer.controlnet, device=trainer.device, borrow=True)
        cells, total = [], len(self.cond_images) * len(self.prompts)
        for i, cond_image in enumerate(self.cond_images):
            cells.append(cond_image)
            for j, prompt in enumerate(self.prompts):
                with trainer.autocast():
                    result = pipe([Condition(ADAPTER, cond_image)], prompt, steps=c.val_steps,
                                  guidance=c.val_guidance, seed=c.seed + 2, condition_seed=c.seed + 1,
                                  output_type="latent")
                cells.extend(decode(sd.vae, result.latents))  # outside autocast: the VAE decodes in its dtype
                report(callback, "validate", i * len(self.prompts) + j + 1, total, step=step)
        return save_image(image_grid(cells, columns=1 + len(self.prompts)), self.folder / f"step-{step:06d}.png")


# -- the loss curve ----------------------------------------------------------------------------

def draw_loss_curve(history: list[dict], path: Path, size: tuple[int, int] = (800, 400)) -> Path:
    """Raw loss (light) and its moving average (dark) against steps, drawn with PIL."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 60, 20, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [(h["step"], h["loss"], h.get("loss_smooth", h["loss"])) for h in history
              if math.isfinite(h.get("loss", float("nan")))]
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if points:
        steps = [p[0] for p in points]
        values = [v for p in points for v in p[1:]]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        v0, v1 = min(values), max(values)
        if v1 - v0 < 1e-12:
            v0, v1 = v0 - 0.5, v1 + 0.5

        def xy(step, value):
            x = left + (step - s0) / (s1 - s0) * (width - left - right)
            y = height - bottom - (value - v0) / (v1 - v0) * (height - top - bottom)
            return x, y

        for column, colour in ((1, (170, 190, 230)), (2, (20, 60, 160))):
            line = [xy(p[0], p[column]) for p in points]
            if len(line) > 1:
                draw.line(line, fill=colour, width=1 if column == 1 else 2)
            else:
                draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        for value in (v0, (v0 + v1) / 2, v1):
            draw.text((4, xy(s0, value)[1] - 6), f"{value:.4g}", fill="black")
        draw.text((left, height - bottom + 8), f"step {s0}", fill="black")
        draw.text((width - right - 80, height - bottom + 8), f"step {s1}", fill="black")
    draw.text((left + 8, top + 4), "loss (light) and moving average (dark)", fill="black")
    return save_image(image, path)
