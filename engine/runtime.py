"""Where and in what precision the engine runs: the one place that decides device and dtype.

``resolve_device("auto")`` is the GPU when there is one, else the CPU. ``resolve_precision``
fills in ``auto`` for what the run does: generation runs in fp16 on GPUs, training in bf16
autocast (fp32 master weights); both run in fp32 on CPUs. fp16 on a CPU is refused.
"""

from __future__ import annotations

import torch

from engine.errors import SettingError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): cuda when available, else cpu. A named GPU that is absent is refused."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingError("device", f"unknown device {str(device)!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", "no CUDA GPU is available here; use cpu or auto")
    return dev


def resolve_precision(precision: str | None, device: torch.device, *, training: bool = False,
                      allowed: tuple[str, ...] = ("fp32", "fp16", "bf16")) -> str:
    """A concrete precision name from ``auto`` (or None) or a requested one; ``allowed`` is what the
    caller supports (fit trains in fp32 or bf16 only)."""
    precision = "auto" if precision is None else str(precision)
    if precision not in PRECISIONS:
        raise SettingError("precision", f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = ("bf16" if training else "fp16") if device.type == "cuda" else "fp32"
    if precision not in allowed:
        raise SettingError("precision", f"{precision} is not supported here; choose one of {', '.join(allowed)}")
    if precision == "fp16" and device.type == "cpu":
        raise SettingError("precision", "fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return precision


def device_and_dtype(device: str | torch.device | None, precision: str | None, *, training: bool = False,
                     allowed: tuple[str, ...] = ("fp32", "fp16", "bf16")) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype, precision name) in one call, as generation needs them."""
    dev = resolve_device(device)
    name = resolve_precision(precision, dev, training=training, allowed=allowed)
    return dev, DTYPES[name], name
