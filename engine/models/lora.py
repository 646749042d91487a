"""Our LoRA layer: an ``nn.Linear`` plus any number of named low-rank updates, each routed to its
own slice of the batch.

``y = W x + b + scale_i * B_i (A_i x)`` for the slice routed to adapter ``i`` (``engine.models.routing``).
The state-dict layout is the one the adapter files and the published weights were mapped to:
``<layer>.base_layer.weight|bias``, ``<layer>.lora_A.<adapter>.weight`` (rank x in) and
``<layer>.lora_B.<adapter>.weight`` (out x rank). A new adapter's ``A`` is drawn from
N(0, 1/rank) and its ``B`` is zero (the reference's init: the layer starts equal to its base).

One adapter can be merged (fused) into the base weight when it alone drives the model; the
merge is undone as soon as routing asks for anything else.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.routing import AdapterRouting


class RoutedLoraLinear(nn.Module):
    """A base ``nn.Linear`` with per-adapter LoRA updates applied slice by slice (slices are views
    and cost nothing)."""

    routing: AdapterRouting

    def __init__(self, base_layer: nn.Linear, routing: AdapterRouting):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        object.__setattr__(self, "routing", routing)  # shared, not a submodule

    # The wrapped layer's face, for code that reads a Linear's attributes.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, rank: int, alpha: float) -> None:
        down = nn.Linear(self.in_features, rank, bias=False)
        up = nn.Linear(rank, self.out_features, bias=False)
        # Both layers are built (and drawn) as plain Linears first, then A is redrawn and B zeroed:
        # a seeded run draws the same numbers as every earlier version of this layer did.
        nn.init.normal_(down.weight, std=1 / rank)
        nn.init.zeros_(up.weight)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        self.lora_A[name] = down.to(weight.device, dtype=dtype)
        self.lora_B[name] = up.to(weight.device, dtype=dtype)
        self.scaling[name] = alpha / rank

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.lora_A[name]
        del self.lora_B[name]
        del self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in the adapter's dtype; on a CPU a 16-bit product is formed in fp32
        (CPUs may lack fast 16-bit matmuls) and rounded once."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        low = b.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
        if low:
            return ((b.float() @ a.float()) * self.scaling[name]).to(b.dtype)
        return (b @ a) * self.scaling[name]

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (in place; rounding changes only)."""
        if name not in self.lora_A or name in self.merged_adapters:
            return
        self.base_layer.weight.data += self.delta_weight(name)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                weight.data -= self.delta_weight(name).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        segments = self.routing.segments(x.shape[0])
        if self.merged:
            if len(segments) == 1 and self.merged_adapters == [segments[0][0]]:
                return self.base_layer(x, *args, **kwargs)
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        whole = len(segments) == 1
        for name, start, stop in segments:
            if name is None:
                continue
            if name not in self.lora_A:
                raise KeyError(f"adapter {name!r} is not loaded")
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            part = x if whole else x[start:stop]
            delta = lora_B(lora_A(part.to(lora_A.weight.dtype))) * self.scaling[name]
            if whole:
                result = result + delta.to(result.dtype)
            else:
                result[start:stop] += delta.to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}"
