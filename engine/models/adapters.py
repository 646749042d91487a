"""Per-condition adapters on the Base ControlNet.

A condition's adapter is (1) LoRA on every ``nn.Linear`` (``engine.models.lora``, routed per batch
slice), (2) its own 13 zero convs and (3) its own transformer norms (the GroupNorm in front of
each transformer and the LayerNorms norm1/2/3). (2) and (3) live beside the base's own values in
``Routed*`` layers, which keep the base's state-dict keys unchanged, so a bare base saves and
loads exactly like an ordinary diffusers model.

Adapter state dicts use explicit, adapter-name-free keys (the layout peft and diffusers save too):
``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight`` for LoRA and the plain module keys
(``controlnet_down_blocks.3.weight``, ``...attentions.0.norm.bias``) for zero convs and norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.lora import RoutedLoraLinear
from engine.models.routing import AdapterRouting
from engine.models.state import check_keys

DEFAULT_RANK = 128


class _Routed:
    """Mixin: per-adapter affine/conv parameters beside the base's own ``weight``/``bias``."""

    routing: AdapterRouting

    def _init_routed(self, routing: AdapterRouting) -> None:
        self.adapter_weight = nn.ParameterDict()
        self.adapter_bias = nn.ParameterDict()
        object.__setattr__(self, "routing", routing)  # shared, not a submodule

    def add_adapter(self, name: str) -> None:
        # The paper starts each condition's copy from the base's own values.
        self.adapter_weight[name] = nn.Parameter(self.weight.detach().clone())
        self.adapter_bias[name] = nn.Parameter(self.bias.detach().clone())

    def delete_adapter(self, name: str) -> None:
        del self.adapter_weight[name]
        del self.adapter_bias[name]

    def params_for(self, name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if name is None:
            return self.weight, self.bias
        if name not in self.adapter_weight:
            raise KeyError(f"adapter {name!r} is not loaded")
        return self.adapter_weight[name], self.adapter_bias[name]

    def _routed_norm(self, x: torch.Tensor, norm, shape: tuple[int, ...]) -> torch.Tensor:
        """``norm(x, weight, bias)`` with each batch slice's adapter affine: one adapter passes its
        own weight and bias to the fused kernel; several normalise once without an affine and
        apply each sample's weight and bias (viewed to ``shape``) after."""
        segments = self.routing.segments(x.shape[0])
        if len(segments) == 1:
            w, b = self.params_for(segments[0][0])
            return norm(x, w, b)
        w, b = self._per_sample_affine(segments, x.dtype)
        return norm(x, None, None) * w.view(shape) + b.view(shape)

    def _per_sample_affine(self, segments, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ws, bs = [], []
        for name, start, stop in segments:
            w, b = self.params_for(name)
            ws.append(w.to(dtype).expand(stop - start, -1))
            bs.append(b.to(dtype).expand(stop - start, -1))
        return torch.cat(ws), torch.cat(bs)


class RoutedGroupNorm(_Routed, nn.GroupNorm):
    def __init__(self, source: nn.GroupNorm, routing: AdapterRouting):
        nn.GroupNorm.__init__(self, source.num_groups, source.num_channels, source.eps, source.affine)
        self.load_state_dict(source.state_dict())
        self._init_routed(routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)  # per-sample affine over channels
        return self._routed_norm(x, lambda x, w, b: F.group_norm(x, self.num_groups, w, b, self.eps), shape)


class RoutedLayerNorm(_Routed, nn.LayerNorm):
    def __init__(self, source: nn.LayerNorm, routing: AdapterRouting):
        nn.LayerNorm.__init__(self, source.normalized_shape, source.eps, source.elementwise_affine)
        self.load_state_dict(source.state_dict())
        self._init_routed(routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)  # per-sample affine over features
        return self._routed_norm(x, lambda x, w, b: F.layer_norm(x, self.normalized_shape, w, b, self.eps), shape)


class RoutedConv2d(_Routed, nn.Conv2d):
    """A 1x1 zero conv with one weight set per adapter."""

    def __init__(self, channels: int, routing: AdapterRouting):
        nn.Conv2d.__init__(self, channels, channels, kernel_size=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self._init_routed(routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = self.routing.segments(x.shape[0])
        if len(segments) == 1:
            w, b = self.params_for(segments[0][0])
            return F.conv2d(x, w, b)
        return torch.cat([F.conv2d(x[s:e], *self.params_for(n)) for n, s, e in segments])


def install_routed_layers(model: nn.Module, routing: AdapterRouting) -> None:
    """Swap the transformer norms for routed ones (zero convs are built routed)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not is_condition_norm(full):
                continue
            if isinstance(child, nn.GroupNorm) and not isinstance(child, RoutedGroupNorm):
                setattr(module, child_name, RoutedGroupNorm(child, routing))
            elif isinstance(child, nn.LayerNorm) and not isinstance(child, RoutedLayerNorm):
                setattr(module, child_name, RoutedLayerNorm(child, routing))


def is_condition_norm(module_name: str) -> bool:
    """The norms each condition owns: a transformer's GroupNorm and its blocks' LayerNorms."""
    parts = module_name.split(".")
    if len(parts) >= 2 and parts[-2].isdigit() and parts[-3:-2] == ["attentions"] and parts[-1] == "norm":
        return True
    return "transformer_blocks" in parts and parts[-1] in ("norm1", "norm2", "norm3")


def routed_layers(model: nn.Module) -> dict[str, _Routed]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _Routed)}


def lora_layers(model: nn.Module) -> dict[str, RoutedLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RoutedLoraLinear)}


def linear_layer_names(model: nn.Module) -> list[str]:
    """Every nn.Linear of the model that LoRA targets (a LoRA layer counts as its base)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, RoutedLoraLinear):
            names.append(name)
        elif isinstance(module, nn.Linear) and ".lora_" not in name and not name.endswith("base_layer"):
            names.append(name)
    return names


def add_adapter(model, name: str, rank: int = DEFAULT_RANK, alpha: float | None = None) -> None:
    """Add a fresh condition adapter: LoRA up = 0, zero convs and norms copied from the base, so
    the model with this adapter equals the base at step 0. ``alpha`` defaults to the rank (LoRA
    scale exactly 1, as the reference). New parameters are trainable; the others keep theirs."""
    _check_name(model, name)
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, not {rank}")
    for target in linear_layer_names(model):  # model order: a seeded run draws the same numbers
        layer = model.get_submodule(target)
        if not isinstance(layer, RoutedLoraLinear):
            parent, _, child = target.rpartition(".")
            layer = RoutedLoraLinear(layer, model.routing)
            setattr(model.get_submodule(parent), child, layer)
        layer.add_adapter(name, rank, float(rank if alpha is None else alpha))
    for layer in routed_layers(model).values():
        layer.add_adapter(name)


def delete_adapter(model, name: str) -> None:
    for layer in lora_layers(model).values():
        layer.delete_adapter(name)
    for layer in routed_layers(model).values():
        layer.delete_adapter(name)


def adapter_names(model) -> list[str]:
    layers = list(routed_layers(model).values())
    return list(layers[0].adapter_weight.keys()) if layers else []


def _check_name(model, name: str) -> None:
    if not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} is already loaded")


def adapter_parameters(model, name: str) -> dict[str, nn.Parameter]:
    """The parameters one condition owns, under the adapter file's keys."""
    params: dict[str, nn.Parameter] = {}
    for prefix, layer in lora_layers(model).items():
        params[f"{prefix}.lora_A.weight"] = layer.lora_A[name].weight
        params[f"{prefix}.lora_B.weight"] = layer.lora_B[name].weight
    for prefix, layer in routed_layers(model).items():
        params[f"{prefix}.weight"] = layer.adapter_weight[name]
        params[f"{prefix}.bias"] = layer.adapter_bias[name]
    return params


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in adapter_parameters(model, name).items()}


def adapter_rank(state_dict: dict[str, torch.Tensor]) -> int:
    ranks = {v.shape[0] for k, v in state_dict.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"adapter has LoRA ranks {sorted(ranks)}; expected one")
    return ranks.pop()


def load_adapter(model, name: str, state_dict: dict[str, torch.Tensor], alpha: float | None = None) -> None:
    """Add adapter ``name`` and fill it from ``state_dict`` (adapter-file keys). Every key must be
    present with its exact shape; nothing is loaded otherwise."""

    rank = adapter_rank(state_dict)
    add_adapter(model, name, rank=rank, alpha=alpha)
    params = adapter_parameters(model, name)
    try:
        check_keys(state_dict, {k: tuple(p.shape) for k, p in params.items()}, what=f"adapter {name!r}")
    except Exception:
        delete_adapter(model, name)
        raise
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state_dict[key])


def fuse_adapter(model, name: str) -> None:
    """Merge one adapter's LoRA into the base weights (rounding changes only): fastest when one
    condition alone drives the model. Undone automatically when routing asks for anything else."""
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()
        layer.merge(name)


def unfuse_adapters(model) -> None:
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()


def is_adapter_state_key(key: str) -> bool:
    """A model state-dict key that belongs to a loaded adapter (not to the base)."""
    return ".lora_A." in key or ".lora_B." in key or ".adapter_weight." in key or ".adapter_bias." in key


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The base's own weights under plain diffusers keys, whatever adapters are loaded."""
    unfuse_adapters(model)  # a fused adapter lives inside the base weights
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not is_adapter_state_key(k)}
