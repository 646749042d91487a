"""ctrlora: CtrLoRA controllable generation on Stable Diffusion 1.5, from the command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctrlora")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
