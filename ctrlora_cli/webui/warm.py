"""Models loaded once and kept: the SD model, the base and its adapters of the last request.
Another base reloads the base (and its adapters) only; another SD, the SD only."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path


class WarmModels:
    """One pipeline on one device and precision, rebuilt from cached parts when a request names
    other models. ``loads`` counts what was read from disk (``sd``, ``base``, ``adapter``)."""

    def __init__(self, device: str = "auto", precision: str = "auto"):
        from engine.runtime import device_and_dtype

        self.device, self.dtype, self.precision = device_and_dtype(device, precision)
        self._asked = precision  # auto is decided again for each SD (its width: engine.runtime)
        self.lock = threading.Lock()  # one generation at a time: the pipeline is not re-entrant
        self.loads: Counter = Counter()
        self._sd = self._base = None  # (key, model)
        self._adapters: dict[str, str] = {}  # adapter digest -> name in the current base
        self._pipe = None

    def pipeline(self, models):
        """(pipeline, {adapter digest: name in the pipeline}) for ``store.lookup.Models``."""
        from engine.formats.adapter_file import load_adapter_file
        from engine.generation.pipeline import CtrLoraPipeline
        from engine.models.storage import load_base, load_sd, unet_width
        from engine.runtime import device_and_dtype

        sd_key = (str(Path(models.sd_dir).resolve()), models.made_with["sd"]["digest"])
        base_key = (str(Path(models.controlnet_dir).resolve()), models.made_with["base"]["digest"])
        if self._sd is None or self._sd[0] != sd_key:
            _, dtype, precision = device_and_dtype(self.device, self._asked, width=unet_width(models.sd_dir))
            if dtype != self.dtype:  # this SD runs in another precision: the base is loaded again in it too
                self.dtype, self.precision, self._base = dtype, precision, None
            self._sd, self._pipe = (sd_key, load_sd(models.sd_dir, device=self.device, dtype=self.dtype)), None
            self.loads["sd"] += 1
        if self._base is None or self._base[0] != base_key:
            self._base = (base_key, load_base(models.controlnet_dir, device=self.device, dtype=self.dtype))
            self._pipe, self._adapters = None, {}
            self.loads["base"] += 1
        if self._pipe is None:
            # Fusing one adapter into the base and back is exact enough in fp32 only; in a
            # long-lived app half-precision weights would drift with every request.
            self._pipe = CtrLoraPipeline(self._sd[1], self._base[1], device=self.device, dtype=self.dtype,
                                         fuse_single=self.precision == "fp32")
        for path, meta, digest in models.adapters:
            if digest not in self._adapters:
                self._adapters[digest] = f"c{len(self._adapters)}"
                state, _ = load_adapter_file(path)
                self._pipe.load_adapter(self._adapters[digest], state, alpha=meta["alpha"])
                self.loads["adapter"] += 1
        return self._pipe, dict(self._adapters)
