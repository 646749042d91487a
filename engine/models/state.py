"""Checking a state dict against the keys and shapes a model expects, before anything is loaded."""

from __future__ import annotations

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
