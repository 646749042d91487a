"""Every environment variable ctrlora reads, in one place (as ollama's ``envconfig``).

One typed accessor per variable, read at call time (so a test's ``monkeypatch.setenv`` or a
parent's ``env=`` takes effect at once), and ``VARIABLES``: each one's name, default and meaning,
which ``ctrlora env`` prints. An empty variable counts as unset. ``flag`` is the one reading of a
true/false variable. No Typer or Rich here: the store's library imports this module.

The variables of distributed training (``LOCAL_RANK`` and the other torchrun ones) are read by
``engine.training``, where they belong to the launcher, not to the user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UsageError

TRUE = ("1", "on", "yes", "true")
DEFAULT_RETRIES = 5
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_LOG_EVERY = 30


def flag(value: str | None) -> bool:
    """True for 1, on, yes or true (any case, spaces ignored); false for anything else or unset."""
    return (value or "").strip().lower() in TRUE


@dataclass(frozen=True)
class Variable:
    name: str
    default: str  # in words, as ``ctrlora env`` shows it
    help: str
    secret: bool = False  # its value is never printed, only whether it is set

    def raw(self) -> str | None:
        """The value in the environment now; None when unset or empty."""
        return os.environ.get(self.name) or None

    def shown(self) -> str | None:
        value = self.raw()
        return "(set)" if value is not None and self.secret else value


HOME = Variable("CTRLORA_HOME", "the user data folder, e.g. ~/.local/share/ctrlora", "where the store lives")
OFFLINE = Variable("CTRLORA_OFFLINE", "off", "1: nothing touches the network; pulls use only the Hugging Face "
                   "cache, and a missing model is reported with the command that would fetch it")
CATALOG = Variable("CTRLORA_CATALOG", "none", "a JSON file of extra catalog entries (same form as the shipped "
                   "one), merged over it")
DOWNLOAD_RETRIES = Variable("CTRLORA_DOWNLOAD_RETRIES", str(DEFAULT_RETRIES), "dropped connections retried "
                            "within one pull, each from the bytes already written")
DEMO_DIR = Variable("CTRLORA_DEMO_DIR", "the demo inside the package", "the demo folder `ctrlora pull demo` "
                    "reads (a rebuilt one)")
LOG_EVERY = Variable("CTRLORA_LOG_EVERY", str(DEFAULT_LOG_EVERY), "seconds between the plain progress lines "
                    "of long jobs when no terminal is attached (a pipe, nohup, SLURM); 0: none")
SHARE_HF_CACHE = Variable("CTRLORA_SHARE_HF_CACHE", "on", "0: hub files are not also placed in the Hugging "
                          "Face cache (by default they are, hard-linked: one copy on disk that every HF tool finds)")
CPU_BF16 = Variable("CTRLORA_CPU_BF16", "auto", "whether --precision auto runs in bf16 on a CPU: 1 yes, 0 "
                    "no (fp32); auto: where the CPU computes bf16 natively (AVX512-BF16 or AMX)")
HF_TOKEN = Variable("HF_TOKEN", "none (or a saved `hf auth login`)", "token for gated or private repositories",
                    secret=True)
HF_ENDPOINT = Variable("HF_ENDPOINT", DEFAULT_HF_ENDPOINT, "another hub (a mirror)")
HF_HUB_OFFLINE = Variable("HF_HUB_OFFLINE", "off", "1: as CTRLORA_OFFLINE=1")
HF_HOME = Variable("HF_HOME", "~/.cache/huggingface", "the Hugging Face folder; its hub/ is the cache looked up")
HF_HUB_CACHE = Variable("HF_HUB_CACHE", "$HF_HOME/hub", "where the Hugging Face cache is looked up")

VARIABLES: tuple[Variable, ...] = (HOME, OFFLINE, CATALOG, DOWNLOAD_RETRIES, DEMO_DIR, SHARE_HF_CACHE, CPU_BF16,
                                   HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE, LOG_EVERY)


def describe() -> list[dict]:
    """Each variable: name, its value now (None when unset; a secret shows as "(set)"), default, meaning."""
    return [{"name": v.name, "value": v.shown(), "default": v.default, "help": v.help} for v in VARIABLES]


# --- the accessors -------------------------------------------------------------------------------

def home() -> Path:
    """CTRLORA_HOME, else the platform's user data folder for ctrlora."""
    value = HOME.raw()
    if value:
        return Path(value).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("ctrlora"))


