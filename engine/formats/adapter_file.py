"""Our adapter file: one ``.safetensors`` per condition.

Keys are the adapter-name-free keys of ``engine.models.adapters.adapter_state_dict`` (peft/diffusers
style). The safetensors header metadata (all strings) holds:

- ``format``: ``ctrlora-adapter``; ``format_version``: ``1``
- ``rank``, ``alpha``: the LoRA rank and alpha (scale = alpha / rank)
- ``base_arch``: the architecture id of the Base ControlNet it was made for (``engine.models.arch``)
- ``condition``: the condition's name (``canny``, ``mosaic``, ...)
- ``provenance``: JSON (where it came from: an official file and its digest, or a fit run)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import CheckpointError
from engine.files import atomic_path

FORMAT = "ctrlora-adapter"
FORMAT_VERSION = "1"


def save_adapter_file(path: str | Path, state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float,
                      base_arch: str, condition: str, provenance: dict | None = None) -> Path:
    """Write atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rank": str(rank),
        "alpha": str(alpha),
        "base_arch": base_arch,
        "condition": condition,
        "provenance": json.dumps(provenance or {}, sort_keys=True),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_adapter_metadata(path: str | Path) -> dict:
    """The header only (no tensors are read); ``rank``/``alpha`` parsed, ``provenance`` decoded."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ctrlora adapter file (import official files with `ctrlora pull`)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: adapter format version {meta.get('format_version')} is not supported")
    meta["rank"] = int(meta["rank"])
    meta["alpha"] = float(meta["alpha"])
    meta["provenance"] = json.loads(meta.get("provenance") or "{}")
    return meta


def load_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from engine.formats.tensors import load_tensor_file

    meta = read_adapter_metadata(path)
    return load_tensor_file(path), meta


def make_random_adapter(base_folder: str | Path, path: str | Path, condition: str, rank: int = 4) -> Path:
    """A fresh adapter for a base (LoRA up = 0, zero convs and norms copied from the base), so the
    model with it equals the base: for trying ``gen`` offline, not for real conditions."""
    from engine.models import adapters
    from engine.models.arch import arch_id
    from engine.models.storage import load_base

    base = load_base(base_folder)
    adapters.add_adapter(base, condition, rank=rank)
    return save_adapter_file(path, adapters.adapter_state_dict(base, condition), rank=rank, alpha=rank,
                             base_arch=arch_id(base.config), condition=condition,
                             provenance={"source": "random", "note": "untrained: equals the base"})
