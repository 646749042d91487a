"""``ctrlora pull tiny``: a random tiny base, its SD and an untrained adapter, made offline, for
trying every command (and for the tests)."""

from __future__ import annotations

from ctrlora_cli.store.events import Listener, tell
from ctrlora_cli.store.names import validate_name
from ctrlora_cli.store.store import Store


def pull_tiny(store: Store, name: str = "tiny", *, preset: str = "tiny", replace: bool = False,
              on_event: Listener | None = None) -> None:
    """Add ``NAME`` (base), ``NAME-sd`` and ``NAME-canny`` (an adapter equal to the base), with
    random weights of the architecture ``preset``. A name that holds something else is refused
    unless ``replace`` (``Store.claim_group``); entries already made this way are kept, and only
    the missing ones are made (``replace``: all of them, with new random weights)."""
    from engine.formats.adapter_file import make_random_adapter
    from engine.models.arch import arch_id
    from engine.models.storage import make_random_model

    validate_name(name)
    sd_name, adapter_name = f"{name}-sd", f"{name}-canny"
    validate_name(sd_name)
    validate_name(adapter_name)
    source = {"type": "random", "preset": preset, "name": name}
    same = lambda m: (m.source.get("type") == "random" and m.source.get("preset") == preset
                      and m.source.get("name", name) == name)
    todo = store.claim_group((name, sd_name, adapter_name), same, replace)
    if not todo:
        tell(on_event, f"{name} is up to date (random {preset}: {name}, {sd_name}, {adapter_name}); --force makes "
                       f"new random weights")
        return
    labels = ["random-weights"]
    note = "randomly initialised: for trying commands offline, not for real images"
    # replace=True: what is written is rewritten whole, a damaged blob of the same digest too.
    meta = dict(source=source, labels=labels, notes=note, replace=True)
    with store.new_scratch() as tmp:
        config = make_random_model(preset, f"{tmp}/sd", f"{tmp}/base/controlnet")
        arch = arch_id(config)
        if sd_name in todo:
            store.add_folder(sd_name, "sd", f"{tmp}/sd", arch=arch, **meta)
        if name in todo:
            store.add_folder(name, "base", f"{tmp}/base", arch=arch, sd=sd_name, **meta)
        if adapter_name in todo:
            # An untrained adapter (equal to the base), so `ctrlora gen` can be tried at once.
            base = store.get(name)
            make_random_adapter(store.folder(name) / "controlnet", f"{tmp}/adapter.safetensors", "canny")
            store.add(adapter_name, "adapter", {"adapter.safetensors": f"{tmp}/adapter.safetensors"}, arch=arch,
                      condition="canny", rank=4, extra={"base": name, "base_digest": base.weights_digest}, **meta)
    kinds = {name: f"{name} (base, {preset}, random weights)", sd_name: f"{sd_name} (sd)",
             adapter_name: f"{adapter_name} (untrained adapter)"}
    made = [kinds[n] for n in (name, sd_name, adapter_name) if n in todo]
    kept = [n for n in (name, sd_name, adapter_name) if n not in todo]
    tell(on_event, f"pulled {_and(made)}" + (f"; {_and(kept)} already there" if kept else ""))


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]