def offline() -> bool:
    """CTRLORA_OFFLINE or HF_HUB_OFFLINE: nothing may touch the network."""
    return flag(OFFLINE.raw()) or flag(HF_HUB_OFFLINE.raw())


def share_hf_cache() -> bool:
    """CTRLORA_SHARE_HF_CACHE (default on): pulls also place hub files in the Hugging Face cache."""
    value = SHARE_HF_CACHE.raw()
    return value is None or flag(value)


def catalog_file() -> Path | None:
    """CTRLORA_CATALOG: extra catalog entries, or None."""
    value = CATALOG.raw()
    return Path(value).expanduser() if value else None


def download_retries() -> int:
    """CTRLORA_DOWNLOAD_RETRIES (at least 0)."""
    try:
        return max(0, int(DOWNLOAD_RETRIES.raw() or DEFAULT_RETRIES))
    except ValueError:
        raise UsageError("CTRLORA_DOWNLOAD_RETRIES must be a whole number") from None


def log_every() -> float:
    """CTRLORA_LOG_EVERY: seconds between plain progress lines (at least 0; 0: none)."""
    import math

    try:
        value = float(LOG_EVERY.raw() or DEFAULT_LOG_EVERY)
    except ValueError:
        value = -1
    if not math.isfinite(value) or value < 0:
        raise UsageError("CTRLORA_LOG_EVERY must be a number of seconds, at least 0")
    return value


def demo_dir() -> Path | None:
    """CTRLORA_DEMO_DIR, or None for the demo inside the package."""
    value = DEMO_DIR.raw()
    return Path(value) if value else None


def cpu_bf16() -> bool | None:
    """CTRLORA_CPU_BF16: True (bf16) or False (fp32) for ``--precision auto`` on a CPU; None (unset
    or ``auto``): the engine asks the CPU (``engine.runtime.native_cpu_bf16``)."""
    value = (CPU_BF16.raw() or "auto").strip().lower()
    if value == "auto":
        return None
    if value in TRUE or value in ("0", "off", "no", "false"):
        return flag(value)
    raise UsageError(f"CTRLORA_CPU_BF16 must be 1, 0 or auto, not {CPU_BF16.raw()!r}")


def apply_cpu_bf16() -> bool | None:
    """Hand CTRLORA_CPU_BF16 to the engine (which reads no CTRLORA_ variable), before a command
    decides its precision; returns the value handed."""
    from engine.runtime import set_cpu_bf16

    value = cpu_bf16()
    set_cpu_bf16(value)
    return value


def hf_endpoint() -> str:
    """HF_ENDPOINT without a trailing slash, else the Hugging Face Hub."""
    return (HF_ENDPOINT.raw() or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache: HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default."""
    if HF_HUB_CACHE.raw():
        return Path(HF_HUB_CACHE.raw()).expanduser()
    if HF_HOME.raw():
        return Path(HF_HOME.raw()).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# --- what we set for the libraries ---------------------------------------------------------------

LIBRARY_DEFAULTS = {
    # Our own progress is drawn by Rich; the libraries' tqdm bars and info logs are noise here.
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",  # ctrlora ui: the app sends nothing home
}


def quiet_libraries() -> None:
    """Settings for the libraries, set before any command imports them (huggingface_hub reads
    them at import time); a value the user set is kept. CTRLORA_OFFLINE also sets HF_HUB_OFFLINE,
    so every library that reaches the hub stays offline too."""
    for name, value in LIBRARY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if flag(OFFLINE.raw()):
        os.environ[HF_HUB_OFFLINE.name] = "1"
