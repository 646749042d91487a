"""train-base: torchrun command lines, SLURM, and real two-process runs (CPU, gloo)."""

import json
import os
import shlex
import subprocess
import sys
import tarfile

import pytest
from PIL import Image, ImageDraw

from conftest import REPO, run_cli
from engine.training.launcher import (Topology, choose_topology, expand_nodelist, read_worker_args, topology_from_slurm,
                                     worker_args)
from engine.training.settings import FitConfig, TrainBaseSettings
from engine.training.worker import condition_at, sample_indices


def make_pairs(folder, count=6, kind="edges", seed=0):
    """A fit-layout folder of tiny pairs: a red disc (target) and its outline or mask (source)."""
    (folder / "source").mkdir(parents=True)
    (folder / "target").mkdir()
    lines = []
    for i in range(count):
        x = 8 + (i * 7 + seed * 3) % 30
        target = Image.new("RGB", (64, 64), (40 * (i % 5), 90, 160))
        ImageDraw.Draw(target).ellipse([x, x, x + 20, x + 20], fill=(230, 20, 20))
        source = Image.new("RGB", (64, 64))
        box = [x, x, x + 20, x + 20]
        if kind == "edges":
            ImageDraw.Draw(source).ellipse(box, outline=(255, 255, 255), width=2)
        else:
            ImageDraw.Draw(source).ellipse(box, fill=(255, 255, 255))
        target.save(folder / "target" / f"{i}.png")
        source.save(folder / "source" / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": "a red circle"}))
    (folder / "prompt.json").write_text("\n".join(lines) + "\n")
    return folder


def test_print_command_for_four_nodes(tiny_store, tmp_path):
    data = make_pairs(tmp_path / "edges")
    result = run_cli("train-base", str(data), "--out", "big", "--init", "tiny", "--nodes", "4", "--nproc-per-node", "8",
                     "--rdzv-endpoint", "node0:29400", "--print-command")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    for rank, line in enumerate(lines):
        assert " -m torch.distributed.run --nnodes 4 --nproc-per-node 8 " in line
        assert f"--node-rank {rank} --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id ctrlora-big" in line
        assert " -m engine.training.worker " in line and f"--data {data}" in line
    assert len({line.replace(f"--node-rank {r}", "") for r, line in enumerate(lines)}) == 1  # only the rank differs
    # The worker reads back what the command meant: the data, the run folder, the defaults.
    settings = read_worker_args(shlex.split(lines[0].split(" -m engine.training.worker ")[1]))
    assert settings.data == (str(data),) and settings.out == str(tiny_store.root / "runs" / "train-base" / "big")
    assert settings.sd == str(tiny_store.folder("tiny-sd")) and settings.init_base.endswith("controlnet")
    assert (settings.steps, settings.save_every, settings.precision) == (1000, 1000, "auto")


def test_worker_arguments_are_the_settings_written_and_read_back():
    settings = TrainBaseSettings(sd="/sd", out="/run", data=("a=/x", "/y"), shards=("/s/*.tar",), steps=8, lr=3e-3,
                                 precision="bf16", grad_checkpointing=True, resume=True, drop_prompt=0.0, seed=5)
    args = worker_args(settings)
    assert args[:4] == ["--sd", "/sd", "--out", "/run"] and args.count("--data") == 2
    assert "--batch" not in args  # a default is left to the worker, which has the same one
    assert read_worker_args(args) == settings
    # One default for the rank everywhere: the models', fit's and train-base's.
    from engine.models.adapters import DEFAULT_RANK

    assert TrainBaseSettings().rank == FitConfig().rank == DEFAULT_RANK


def test_settings_out_of_range_are_refused_naming_the_flag(tiny_store, tmp_path):
    data = make_pairs(tmp_path / "edges")
    for flag, value, message in [("--grad-accum", "0", "--grad-accum: must be at least 1, not 0"),
                                 ("--resolution", "100", "--resolution: must be a multiple of 8, not 100"),
                                 ("--save-every", "-1", "--save-every: must be at least 0, not -1")]:
        result = run_cli("train-base", str(data), "--out", "x", "--init", "tiny", flag, value, "--print-command")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [f"error: {message}"]
    # The worker started by hand refuses the same way (argparse's usage error, exit 2).
    worker = subprocess.run([sys.executable, "-m", "engine.training.worker", "--sd", "/sd", "--out", "/run",
                             "--batch", "0"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert worker.returncode == 2 and "--batch: must be at least 1, not 0" in worker.stderr


def test_several_nodes_need_an_endpoint(tiny_store, tmp_path):
    result = run_cli("train-base", str(make_pairs(tmp_path / "edges")), "--out", "x", "--init", "tiny", "--nodes", "2",
                     "--print-command")
    assert result.returncode == 2
    assert "--rdzv-endpoint" in result.stderr and "Traceback" not in result.stderr


def test_slurm_environment():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    slurm = {"SLURM_JOB_ID": "42", "SLURM_NNODES": "3", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[8-10]",
             "SLURM_GPUS_ON_NODE": "4"}
    topo = topology_from_slurm(slurm)
    assert topo == Topology(nodes=3, nproc_per_node=4, node_rank=1, rdzv_endpoint="n8:29500", rdzv_id="slurm-42")
    assert topology_from_slurm({}) is None
    # The command's options win over SLURM's; outside SLURM the defaults are one process, one node.
    assert choose_topology(None, None, None, None, None, None, "ctrlora-x", env=slurm) == topo
    assert choose_topology(None, 2, None, None, "mine", None, "ctrlora-x", env=slurm).nproc_per_node == 2
    assert choose_topology(None, None, None, None, None, None, "ctrlora-x", env={}) == Topology(rdzv_id="ctrlora-x")


def test_schedule_visits_every_condition_and_positions_do_not_repeat():
    conditions = ["a", "b", "c"]
    drawn = [condition_at(i, conditions, seed=3) for i in range(30)]
    for r in range(10):
        assert sorted(drawn[3 * r:3 * r + 3]) == conditions
    assert drawn != [condition_at(i, conditions, seed=4) for i in range(30)]
    # 2 ranks x batch 2 over one epoch of 8 samples: every sample exactly once
    seen = [int(i) for cursor in (0, 4) for rank in (0, 1) for i in sample_indices(cursor, rank, 2, 8, 0, "a")]
    assert sorted(seen) == list(range(8))
    # another number of ranks continues the same stream
    assert sorted(int(i) for i in sample_indices(0, 0, 8, 8, 0, "a")) == list(range(8))


def _torchrun(*args, nproc=2):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", str(nproc), "-m", "engine.training.worker", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_processes_train_resume_and_land_in_the_store(tiny_store, tmp_path):
    edges, masks = make_pairs(tmp_path / "edges"), make_pairs(tmp_path / "mask", kind="mask", seed=1)
    common = ["--steps", "8", "--rank", "4", "--lr", "3e-3", "--resolution", "64", "--grad-accum", "2",
              "--save-every", "4", "--seed", "5"]
    result = run_cli("train-base", str(edges), f"mask={masks}", "--out", "toybase", "--init", "tiny",
                     "--nproc-per-node", "2", "--run-dir", str(tmp_path / "run"), "--json", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    ranks = [json.loads((tmp_path / "run" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP + the explicit adapter all-reduce
    assert ranks[0]["drawn"] == ranks[1]["drawn"] and set(ranks[0]["drawn"]) == {"edges", "mask"}
    assert summary["eval_loss_end"] < summary["eval_loss_start"] - 1e-3
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9)) and all(len(m["per_rank_samples_per_s"]) == 2 for m in metrics)
    assert tiny_store.get("toybase").kind == "base" and tiny_store.get("toybase").sd == "tiny-sd"
    assert tiny_store.get("toybase-mask").condition == "mask"

    # Preempted after 4 steps, then resumed: the same weights as the uninterrupted run.
    sd = str(tiny_store.folder("tiny-sd"))
    base = str(tiny_store.folder("tiny") / "controlnet")
    worker = ["--sd", sd, "--init-base", base, "--data", f"edges={edges}", "--data", f"mask={masks}",
              "--out", str(tmp_path / "run2"), *common]
    first = _torchrun(*worker, "--stop-after", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((tmp_path / "run2" / "ranks" / "rank0.json").read_text())["weights"] != ranks[0]["weights"]
    second = _torchrun(*worker, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "run2" / "ranks" / "rank0.json").read_text())["weights"] == ranks[0]["weights"]


def test_shards_are_indexed_by_condition(tmp_path):
    from engine.training.shards import index_shards

    folder = make_pairs(tmp_path / "edges", count=3)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            tar.add(folder / "target" / f"{i}.png", arcname=f"{i:06d}.png")
            tar.add(folder / "source" / f"{i}.png", arcname=f"{i:06d}.cond.png")
            for suffix, text in (("txt", "a red circle"), ("json", json.dumps({"condition": "edges" if i < 2 else "seg"}))):
                path = tmp_path / f"{i}.{suffix}"
                path.write_text(text)
                tar.add(path, arcname=f"{i:06d}.{suffix}")
    index = index_shards([str(tmp_path / "shard-*.tar")])
    assert {c: len(v) for c, v in index.items()} == {"edges": 2, "seg": 1}
    sample = index["edges"][1]
    assert sample.prompt == "a red circle"
    assert sample.target.read() == (folder / "target" / "1.png").read_bytes()
    assert sample.cond.read() == (folder / "source" / "1.png").read_bytes()
