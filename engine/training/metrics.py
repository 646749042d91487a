"""The metrics file of a run (``metrics.jsonl``, one JSON object a line with its ``step``), as
``fit`` and ``train-base`` both write it."""

from __future__ import annotations

import json
from pathlib import Path

from engine.files import write_atomic


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
