"""Progress for logs and dashboards: plain lines when no terminal is attached, the same figures
on a narrow terminal, TensorBoard scalars from ``fit --log-to tensorboard``."""

import io
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli
from engine.progress import Progress
from pairs import make_pairs


def test_one_line_per_interval_with_step_loss_speed_and_one_eta(monkeypatch):
    from ctrlora_cli import progress

    printed = []
    monkeypatch.setattr(progress.err, "print", lambda text, **kw: printed.append(text))
    clock = iter([100.0, 100.0, 101.0, 102.0, 131.0, 140.0])  # the log starts; then each event's time
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    log = progress.LineLog(progress.describe_fit, every=30)
    info = dict(loss=0.5, loss_smooth=0.25, images_s=8.0, memory_gb=None)
    for step, eta in ((1, None), (2, 40.0), (30, 35.0), (31, 34.0), (40, 0.0)):
        log(Progress("train", step, 40, dict(info, it_s=2.0 if step > 1 else 0.0, eta_s=eta)))
    # Nothing before 30 s; then one line; then the task's last line (it was logged).
    assert printed == ["train 31/40 (78%) · loss 0.2500 · 8.0 img/s · 2.00 it/s · ETA 34s",
                       "train 40/40 (100%) · loss 0.2500 · 8.0 img/s · 2.00 it/s"]


def test_a_narrow_terminal_folds_the_figures_instead_of_cutting_them(monkeypatch):
    from rich.console import Console

    from ctrlora_cli import progress

    screen = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(progress, "err", screen)
    with progress.progress_bars(True, describe=progress.describe_fit) as callback:
        callback(Progress("train", 120, 1000, dict(loss=0.5, loss_smooth=0.1234, it_s=2.31, images_s=31.2,
                                                   eta_s=381.0, memory_gb=12.3)))
    text = " ".join(screen.file.getvalue().split())
    assert "loss 0.1234 · 31.2 img/s · GPU 12.3 GB · 2.31 it/s · ETA 6m21s" in text
    assert text.count("ETA") == 1 and "…" not in text


def test_metrics_tail_survives_a_resumed_run_rewriting_the_file(tmp_path):
    from engine.training.metrics import MetricsTail, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    tail = MetricsTail(path)  # lines there at the start count as read
    with open(path, "a") as f:
        f.write(json.dumps({"step": 4}) + "\n" + '{"step": 5')  # the last one still being written
    assert [r["step"] for r in tail.read()] == [4]
    truncate_metrics(path, 2)  # a resume from step 2's checkpoint
    with open(path, "a") as f:
        f.write(json.dumps({"step": 3, "again": True}) + "\n")
    assert tail.read() == [{"step": 3, "again": True}]
    assert tail.read() == []


def test_log_to_tensorboard_without_the_extra_is_one_line(tiny_store, tmp_path):
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = run_cli("fit", str(make_pairs(tmp_path / "data", n=1)), "--name", "x", "--base", "tiny", "--log-to",
                     "tensorboard", env={"PYTHONPATH": f"{shadow.parent}{os.pathsep}{REPO}"})
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --log-to: tensorboard needs the tensorboard package: pip install 'ctrlora[tensorboard]'"), result.stderr
    assert not tiny_store.exists("x")


def test_fit_through_a_pipe_logs_progress_lines_while_it_runs_and_tensorboard_scalars(tiny_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, run = make_pairs(tmp_path / "data", n=2), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CTRLORA_HOME": str(tiny_store.root), "CTRLORA_LOG_EVERY": "0.01",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ctrlora_cli", "fit", str(data), "--name", "piped", "--base", "tiny",
                             "--run-dir", str(run), "--rank", "4", "--resolution", "64", "--steps", "8",
                             "--save-every", "0", "--val-every", "0", "--log-to", "tensorboard"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, running = [], None
    deadline = time.monotonic() + 300
    while running is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line, (seen, proc.communicate())
        seen.append(line)
        if line.startswith("train "):
            running = proc.poll() is None  # a progress line read while fit still runs
    out, rest = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(seen) + rest
    assert running, "".join(seen)
    train = [line for line in seen + rest.splitlines(keepends=True) if line.startswith("train ")]
    assert train[-1].startswith("train 8/8 (100%) · loss ") and " it/s" in train[-1]
    assert all(line.count("ETA") <= 1 for line in train) and "ETA" in train[0]

    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert {"train/loss", "train/loss_smooth", "train/lr", "train/it_s"} <= set(board.Tags()["scalars"])
    logged = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert [s for s, _ in logged] == list(range(1, 9))
    assert [v for _, v in logged] == [pytest.approx(m["loss"], rel=1e-6) for m in metrics]  # float32 there
    assert [e.value for e in board.Scalars("train/lr")] == [pytest.approx(metrics[0]["lr"], rel=1e-6)] * 8


def test_a_resumed_run_replaces_what_the_killed_one_logged_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ctrlora_cli.tensorboard_log import TensorBoardLog

    killed = TensorBoardLog(tmp_path)
    for step in range(1, 7):
        killed.scalars(step, {"train/loss": 1.0, "train/lr": float("nan")})  # NaN is left out
    killed.close()
    resumed = TensorBoardLog(tmp_path)  # from the checkpoint at step 4: steps 5 and 6 again
    for step in range(5, 9):
        resumed.scalars(step, {"train/loss": 2.0})
    resumed.close()
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("train/loss")] == [(s, 1.0) for s in range(1, 5)] + [
        (s, 2.0) for s in range(5, 9)]
    assert board.Tags()["scalars"] == ["train/loss"]
