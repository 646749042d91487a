"""Where and in what precision the engine runs: the one place that decides device and dtype.

``resolve_device("auto")`` is the GPU when there is one, else the CPU. ``resolve_precision``
fills in ``auto`` for what the run does: generation runs in fp16 on GPUs, training in bf16
autocast (fp32 master weights). On a CPU both run in bf16 where the CPU computes bf16 natively
(AVX512-BF16 or AMX, as ``torch.cpu`` reports them: then a bf16 matmul is several times faster
than fp32) and the model is wide enough to gain from it, in fp32 elsewhere (bf16 emulated in
fp32 units is slower than fp32). fp16 on a CPU is refused.

Width: the rule is per shape. A UNet whose first block has fewer than ``CPU_BF16_MIN_WIDTH``
channels (the demo's and the tests' 32) computes too little per operation for bf16's faster
matmuls to pay for its conversions and unvectorised elementwise work. Measured on an AVX512-BF16
EPYC, one thread, three runs on a shared machine (``python bench/precision.py --crossover
--threads 1``), fp32 over bf16 time (above 1: bf16 faster): at 32 channels a UNet forward 0.71
(8 x 8 latents, the demo's 32 px) and 0.83-1.06 (16 x 16), a training step (forward and backward,
batch 8) 0.58-0.97; at 64 channels 1.13-1.87 and 1.20-1.38; at 128, 1.64-1.84 and 1.44-1.63;
SD1.5's 320 at 256 px, 2.03-2.39.

The engine reads no ``CTRLORA_`` variable: a face that offers an override of the CPU's answer
(``CTRLORA_CPU_BF16``) passes it to ``set_cpu_bf16``.
"""

from __future__ import annotations

import torch

from engine.errors import SettingError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# CPU features with bf16 arithmetic in hardware, as torch.cpu.get_capabilities() names them.
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16")
# auto picks bf16 on a CPU for UNets whose first block has at least this many channels (see above).
CPU_BF16_MIN_WIDTH = 64

_cpu_bf16: bool | None = None  # set_cpu_bf16's override; None: ask the CPU


def native_cpu_bf16(capabilities: dict | None = None) -> bool:
    """Whether this CPU (or ``capabilities``, as ``torch.cpu.get_capabilities()`` returns them)
    computes bf16 natively: AVX512-BF16 or AMX-BF16."""
    if capabilities is None:
        get = getattr(torch.cpu, "get_capabilities", None)
        capabilities = get() if get is not None else {
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_bf16": torch.cpu._is_amx_tile_supported()}
    return any(bool(capabilities.get(name)) for name in NATIVE_BF16_FEATURES)


def set_cpu_bf16(value: bool | None) -> None:
    """Override what ``auto`` picks on a CPU: True bf16, False fp32, None the CPU's own answer."""
    global _cpu_bf16
    _cpu_bf16 = value


def cpu_bf16(width: int | None = None) -> bool:
    """Whether ``auto`` runs in bf16 on the CPU here: the override where one is set, else
    ``native_cpu_bf16`` for a model ``width`` channels wide (the UNet's first block; None: not
    known, the CPU's answer alone)."""
    if _cpu_bf16 is not None:
        return _cpu_bf16
    return native_cpu_bf16() and (width is None or width >= CPU_BF16_MIN_WIDTH)


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
                      allowed: tuple[str, ...] = ("fp32", "fp16", "bf16"), width: int | None = None) -> str:
    """A concrete precision name from ``auto`` (or None) or a requested one; ``allowed`` is what the
    caller supports (fit trains in fp32 or bf16 only); ``width``: the model's, as ``cpu_bf16``
    takes it (``engine.models.storage.unet_width``)."""
    precision = "auto" if precision is None else str(precision)
    if precision not in PRECISIONS:
        raise SettingError("precision", f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if training else "fp16"
        else:
            precision = "bf16" if device.type == "cpu" and cpu_bf16(width) else "fp32"
    if precision not in allowed:
        raise SettingError("precision", f"{precision} is not supported here; choose one of {', '.join(allowed)}")
    if precision == "fp16" and device.type == "cpu":
        raise SettingError("precision", "fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return precision


def replayed_precision(recorded: str | None, device: torch.device) -> str:
    """The precision to make a recorded image again in (``gen --from``): the one it was made in,
    unless this device cannot run it (an fp16 recipe from a GPU, replayed on a CPU): then ``auto``."""
    if recorded not in DTYPES or (recorded == "fp16" and device.type == "cpu"):
        return "auto"
    return recorded


def device_and_dtype(device: str | torch.device | None, precision: str | None, *, training: bool = False,
                     allowed: tuple[str, ...] = ("fp32", "fp16", "bf16"),
                     width: int | None = None) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype, precision name) in one call, as generation needs them."""
    dev = resolve_device(device)
    name = resolve_precision(precision, dev, training=training, allowed=allowed, width=width)
    return dev, DTYPES[name], name
