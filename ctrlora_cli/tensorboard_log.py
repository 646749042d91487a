"""``fit`` and ``train-base`` ``--log-to tensorboard``: the run's figures as TensorBoard scalars.

The engine knows nothing of it: ``fit``'s writer listens to the engine's progress events
(``train``: loss, its moving average, lr, it/s, img/s), and ``train-base``'s reads rank 0's
metrics lines, as its progress does, in the command's own process on node 0 (the workers stay
free of it, and one writer serves any number of ranks). Events go to ``<run>/tensorboard``
(``engine.training.metrics.TENSORBOARD``), which a run started over with ``--force`` clears; a
resumed run purges what the killed one logged after its checkpoint. ``torch.utils.tensorboard``
needs the ``tensorboard`` package: ``pip install 'ctrlora[tensorboard]'``."""

from __future__ import annotations

import math
from pathlib import Path

from engine.errors import SettingError
from engine.training.metrics import TENSORBOARD


def check_available(log_to) -> None:
    """Refuse ``--log-to tensorboard`` (``ctrlora_cli.options.LogTo``) before any work when the
    extra is not installed."""
    if log_to != "tensorboard":
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise SettingError("log_to", "tensorboard needs the tensorboard package: "
                                     "pip install 'ctrlora[tensorboard]'") from None


class TensorBoardLog:
    """Scalars into ``<run_dir>/tensorboard``; the writer opens at the first figures, purging
    anything logged from that step on (a resumed run's repeated steps), and again when the steps
    go back (workers restarted by torchrun, ``--max-restarts``, redo the steps since the checkpoint)."""

    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / TENSORBOARD
        self._writer = None
        self._last = None

    def scalars(self, step: int, values: dict) -> None:
        if self._writer is not None and step <= self._last:
            self.close()
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder), purge_step=step)
        self._last = step
        for tag, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def fit_listener(self, then):
        """An engine progress callback: ``train`` events as scalars, every event on to ``then``."""
        def listen(event) -> None:
            if event.task == "train":
                info = event.info
                self.scalars(int(event.completed), {"train/loss": info.get("loss"),
                                                    "train/loss_smooth": info.get("loss_smooth"),
                                                    "train/lr": info.get("lr"), "train/it_s": info.get("it_s"),
                                                    "train/images_s": info.get("images_s"),
                                                    "train/gpu_memory_gb": info.get("memory_gb")})
            then(event)
        return listen

    def train_base_record(self, record: dict) -> None:
        """One of rank 0's metrics lines (``engine.training.worker``)."""
        self.scalars(int(record["step"]), {"train/loss": record.get("loss"), "train/lr": record.get("lr"),
                                           "train/it_s": record.get("it_s"),
                                           "train/samples_s": record.get("samples_per_s"),
                                           "train/gpu_memory_gb": record.get("gpu_mem_gb")})
