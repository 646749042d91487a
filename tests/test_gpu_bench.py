"""bench/gpu.sh, the one script for a CUDA machine: its dry run on the CPU (every stage's code at
the tiny preset) with the JSON it writes and the table it prints, and the stages' isolation (a
stage that fails or hangs is recorded with what it measured, and the rest still runs)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu  # noqa: E402

# train-base's stage is left out here (a torchrun and a worker process: ~15 s more on 2 cores);
# tests/test_train_base.py runs train-base itself, and `bash bench/gpu.sh --dry-run` runs the stage.
STAGES = [s.name for s in gpu.STAGES if s.name != "train-base"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-bench")
    out = tmp / "bench.json"
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--cache", str(tmp / "cache"),
                           "--out", str(out), "--stages", ",".join(STAGES)], capture_output=True, text=True, timeout=600, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_dry_run_runs_every_stage_and_writes_the_figures(dry_run):
    _, report = dry_run
    assert report["dry_run"] is True and report["plan"]["preset"] == "tiny" and report["environment"]["gpu"] is None
    assert list(report["stages"]) == STAGES
    for name, stage in report["stages"].items():
        if name == "gen-compile":  # compiling takes minutes on a CPU
            assert stage["status"] == "skipped" and stage["results"] == []
            continue
        assert stage["status"] == "ok", (name, stage)
        assert stage["results"] and not [r for r in stage["results"] if "error" in r], (name, stage["results"])
        assert 0 < stage["seconds"] <= stage["cap_s"] + 5
    stages = {name: s["results"] for name, s in report["stages"].items()}
    peak = report["bf16_matmul_peak_tflops"]
    assert peak == stages["peak"][0]["bf16_matmul_tflops"] > 0
    assert {r["method"] for r in stages["gen-fp16"]} == {"ours", "reference", "diffusers"}
    assert [(r["method"], r["precision"]) for r in stages["gen-bf16"]] == [("ours", "bf16")]
    for r in stages["gen-fp16"] + stages["gen-bf16"]:
        assert r["conditions"] == 2 and r["steps"] == 2 and r["peak_memory_gb"] > 0
        assert 0 < r["seconds_per_step"] < r["one_image_seconds"]
    ours16, ours_bf16 = stages["gen-fp16"][0], stages["gen-bf16"][0]
    # FLOPs are counted once per case and shared by its precisions.
    assert ours16["fraction_of_bf16_peak"] == pytest.approx(
        ours16["flops_per_step"] / ours16["seconds_per_step"] / (peak * 1e12))
    assert ours_bf16["fraction_of_bf16_peak"] == pytest.approx(
        ours16["flops_per_step"] / ours_bf16["seconds_per_step"] / (peak * 1e12))
    for name in ("fit-ours", "fit-diffusers"):
        (r,) = stages[name]
        assert r["minutes_per_1000_steps"] == pytest.approx(r["seconds_per_step"] * 1000 / 60)
        assert r["fraction_of_bf16_peak"] == pytest.approx(r["achieved_tflops"] / peak) and r["peak_memory_gb"] > 0
    (check_gen,) = stages["check-gen"]
    assert check_gen["ok"] and check_gen["finite"] and check_gen["precision"] == "bf16"
    assert 0 < check_gen["latents_relative_error"] <= gpu.CHECK_TOLERANCE  # bf16 differs from fp32, a little
    (check_fit,) = stages["check-fit"]
    assert check_fit["ok"] and len(check_fit["losses"]) == 2
    assert check_fit["fixed_loss_after"] < check_fit["fixed_loss_before"]
    targets = report["targets"]
    assert [t["met"] for t in targets.values()] == [None, None]  # not judged at the tiny size
    gen_target = targets["gen: one 512 x 512 image, 20 steps, 2 conditions, CFG, fp16"]
    assert gen_target["seconds"] == ours16["one_image_seconds"] and gen_target["bar"] == 0.4


def test_dry_run_prints_the_table(dry_run):
    stdout, report = dry_run
    lines = stdout.splitlines()
    assert lines[0].startswith("ctrlora GPU bench (dry run, CPU, tiny preset; torch ")
    assert lines[1].split() == ["stage", "case", "prec", "s/step", "result", "mem", "GB", "of", "peak", "status"]
    rows = {(line.split()[0], " ".join(line.split()[1:3])) for line in lines[3:] if line.split()}
    assert {("gen-fp16", "ours x2"), ("gen-fp16", "reference x2"), ("gen-fp16", "diffusers x2"),
            ("gen-bf16", "ours x2"), ("fit-ours", "ours fp32"), ("fit-diffusers", "diffusers fp32")} <= rows
    assert any(line.startswith("gen-compile") and "skipped: not in the dry run" in line for line in lines)
    assert sum(line.startswith("target ") and line.endswith(": not judged") for line in lines) == 2
    ours = next(line for line in lines if line.startswith("gen-fp16") and "ours x2" in line)
    assert f"{report['stages']['gen-fp16']['results'][0]['one_image_seconds']:.3f} s/image" in ours
    assert lines[-1].startswith("written: ")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stage_that_fails_or_hangs_is_recorded_with_what_it_measured(tmp_path):
    log = tmp_path / "stages.log"
    results = tmp_path / "failing.jsonl"
    failing = (f"import json, sys; open({str(results)!r}, 'a').write(json.dumps({{'case': 1}}) + '\\n'); "
               "print('RuntimeError: CUDA error: an illegal memory access', file=sys.stderr); sys.exit(3)")
    record = gpu.run_isolated([sys.executable, "-c", failing], 30, results, log)
    assert record["status"] == "failed" and record["results"] == [{"case": 1}]
    assert record["error"] == "exit 3: RuntimeError: CUDA error: an illegal memory access"

    results, child = tmp_path / "hanging.jsonl", tmp_path / "child.pid"
    hanging = (f"import json, subprocess, time; open({str(results)!r}, 'a').write(json.dumps({{'case': 2}}) + '\\n'); "
               f"p = subprocess.Popen(['sleep', '60']); open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.perf_counter()
    record = gpu.run_isolated([sys.executable, "-c", hanging], 2, results, log)
    assert record["status"] == "timeout" and record["results"] == [{"case": 2}] and record["cap_s"] == 2
    assert record["error"] == "stopped at its time cap (2 s)" and time.perf_counter() - start < 10
    deadline = time.time() + 5
    while _alive(int(child.read_text())) and time.time() < deadline:  # what the stage started goes too
        time.sleep(0.1)
    assert not _alive(int(child.read_text()))
    assert "CUDA error" in log.read_text()  # every stage's output, in one log beside the JSON


def test_the_budget_skips_stages_and_bad_options_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main sets these for the dry run
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "b.json"
    assert gpu.main(["--dry-run", "--stages", "peak,gen-fp16", "--budget", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {s["status"] for s in report["stages"].values()} == {"skipped"}
    assert re.fullmatch(r"budget spent \(\d s left, needs 40 s\)", report["stages"]["gen-fp16"]["error"])
    assert report["targets"]["fit: 1,000 steps at 512 x 512, batch 1, bf16"]["minutes_per_1000_steps"] is None
    assert "skipped: budget spent" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--dry-run", "--stages", "peak,nope"])
    assert exit_.value.code == 2 and "unknown stage 'nope'" in capsys.readouterr().err
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--wheels", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith(f"error: no wheels in '{tmp_path}'")
