"""Reading tensor files safely: ``.safetensors``, or a pickle opened with ``weights_only=True`` and
refused unless it is a plain ``{name: tensor}`` dict."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from engine.errors import CheckpointError, first_few


def load_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from ``.safetensors`` or a pickled ``.ckpt/.pt/.pth/.bin``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged?): {exc}") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused: the pickle holds more than plain tensors ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or damaged?): {first}") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]  # Lightning-style wrapper
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: refused: expected a dict of tensors, found {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: refused: {len(bad)} entries are not tensors (first: {first_few(bad)})")
    return data


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def save_tensor_file(path: str | Path, state: dict[str, torch.Tensor], *, dtype: str | None = None,
                     metadata: dict[str, str] | None = None, replace: bool = True) -> Path:
    """Write a flat ``{name: tensor}`` dict whole or not at all (``engine.files.atomic_path``):
    ``.safetensors`` (with ``metadata`` in its header), or a plain pickled dict for ``.ckpt``/``.pt``/
    ``.pth`` (what ``torch.load(weights_only=True)`` opens; a pickle has no header, so ``metadata``
    is not kept). ``dtype`` (``fp32``/``fp16``) casts the floating-point tensors. ``replace=False``
    raises ``FileExistsError`` rather than replace an existing file."""
    from engine.files import atomic_path

    path = Path(path)
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: write .safetensors or {'/'.join(PICKLE_SUFFIXES)}, not {path.suffix or 'no suffix'}")
    cast = DTYPES[dtype] if dtype else None
    tensors = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state.items()}
    with atomic_path(path, replace=replace) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, str(tmp))
    return path
