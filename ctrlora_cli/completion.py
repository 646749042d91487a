"""Shell completion (``ctrlora --install-completion``): the callbacks Typer calls on TAB for store
names and condition kinds. They read the store's manifests only (no weights, no torch) and never
fail: a store that cannot be read completes nothing."""

from __future__ import annotations

from typing import Callable


def store_names(*kinds: str) -> Callable[[str], list[str]]:
    """Completes the store's entries (of ``kinds``, all when none), by name."""

    def complete(incomplete: str) -> list[str]:
        try:
            from ctrlora_cli.store.store import Store

            return [m.name for m in Store().list() if (not kinds or m.kind in kinds) and m.name.startswith(incomplete)]
        except Exception:  # completion must never print a traceback into the shell
            return []

    return complete


any_name = store_names()
adapter_names = store_names("adapter")
base_names = store_names("base")
sd_names = store_names("sd")
init_names = store_names("sd", "base")  # train-base --init


def cond_values(incomplete: str) -> list[str]:
    """gen --cond NAME=IMAGE: the adapter's name, up to the '='."""
    if "=" in incomplete:
        return []
    return [f"{name}=" for name in adapter_names(incomplete)]


def extractor_kinds(incomplete: str) -> list[str]:
    """prep KIND, gen --prep [NAME=]KIND: the built-in extractors."""
    from engine.demo.extractors import SPECS

    head, sep, tail = incomplete.rpartition("=")
    return [f"{head}{sep}{kind}" for kind in SPECS if kind.startswith(tail)]


def world_conditions(incomplete: str) -> list[str]:
    from engine.demo.world import CONDITIONS

    return [c for c in CONDITIONS if c.startswith(incomplete)]


def fidelity_kinds(incomplete: str) -> list[str]:
    """eval --kind: the measures eval knows."""
    from engine.demo.fidelity import PRIMARY

    return [k for k in PRIMARY if k.startswith(incomplete)]
