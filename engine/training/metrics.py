"""The metrics file of a run (``metrics.jsonl``, one JSON object a line with its ``step``), as
``fit`` and ``train-base`` both write it; and where a run's TensorBoard logs go."""

from __future__ import annotations

import json
from pathlib import Path

from engine.files import write_atomic

TENSORBOARD = "tensorboard"  # the run folder's TensorBoard event files (``--log-to tensorboard``, written by the CLI)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop the metrics lines a killed run wrote after its last checkpoint (they are
    done again, so the file reads as one run), and a line torn by the kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_atomic(path, "".join(kept))


class MetricsTail:
    """Follows a metrics file another process writes: ``read()`` gives the records added since
    the last call, skipping a line still being written. The lines there when it started are
    taken as read; when the file is rewritten shorter (a resumed run's ``truncate_metrics``),
    the lines it kept stay read and what follows them is new."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._read = self._complete_lines()

    def _complete_lines(self) -> list[str]:
        try:
            text = self.path.read_text()
        except OSError:
            return []
        return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]

    def read(self) -> list[dict]:
        lines = self._complete_lines()
        kept = 0
        while kept < min(len(lines), len(self._read)) and lines[kept] == self._read[kept]:
            kept += 1
        new, records = lines[kept:], []
        for line in new:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        self._read = lines
        return records
