"""CPU convolutions with their weights reordered once for oneDNN, for the length of a generation.

PyTorch's eager CPU convolution reorders the weight into oneDNN's blocked layout on every call.
For the low-resolution, wide convolutions of SD's UNet and ControlNet (640-1280 channels at
16 x 16 and below) that reorder costs as much as the arithmetic: measured at 256 x 256, one UNet
forward takes 16% less time when those weights are reordered once (as torch.compile's "freezing"
and IPEX do). High-resolution convolutions gain nothing and keep the eager path.

``prepacked_convs(modules)`` is a context manager. Inside it, each eligible ``nn.Conv2d`` keeps
only its reordered weight (so memory does not grow: a weight that is a page of the mapped
safetensors file is handed back to the kernel with ``page_out``; without that, SD1.5 in fp32 at
256 x 256 with 2 conditions peaked at 9.4 GB instead of 6.4, measured with bench/gen.py's worker);
on leaving, the plain weight is restored exactly (a reorder is a permutation). fp32 and bf16 on the CPU, where oneDNN is available: in bf16
the reorder gains as much (measured on 4 x C x H x W inputs, eager over prepacked time: 1.6x for
1280 channels at 4 x 4, 1.3x at 8 x 8, 1.6x for 640 at 16 x 16; 1.1x for 320 at 32 x 32, which
stays eager).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

MAX_PIXELS = 16 * 16  # convolutions on inputs this small or smaller use reordered weights


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


@contextmanager
def prepacked_convs(modules: Iterable[nn.Module], max_pixels: int = MAX_PIXELS) -> Iterator[None]:
    packers = []
    try:
        for module in modules:
            for conv in module.modules():
                # Plain convolutions only: subclasses (per-adapter zero convs) compute their own way.
                if type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
                    packers.append(_Packer(conv, max_pixels))
                    conv.forward = packers[-1].forward  # an instance attribute: removed below
        yield
    finally:
        for packer in packers:
            packer.restore()


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; their contents stay as they are


def page_out(tensor: torch.Tensor) -> None:
    """Ask Linux to reclaim the whole pages under ``tensor``'s data, a hint that never changes what
    they hold. Weights loaded from safetensors are pages of the mapped file: a convolution's
    weight dropped for its reordered copy would otherwise stay resident (counted in the process's
    memory) until the file is unmapped, which happens only when every weight of that file is gone.
    Clean file pages are dropped (read again if ever touched). Only memory torch does not own (a
    mapped file's, whose storage cannot be resized) is hinted."""
    madvise = _madvise()
    # Memory torch allocated itself (resizable storage) is freed with the tensor: nothing to hint.
    if madvise is None or tensor.device.type != "cpu" or tensor.untyped_storage().resizable():
        return
    page = 4096
    start = -(-tensor.data_ptr() // page) * page  # whole pages only: neighbours' data is not ours
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        madvise(start, end - start, _MADV_PAGEOUT)  # refused (old kernel, not Linux): a hint lost


@functools.cache
def _madvise():
    """libc's ``madvise``, or None where there is no C library to ask."""
    try:
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


class _Packer:
    def __init__(self, conv: nn.Conv2d, max_pixels: int):
        self.conv, self.max_pixels = conv, max_pixels
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.packed: dict[tuple[int, ...], torch.Tensor] = {}  # input shape -> reordered weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if not self.packed and (x.shape[-2] * x.shape[-1] > self.max_pixels or x.dtype != conv.weight.dtype):
            return conv._conv_forward(x, conv.weight, conv.bias)
        weight = self.packed.get(tuple(x.shape))
        if weight is None:
            dense = self._dense()
            padding, stride, dilation, groups = self.args
            weight = torch.ops.mkldnn._reorder_convolution_weight(dense, padding, stride, dilation, groups,
                                                                  list(x.shape))
            self.packed[tuple(x.shape)] = weight
            conv.weight.data = torch.empty(0, dtype=dense.dtype)  # the reordered copy replaces it
            page_out(dense)
        return torch.ops.mkldnn._convolution_pointwise(x, weight, conv.bias, *self.args, "none", [], "")

    def _dense(self) -> torch.Tensor:
        if self.packed:
            return next(iter(self.packed.values())).to_dense()
        return self.conv.weight.detach()

    def restore(self) -> None:
        if self.packed:
            self.conv.weight.data = self._dense().contiguous()
            self.packed.clear()
        self.conv.__dict__.pop("forward", None)
