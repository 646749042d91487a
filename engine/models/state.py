"""Model weights as data: checking a state dict against the keys and shapes a model expects (before
anything is loaded), and identifying a model by its weights."""

from __future__ import annotations

import hashlib

import torch

from engine.errors import CheckpointError, first_few


def check_keys(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise one CheckpointError line if ``state`` does not have exactly the ``expected`` keys/shapes."""
    unknown = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown keys (first: {first_few(unknown)})")
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {first_few(missing)})")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped keys (first: {first_few(misshaped)})")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def weights_digest(*parts) -> str:
    """A hex sha256 that identifies modules by their weights, with any other parts (a version, a
    class name, a tokenizer's vocabulary) by their ``str``; in the order given.

    A module counts by each state-dict entry's name, shape and values as float32 (one byte layout
    whatever dtype the model is held in). The latent cache keys its entries on this (through
    ``engine.training.pairs``), so the scheme must not change without a cache version bump;
    ``train-base`` compares its ranks' weights with it."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.nn.Module):
            for name, tensor in part.state_dict().items():
                t = tensor.detach().to("cpu", torch.float32).contiguous()
                h.update(f"{name}:{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(torch.uint8).numpy().data)
        else:
            h.update(str(part).encode())
    return h.hexdigest()
