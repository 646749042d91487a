"""The settings of ``fit`` and ``train-base``: the one place that holds each one's default and range.

The CLI reads its defaults from these classes (this module loads no torch, so ``ctrlora --help``
stays fast); the ranges are checked here, for the CLI and for Python callers alike, and a wrong
value raises ``SettingError`` naming the setting, which the CLI words as the flag
(``--grad-accum: must be at least 1, not 0``). ``train-base``'s worker receives its settings as a
command line written from these fields and read back by them (``engine.training.launcher``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from engine.checks import above, at_least, between, multiple_of, seed
from engine.errors import SettingError, UsageError

# The paper's LoRA rank: engine.models.adapters.DEFAULT_RANK, which cannot be imported here
# without loading torch (a test checks that the two agree).
PAPER_RANK = 128


def check_training(settings) -> None:
    """The ranges every training run shares (``fit``'s and ``train-base``'s fields of these names)."""
    for name in ("steps", "batch", "grad_accum", "rank"):
        at_least(name, getattr(settings, name), 1)
    at_least("save_every", settings.save_every, 0)
    above("lr", settings.lr, 0)
    multiple_of("resolution", settings.resolution, 8)
    between("drop_prompt", settings.drop_prompt, 0, 1)
    seed("seed", settings.seed)


@dataclass
class FitConfig:
    """``fit``: one new condition's adapter on a frozen base."""

    condition: str = "new"  # the adapter's condition (what eval measures), as recorded in its file
    rank: int = PAPER_RANK
    steps: int = 1000
    batch: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    resolution: int = 512
    precision: str = "auto"  # auto: engine.runtime's choice (bf16 on CUDA and native-bf16 CPUs); fp32 or bf16 only
    grad_checkpointing: bool = False
    drop_prompt: float = 0.3
    val_every: int = 0
    val_prompts: list[str] = field(default_factory=list)
    val_conds: list[str] = field(default_factory=list)
    val_steps: int = 20
    val_guidance: float = 7.5
    save_every: int = 100
    seed: int = 0
    workers: int = 4
    device: str = "auto"

    def check(self) -> "FitConfig":
        """The ranges (no torch: the CLI checks them before anything loads)."""
        from engine.generation.settings import MAX_STEPS

        check_training(self)
        at_least("val_every", self.val_every, 0)
        at_least("workers", self.workers, 1)
        between("val_steps", self.val_steps, 1, MAX_STEPS)
        at_least("val_guidance", self.val_guidance, 0)
        return self

    def resolved(self, width: int | None = None) -> "FitConfig":
        """A copy with the ranges checked and device and precision decided (``width``: the UNet's,
        ``engine.models.storage.unet_width``: on a CPU, narrow models train in fp32)."""
        self.check()
        from engine.runtime import resolve_device, resolve_precision

        dev = resolve_device(self.device)
        precision = resolve_precision(self.precision, dev, training=True, allowed=("fp32", "bf16"), width=width)
        return FitConfig(**{**asdict(self), "device": str(dev), "precision": precision})


def _help(text: str | None, **more) -> dict:
    """A field's metadata: its help on the worker's command line (None: not listed)."""
    return {"help": text, **more}


