"""The ranges of a generation's settings, in one place and without torch: ``ctrlora gen`` and
``ctrlora eval`` check what they were given before any model loads, and the pipeline checks the
same for Python callers. Out-of-range values raise ``SettingError`` (``engine.checks``).

- steps: 1 to 1000, the timesteps SD1.5's schedule was trained with (no sampler takes more);
- guidance: a finite number, at least 0 (0: the prompt is ignored);
- strength, and each condition's weight: any finite number. A negative weight is allowed, as in
  the reference (any real control scale): it pushes the image away from the condition;
- a condition's window: the fraction of the steps, ``0 <= start < end <= 1``;
- batch: at least 1; seeds: 0 to ``engine.checks.SEED_MAX``;
- width and height: multiples of 8 from 8 to 4096;
- scheduler: one of ``SCHEDULERS``.
"""

from __future__ import annotations

from engine.checks import at_least, between, finite, multiple_of, one_of, seed as check_seed, window, within

MAX_STEPS = 1000
SIZE_FACTOR = 8  # the SD VAE's downsampling: sizes are multiples of it
MAX_SIDE = 4096

# Scheduler names the CLI offers -> (diffusers class name, extra config); made by
# ``engine.generation.sampling.make_scheduler``.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),  # eta 0 (deterministic), the reference's sampler
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}


def check_sampling(*, steps: int, guidance: float, strength: float = 1.0, batch: int = 1,
                   seed: int | None = None, scheduler: str | None = None) -> None:
    """(``seed`` and ``scheduler``: when given.)"""
    between("steps", steps, 1, MAX_STEPS)
    at_least("guidance", guidance, 0)
    finite("strength", strength)
    at_least("batch", batch, 1)
    if seed is not None:
        check_seed("seed", seed)
    if scheduler is not None:
        one_of("scheduler", scheduler, SCHEDULERS)


def check_side(name: str, value: int) -> None:
    """``width`` or ``height``."""
    multiple_of(name, value, SIZE_FACTOR, SIZE_FACTOR, MAX_SIDE)


def check_condition(setting: str, label: str, weight: float, start: float, end: float) -> None:
    """One condition's weight and window, refused as ``setting`` (``cond``) with ``label`` (which
    condition) before the message."""
    with within(setting, f"{label}: weight"):
        finite("weight", weight)
    with within(setting, f"{label}: window"):
        window("window", start, end)
