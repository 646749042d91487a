"""Store names -> the files a pipeline loads: the resolver for ``CtrLoraPipeline.from_store``.

Why here and not in the engine: ``engine`` never imports ``ctrlora_cli`` (tests/test_layout.py),
and names mean entries of the user's store, which is ``ctrlora_cli.store``'s. So the engine's
``from_store`` is a thin classmethod that takes a resolver, and this is the resolver for the
store, with the same rules as ``ctrlora gen`` (``resolve``: the base the adapters were made for,
else the only or the 'base' base; that base's SD). ``CtrLoraPipeline`` is re-exported so that
three lines generate::

    from ctrlora_cli.store.paths import CtrLoraPipeline, store_paths
    pipe = CtrLoraPipeline.from_store("canny", resolver=store_paths)
    pipe.generate("a cosy cabin", {"canny": "edges.png"}, seed=42).images[0].save("cabin.png")
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ctrlora_cli.store.resolve import adapter_file, base_folders, base_for, base_warning
from ctrlora_cli.store.store import Store
from engine.generation.pipeline import CtrLoraPipeline
from engine.generation.pretrained import PretrainedPaths

__all__ = ["CtrLoraPipeline", "store_paths"]


def store_paths(adapters: list[str], base: str | None = None, sd: str | None = None,
                root: str | Path | None = None) -> PretrainedPaths:
    """The paths of ``adapters`` (store names or adapter files), their base and its SD, in the
    store at ``root`` (default: ``CTRLORA_HOME``). An adapter used on another base than the one it
    was made for is a ``UserWarning``, as ``ctrlora gen`` warns."""
    store = Store(root)
    manifest, controlnet, sd_folder = base_folders(store, base_for(store, adapters, base), sd)
    found = {}
    for name in adapters:
        path, _ = adapter_file(store, name, manifest)
        found[Path(name).stem if path == Path(name) else name] = path
        problem = base_warning(store, name, manifest)
        if problem:
            warnings.warn(problem, stacklevel=2)
    return PretrainedPaths(sd_folder, controlnet, found)
