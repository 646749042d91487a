"""``ctrlora pull tiny``: a random tiny base, its SD and an untrained adapter, made offline, for
trying every command (and for the tests)."""

from __future__ import annotations

from ctrlora_cli.store.events import Listener, tell
from ctrlora_cli.store.names import validate_name
from ctrlora_cli.store.store import Store


def pull_tiny(store: Store, name: str = "tiny", *, preset: str = "tiny", replace: bool = False,
              on_event: Listener | None = None) -> None:
    """Add ``NAME`` (base), ``NAME-sd`` and ``NAME-canny`` (an adapter equal to the base), with
    random weights of the architecture ``preset``. Names already in the store are refused unless
    ``replace`` (``Store.claim``); a group already made this way is left as it is."""
    from engine.formats.adapter_file import make_random_adapter
    from engine.models.arch import arch_id
    from engine.models.storage import make_random_model

    validate_name(name)
    sd_name, adapter_name = f"{name}-sd", f"{name}-canny"
    validate_name(sd_name)
    validate_name(adapter_name)
    source = {"type": "random", "preset": preset, "name": name}
    names = (name, sd_name, adapter_name)
    same = lambda m: m.source.get("type") == "random" and m.source.get("preset") == preset
    if not replace and store.holds(names, same):
        tell(on_event, f"{name} is up to date (random {preset}: {', '.join(names)}); --force makes new random weights")
        return
    for entry in names:
        store.claim(entry, replace)
    labels = ["random-weights"]
    note = "randomly initialised: for trying commands offline, not for real images"
    with store.new_scratch() as tmp:
        config = make_random_model(preset, f"{tmp}/sd", f"{tmp}/base/controlnet")
        arch = arch_id(config)
        store.add_folder(sd_name, "sd", f"{tmp}/sd", source=source, labels=labels, notes=note, arch=arch,
                         replace=replace)
        base = store.add_folder(name, "base", f"{tmp}/base", arch=arch, sd=sd_name, source=source, labels=labels,
                                notes=note, replace=replace)
        # An untrained adapter (equal to the base), so `ctrlora gen` can be tried at once.
        make_random_adapter(f"{tmp}/base/controlnet", f"{tmp}/adapter.safetensors", "canny")
        store.add(adapter_name, "adapter", {"adapter.safetensors": f"{tmp}/adapter.safetensors"}, arch=arch,
                  condition="canny", rank=4, source=source, labels=labels, notes=note, replace=replace,
                  extra={"base": name, "base_digest": base.weights_digest})
    tell(on_event, f"pulled {name} (base, {preset}, random weights), {sd_name} (sd) and {adapter_name} "
                   f"(untrained adapter)")
