"""Parameter counts of a store entry, from its safetensors headers (no tensor is read, torch is
not needed): the total, and for an adapter its LoRA, zero convolutions and norms."""

from __future__ import annotations

import json
import math

from ctrlora_cli.store.store import Manifest, Store


def parameter_counts(store: Store, manifest: Manifest) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in manifest.files:
        blob = store.blob_path(record.digest)
        if not record.path.endswith(".safetensors") or not blob.is_file():
            continue
        for key, shape in _safetensors_shapes(blob).items():
            group = _group(manifest.kind, record.path, key)
            counts[group] = counts.get(group, 0) + math.prod(shape)
    total = sum(counts.values())
    if manifest.kind == "base":
        return {"total": total}
    return {"total": total, **dict(sorted(counts.items()))}


def _safetensors_shapes(path) -> dict[str, list[int]]:
    """The tensor shapes in a safetensors header: 8 bytes of length (little endian), then JSON."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > 100_000_000:
            return {}
        header = json.loads(f.read(length))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _group(kind: str, path: str, key: str) -> str:
    if kind == "adapter":
        if ".lora_A." in key or ".lora_B." in key:
            return "LoRA"
        if key.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
            return "zero convs"
        return "norms"
    return path.split("/")[0] if "/" in path else "weights"