@dataclass(frozen=True)
class TrainBaseSettings:
    """``train-base``: a run of the distributed worker. Paths are as the worker sees them (the
    command makes them absolute); flags default to False."""

    sd: str | None = field(default=None, metadata=_help("SD folder (diffusers layout): frozen UNet, VAE, text encoder",
                                                 required=True))
    out: str | None = field(default=None, metadata=_help("run folder: checkpoints, metrics, result", required=True))
    init_base: str | None = field(default=None, metadata=_help("a Base ControlNet folder to continue "
                                                               "(default: copy the UNet's encoder)"))
    data: tuple[str, ...] = field(default=(), metadata=_help("a condition's fit-layout folder: COND=DIR, or DIR "
                                                             "(named after it); repeatable"))
    shards: tuple[str, ...] = field(default=(), metadata=_help("WebDataset-style tar shards (glob); repeatable"))
    conditions: str | None = field(default=None, metadata=_help("comma-separated subset and order of the "
                                                                "conditions"))
    cache: str | None = field(default=None, metadata=_help("latent cache folder (default: <out>/cache)"))
    steps: int = field(default=1000, metadata=_help("optimizer steps"))
    batch: int = field(default=1, metadata=_help("pairs per micro-batch, per process"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    lr: float = field(default=1e-5, metadata=_help("AdamW learning rate"))
    rank: int = field(default=PAPER_RANK, metadata=_help("LoRA rank of every condition"))
    precision: str = field(default="auto", metadata=_help("auto (bf16 on GPU and on CPUs with native bf16 for "
                                                             "UNets of 64 channels or more, else fp32), fp32 or bf16 (the frozen UNet in bf16, fp32 "
                                                             "master weights for what trains)"))
    grad_checkpointing: bool = field(default=False, metadata=_help("recompute activations: less memory, slower"))
    save_every: int = field(default=1000, metadata=_help("write a checkpoint every N steps (0: only at the end)"))
    resume: bool = field(default=False, metadata=_help("continue the run in the run folder from its checkpoint"))
    seed: int = field(default=0, metadata=_help("seed of the schedule, the data order and the noise"))
    resolution: int = field(default=512, metadata=_help("training size (short side resized, centre crop)"))
    drop_prompt: float = field(default=0.3, metadata=_help("probability of training on the empty prompt"))
    log_every: int = field(default=1, metadata=_help("write a metrics line every N steps"))
    workers: int = field(default=2, metadata=_help("background shard readers per process (DataLoader workers; 0: "
                                                   "read in the training process)"))
    timeout: int = field(default=1800, metadata=_help("seconds a process waits for the others (e.g. while they "
                                                      "encode their share of the folders) before the run ends"))
    # the face's CTRLORA_CPU_BF16 (engine.runtime.set_cpu_bf16): auto, 1 or 0
    cpu_bf16: str = field(default="auto", metadata=_help(None))
    stop_after: int = field(default=0, metadata=_help(None))  # tests: stop after N steps, as if preempted
    # tests: after N steps, wait to be killed (a machine lost mid-run, at a known step)
    pause_after: int = field(default=0, metadata=_help(None))

    # What shapes the result, besides the data, the conditions and the total batch: a resumed run
    # must keep them (``engine.training.launcher.run_identity``). Not here: steps (a run may be
    # extended), saving and logging, the cache, grad checkpointing (the same numbers, recomputed),
    # and --init (the checkpoint holds every weight).
    RESUME_FIXED: ClassVar[tuple[str, ...]] = ("sd", "seed", "lr", "grad_accum", "rank", "resolution", "precision",
                                               "drop_prompt")

    def checked(self) -> "TrainBaseSettings":
        check_training(self)
        if self.precision == "fp16":
            raise SettingError("precision", "train-base trains in fp32 or bf16, not fp16: fp16 training needs a "
                                            "gradient scaler (small gradients underflow to zero in fp16), which "
                                            "train-base does not have; use bf16 (GPUs since Ampere) or fp32")
        at_least("log_every", self.log_every, 1)
        at_least("workers", self.workers, 0)
        at_least("timeout", self.timeout, 1)
        at_least("stop_after", self.stop_after, 0)
        at_least("pause_after", self.pause_after, 0)
        return self

    def folders(self) -> dict[str, Path]:
        """The condition folders of ``data``: ``COND=DIR``, or ``DIR`` named after the folder. A
        condition given twice is refused (one would silently replace the other)."""
        folders: dict[str, Path] = {}
        for item in self.data:
            condition, sep, folder = item.partition("=")
            if not sep:
                folder, condition = item, Path(item).name
            if condition in folders:
                raise UsageError(f"condition {condition!r} is given twice ({folders[condition]} and {folder}); "
                                 "give each condition one folder")
            folders[condition] = Path(folder)
        return folders

    def wanted_conditions(self) -> list[str]:
        """``conditions`` as a list (empty: all the data has)."""
        return [c.strip() for c in (self.conditions or "").split(",") if c.strip()]

    @classmethod
    def help_of(cls, name: str) -> str:
        """A setting's help, capitalised, for the command's own option."""
        text = cls.__dataclass_fields__[name].metadata["help"]
        return text[0].upper() + text[1:] + "."
