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
from engine.training.launcher import (Topology, choose_topology, expand_nodelist, parse_nodelist, read_worker_args,
                                     topology_from_slurm, worker_args, worker_env)
from engine.training.metrics import truncate_metrics
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
                                 ("--save-every", "-1", "--save-every: must be at least 0, not -1"),
                                 ("--precision", "fp16", "--precision: train-base trains in fp32 or bf16, not fp16: "
                                  "fp16 training needs a gradient scaler (small gradients underflow to zero in fp16), "
                                  "which train-base does not have; use bf16 (GPUs since Ampere) or fp32")]:
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
    assert parse_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    slurm = {"SLURM_JOB_ID": "42", "SLURM_NNODES": "3", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[8-10]",
             "SLURM_GPUS_ON_NODE": "4"}
    topo = topology_from_slurm(slurm)
    assert topo == Topology(nodes=3, nproc_per_node=4, node_rank=1, rdzv_endpoint="n8:29500", rdzv_id="slurm-42")
    assert topology_from_slurm({}) is None
    # The command's options win over SLURM's; outside SLURM the defaults are one process, one node.
    assert choose_topology(None, None, None, None, None, None, "ctrlora-x", env=slurm) == topo
    assert choose_topology(None, 2, None, None, "mine", None, "ctrlora-x", env=slurm).nproc_per_node == 2
    assert choose_topology(None, None, None, None, None, None, "ctrlora-x", env={}) == Topology(rdzv_id="ctrlora-x")


@pytest.mark.parametrize("nodelist, hosts", [
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),  # several groups in a name
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),  # zero padding
    ("n[1,3-5]", ["n1", "n3", "n4", "n5"]),  # single values and ranges mixed
    ("a[1-2],b3,c[08-09]-x", ["a1", "a2", "b3", "c08-x", "c09-x"]),  # top-level commas; commas in brackets do not split
    ("login1", ["login1"]),
])
def test_slurm_host_lists(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


def test_slurm_hosts_come_from_scontrol_where_it_exists(tmp_path, monkeypatch):
    """A real executable first on the PATH stands in for SLURM's scontrol: it is asked, and its
    first line is the meeting point; without it the parser answers."""
    script = tmp_path / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "asked"}\nprintf "alpha-7\\nbeta-2\\n"\n')
    script.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "9", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "rack[1-2]-node1"}
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert expand_nodelist("rack[1-2]-node1") == ["alpha-7", "beta-2"]
    assert (tmp_path / "asked").read_text().split() == ["show", "hostnames", "rack[1-2]-node1"]
    assert topology_from_slurm(slurm).rdzv_endpoint == "alpha-7:29500"
    script.unlink()
    assert topology_from_slurm(slurm).rdzv_endpoint == "rack1-node1:29500"


def test_each_worker_gets_its_share_of_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert worker_env(2, {})["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert worker_env(4 * cores, {})["OMP_NUM_THREADS"] == "1"
    assert worker_env(1, {"OMP_NUM_THREADS": "3", "X": "y"}) == {"OMP_NUM_THREADS": "3", "X": "y"}  # the user's wins


def test_resume_drops_metrics_past_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    truncate_metrics(metrics, 4)  # a killed run: checkpoint at 4, lines to 6, a torn 7th
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_names_data_and_run_folders_are_checked_before_any_work(tiny_store, tmp_path):
    """``--out`` and every ``OUT-COND`` by the store's rule, the data, the run folder: one line,
    exit 2, in --print-command too (it starts nothing)."""
    from ctrlora_cli.store.store import Store

    edges = make_pairs(tmp_path / "edges")
    base = ["--init", "tiny", "--print-command"]

    def refused(*args):
        result = run_cli("train-base", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, \
            result.stderr
        return result.stderr

    assert "'tiny' is already in the store (base from random tiny); use another --out, or --force" in \
        refused(str(edges), "--out", "tiny", *base)
    tiny_store.remove(["tiny"])  # OUT free, OUT-COND taken: the adapter 'tiny-canny' would be replaced
    assert "'tiny-canny' is already in the store (adapter" in \
        refused(f"canny={edges}", "--out", "tiny", "--init", "tiny-sd", "--print-command")
    # --conditions decides which adapters are made: tiny-canny is not one of them
    assert run_cli("train-base", f"canny={edges}", f"other={edges}", "--conditions", "other", "--out", "tiny",
                   "--init", "tiny-sd", "--print-command").returncode == 0
    assert run_cli("train-base", f"canny={edges}", "--out", "tiny", "--init", "tiny-sd", "--print-command",
                   "--force").returncode == 0
    base = ["--init", "tiny-sd", "--print-command"]
    assert f"data folder {tmp_path / 'nope'} does not exist" in refused(str(edges), str(tmp_path / "nope"), "--out", "x",
                                                                         *base)
    assert "is not a folder" in refused(f"e={edges / 'prompt.json'}", "--out", "x", *base)
    assert "condition 'edges' is given twice" in refused(str(edges), f"edges={edges}", "--out", "x", *base)
    assert f"--shards '{tmp_path}/s-*.tar' matches no file" in refused(str(edges), "--shards", str(tmp_path / "s-*.tar"),
                                                                       "--out", "x", *base)
    assert "--conditions: names ['seg'] with no data (have: ['edges'])" in \
        refused(str(edges), "--conditions", "edges,seg", "--out", "x", *base)
    assert "nothing to resume in" in refused(str(edges), "--out", "x", "--resume", *base)

    # A run folder left by an entry removed since (or a killed run) names itself and both ways out.
    left = tiny_store.run_folder("gone", "train-base")
    left.mkdir(parents=True)
    (left / "metrics.jsonl").write_text('{"step": 1}\n')
    message = refused(str(edges), "--out", "gone", *base)
    assert f"run folder {left} already holds a run; continue it with --resume, or start over with --force" in message
    assert "delete the folder" in message
    assert "stopped before its first checkpoint; start it again with --force" in \
        refused(str(edges), "--out", "gone", "--resume", *base)
    assert "--print-command does not clear run folders" in refused(str(edges), "--out", "gone", "--force", *base)
    # A run folder in the store that entries were made in: `ctrlora rm` of them clears it too.
    store = Store(tiny_store.root)
    store.add("made", "base", {"controlnet/config.json": tiny_store.folder("tiny-sd") / "unet" / "config.json"},
              source={"type": "train-base", "run": str(left)})
    assert "`ctrlora rm made` (which removes the run folder with them)" in \
        refused(str(edges), "--out", "other", "--run-dir", str(left), *base)


def test_adapters_of_shard_conditions_are_claimed_before_storing(tiny_store, tmp_path):
    """The conditions of shards are known only after the run: ``add_trained_base`` claims every
    name before it stores any; then the adapters record their base's digest, and the result folder
    goes (the store holds it)."""
    import shutil

    from ctrlora_cli.store.results import add_trained_base
    from ctrlora_cli.store.store import NameTaken

    result = tmp_path / "run" / "result"
    shutil.copytree(tiny_store.folder("tiny") / "controlnet", result / "controlnet")
    (result / "adapters").mkdir()
    shutil.copyfile(tiny_store.file("tiny-canny", "adapter.safetensors"), result / "adapters" / "canny.safetensors")
    (result / "summary.json").write_text(json.dumps({"conditions": ["canny"], "arch": tiny_store.get("tiny").arch,
                                                     "base_zero_convs_from": "canny"}))
    tiny_store.remove(["tiny"])  # OUT free, OUT-COND taken
    with pytest.raises(NameTaken, match="'tiny-canny' is already in the store.*the trained run is kept in"):
        add_trained_base(tiny_store, result, tmp_path / "run", "tiny", "tiny-sd", 8)
    assert not tiny_store.exists("tiny") and result.is_dir()  # nothing stored, nothing lost
    summary = add_trained_base(tiny_store, result, tmp_path / "run", "tiny", "tiny-sd", 8, force=True)
    base, adapter = tiny_store.get("tiny"), tiny_store.get("tiny-canny")
    assert summary["base_digest"] == base.weights_digest and adapter.source["type"] == "train-base"
    assert adapter.made_for == {"name": "tiny", "digest": base.weights_digest}
    assert not result.exists()


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


COMMON = ["--steps", "8", "--rank", "4", "--lr", "3e-3", "--resolution", "64", "--grad-accum", "2", "--save-every", "4",
          "--seed", "5"]


def _worker_env(**more):
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **more)


def _processes_of(run, rank: int | None = None) -> list[int]:
    """Live processes whose command line names the run folder (Linux /proc); with ``rank``, only
    the worker of that rank (torchrun's ``RANK`` in its environment)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0") if rank is not None else []
        except OSError:
            continue
        if entry.isdigit() and int(entry) != os.getpid() and str(run) in cmdline and (
                rank is None or (b"-m\0engine.training.worker" in cmdline.encode() and f"RANK={rank}".encode() in environ)):
            found.append(int(entry))
    return found


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _last_step(run) -> int:
    """The last step in the metrics so far (a line still being written is not counted)."""
    path = run / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")] if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def _rank0(run) -> dict:
    return json.loads((run / "ranks" / "rank0.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_store_template, tmp_path_factory):
    """Two runs of the same 8 steps on 2 processes through ``ctrlora train-base`` (tiny preset,
    64 px, checkpoint every 4 steps): one uninterrupted; one with ``--max-restarts 1`` whose rank-1
    worker is killed with SIGKILL at step 6, i.e. two steps after its checkpoint, and which
    torchrun restarts. ``killed`` is a copy of that run's folder as the kill found it (for a resume
    by hand)."""
    import shutil
    import signal
    import time

    from conftest import cli_env
    from ctrlora_cli.store.store import Store

    tmp = tmp_path_factory.mktemp("train-base")
    shutil.copytree(tiny_store_template, tmp / "home", ignore=shutil.ignore_patterns("views", ".lock"))
    store, env = Store(tmp / "home"), {"CTRLORA_HOME": str(tmp / "home")}
    edges, masks = make_pairs(tmp / "edges"), make_pairs(tmp / "mask", kind="mask", seed=1)
    data = [str(edges), f"mask={masks}"]
    # OMP_NUM_THREADS left unset: the launcher gives each process its share of the cores.
    done = run_cli("train-base", *data, "--out", "toybase", "--init", "tiny", "--nproc-per-node", "2",
                   "--run-dir", str(tmp / "run"), "--json", "--log-to", "tensorboard", *COMMON,
                   env={**env, "OMP_NUM_THREADS": "", "CTRLORA_LOG_EVERY": "0.01"})
    assert done.returncode == 0, done.stderr[-3000:]

    elastic = tmp / "elastic"
    with open(tmp / "elastic.out", "w") as stdout, open(tmp / "elastic.err", "w") as stderr:
        # --pause-after (hidden, for tests): the first attempt's workers wait at step 6 to be killed
        process = subprocess.Popen([sys.executable, "-m", "ctrlora_cli", "train-base", *data, "--out", "elastic",
                                    "--init", "tiny", "--nproc-per-node", "2", "--run-dir", str(elastic), "--json",
                                    "--log-to", "tensorboard", "--max-restarts", "1", *COMMON, "--pause-after", "6"],
                                   env=cli_env({**env, "OMP_NUM_THREADS": "1"}), stdout=stdout, stderr=stderr)
        try:
            deadline = time.time() + 300
            while _last_step(elastic) < 6:
                assert process.poll() is None and time.time() < deadline, (tmp / "elastic.err").read_text()[-3000:]
                time.sleep(0.05)
            shutil.copytree(elastic, tmp / "killed")  # a run killed at step 6, to resume by hand
            [victim] = _processes_of(elastic, rank=1)
            os.kill(victim, signal.SIGKILL)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    return {"tmp": tmp, "store": store, "env": env, "data": data, "summary": json.loads(done.stdout), "log": done.stderr,
            "run": tmp / "run", "killed": tmp / "killed", "elastic": elastic, "elastic_exit": process.returncode,
            "elastic_out": (tmp / "elastic.out").read_text(), "elastic_err": (tmp / "elastic.err").read_text()}


def _scalars(run, tag) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    return [(e.step, e.value) for e in board.Scalars(tag)]


@pytest.mark.slow
def test_two_processes_train_and_land_in_the_store(runs):
    run, store, summary = runs["run"], runs["store"], runs["summary"]
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP + the explicit adapter all-reduce
    assert ranks[0]["drawn"] == ranks[1]["drawn"] and set(ranks[0]["drawn"]) == {"edges", "mask"}
    assert summary["eval_loss_end"] < summary["eval_loss_start"] - 1e-3
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 9)) and all(len(m["per_rank_samples_per_s"]) == 2 for m in metrics)
    # Each of the 2 processes got its share of the cores (OMP_NUM_THREADS unset).
    cores = len(os.sched_getaffinity(0))
    assert [r["threads"] for r in ranks] == [max(1, cores // 2)] * 2
    assert [(r["precision"], r["unet_dtype"]) for r in ranks] == [("fp32", "float32")] * 2 and ranks[0]["peak_rss_mib"] > 0
    base = store.get("toybase")
    assert base.kind == "base" and base.sd == "tiny-sd" and summary["base_digest"] == base.weights_digest
    for condition in ("edges", "mask"):
        adapter = store.get(f"toybase-{condition}")
        assert adapter.condition == condition
        assert adapter.made_for == {"name": "toybase", "digest": base.weights_digest}
    # Without a terminal: plain progress lines (steps, loss, it/s); with --log-to tensorboard, rank 0's
    # metrics as scalars, written by the command (node 0), not the workers.
    assert "train-base 8/8 (100%) · loss " in runs["log"] and " it/s" in runs["log"], runs["log"][-2000:]
    assert _scalars(run, "train/loss") == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert {"train/lr", "train/it_s", "train/samples_s"} <= set(board.Tags()["scalars"])
    # The store holds the result; the run folder keeps the last checkpoint (to extend the run), no second copy.
    assert not (run / "result").exists() and (run / "checkpoint.pt").is_file()
    assert store.run_of(base) == run.resolve()


@pytest.mark.slow
def test_a_worker_killed_is_restarted_from_the_checkpoint_exactly(runs):
    """Rank 1 killed with SIGKILL at step 6 (checkpoint at 4), ``--max-restarts 1``: torchrun
    restarts both workers, which continue from the checkpoint: the metrics and the TensorBoard
    scalars hold steps 1-8 once each, the command exits 0 and stores the result, and the weights
    are the uninterrupted run's bit for bit. Then, over that folder, a new run or a resume with
    changed settings is refused before any work."""
    import torch

    elastic, env, data, store = runs["elastic"], runs["env"], runs["data"], runs["store"]
    assert runs["elastic_exit"] == 0, runs["elastic_err"][-3000:]
    assert _rank0(elastic)["weights"] == _rank0(runs["run"])["weights"] and _rank0(elastic)["start_step"] == 4
    metrics = _metrics(elastic)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert [m["loss"] for m in metrics] == [m["loss"] for m in _metrics(runs["run"])]  # one run, as uninterrupted
    assert _scalars(elastic, "train/loss") == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics]
    summary = json.loads(runs["elastic_out"])
    assert summary["base_digest"] == store.get("elastic").weights_digest
    assert store.get("elastic-edges").made_for["digest"] == store.get("elastic").weights_digest

    again = ["train-base", *data, "--init", "tiny", "--nproc-per-node", "2", "--run-dir", str(elastic), "--json"]
    # Refused before any work: a new run over it, other settings, and (in a worker started by hand) the same.
    fresh = run_cli(*again, "--out", "fresh", *COMMON, env=env)
    assert fresh.returncode == 2 and fresh.stderr.count("\n") == 1, fresh.stderr
    assert f"run folder {elastic} already holds a run" in fresh.stderr
    assert "--resume" in fresh.stderr and "--force" in fresh.stderr and "delete the folder" in fresh.stderr
    changed = run_cli(*again, "--out", "changed", "--resume", *COMMON, "--seed", "6", "--lr", "1e-3", "--batch", "2",
                      env=env)
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1, changed.stderr
    assert ("(--seed 5 -> 6; --lr 0.003 -> 0.001; total batch (--batch x processes) 2 -> 4)" in changed.stderr)
    changed = run_cli("train-base", f"mask={runs['tmp'] / 'mask'}", f"edges={runs['tmp'] / 'edges'}", "--init", "tiny",
                      "--nproc-per-node", "2", "--run-dir", str(elastic), "--out", "changed", "--resume", *COMMON,
                      "--rank", "8", "--resolution", "32", "--precision", "bf16", "--conditions", "mask", env=env)
    assert changed.returncode == 2 and ("(--rank 4 -> 8; --resolution 64 -> 32; --precision 'auto' -> 'bf16'; "
                                        "conditions ['edges', 'mask'] -> ['mask'])") in changed.stderr, changed.stderr
    changed = run_cli("train-base", data[0], "--init", "tiny", "--nproc-per-node", "2", "--run-dir", str(elastic),
                      "--out", "changed", "--resume", *COMMON, env=env)
    assert changed.returncode == 2 and ("data folders {'edges': '%s', 'mask': '%s'} -> {'edges': '%s'}"
                                        % (data[0], data[1][5:], data[0])) in changed.stderr, changed.stderr
    by_hand = subprocess.run([sys.executable, "-m", "engine.training.worker", "--sd", str(store.folder("tiny-sd")),
                              "--data", data[0], "--data", data[1], "--out", str(elastic), "--resume", *COMMON,
                              "--grad-accum", "1"], capture_output=True, text=True, env=_worker_env())
    assert by_hand.returncode == 2 and "--grad-accum 2 -> 1" in by_hand.stderr, by_hand.stderr
    assert _metrics(elastic) == metrics  # nothing touched
    assert torch.load(elastic / "checkpoint.pt", weights_only=True)["step"] == 8


def test_workers_end_with_torchrun(tmp_path):
    """torchrun starts its workers in sessions of their own: when its process group is killed
    with SIGKILL (a lost job), a worker ends itself rather than train on into the run folder."""
    import signal
    import time

    ready = tmp_path / "ready"
    code = (f"from engine.training.worker import _end_with_torchrun; _end_with_torchrun(); "
            f"open({str(ready)!r}, 'w').close(); import time; time.sleep(300)")
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                                "--no-python", sys.executable, "-c", code], env=_worker_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert process.poll() is None and time.time() < deadline, "the worker did not start"
            time.sleep(0.05)
        assert _processes_of(tmp_path)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.time() + 30
        while _processes_of(tmp_path) and time.time() < deadline:
            time.sleep(0.1)
        assert not _processes_of(tmp_path), "the worker outlived torchrun"
    finally:
        for pid in _processes_of(tmp_path):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_resume_on_another_number_of_processes(runs):
    """The 2-process run (batch 1 each) killed at step 6 (checkpoint at 4), resumed by hand
    (``--resume``) on 1 process with batch 2: the same total batch. The metrics past the
    checkpoint are dropped and redone. Exact: the condition schedule, which samples each step
    reads (data positions are global; rank r reads its slice) and the step count. Not exact: the
    noise, timesteps and prompt dropout, drawn per (seed, micro-step, rank), so a sample that rank
    1 drew before is now drawn by rank 0 with rank 0's noise; the weights differ from the
    uninterrupted run's after the resume (and the gradient sums are ordered differently)."""
    import torch

    folder, env = runs["killed"], runs["env"]
    assert [m["step"] for m in _metrics(folder)] == list(range(1, 7)) and not (folder / "ranks").exists()
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["step"] == 4
    resumed = run_cli("train-base", *runs["data"], "--init", "tiny", "--out", "oneproc", "--run-dir", str(folder),
                      "--json", "--resume", *COMMON, "--nproc-per-node", "1", "--batch", "2",
                      env={**env, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    mine, uninterrupted = _rank0(folder), _rank0(runs["run"])
    assert (mine["world_size"], mine["threads"], mine["start_step"]) == (1, 1, 4)  # the user's OMP_NUM_THREADS kept
    assert mine["drawn"] == uninterrupted["drawn"][8:]  # steps 5-8 x grad-accum 2: the same schedule
    end, reference = (torch.load(f / "checkpoint.pt", weights_only=True) for f in (folder, runs["run"]))
    assert end["step"] == reference["step"] == 8 and end["cursors"] == reference["cursors"]
    assert mine["weights"] != uninterrupted["weights"]  # other noise after step 4
    assert [(m["step"], m["world_size"]) for m in _metrics(folder)] == [(s, 2 if s <= 4 else 1) for s in range(1, 9)]
    summary = json.loads(resumed.stdout)
    assert summary["eval_loss_end"] < summary["eval_loss_start"] - 1e-3


def test_raw_shard_samples_are_decoded_in_the_readers(tmp_path):
    """A raw shard's samples, streamed: the images decoded at the training size, the prompt and
    the condition read; a condition the run does not train is passed over."""
    from engine.training.shards import RawDecoder
    from engine.training.stream import read_shard

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
    decode = RawDecoder(("edges",), 32, str(tmp_path / "cache"), "vae")
    decoded = [decode(sample) for _, sample in read_shard(shard)]
    assert [d and d[0] for d in decoded] == ["edges", "edges", None]
    assert [position for position, _ in read_shard(shard, first=1)] == [1, 2]
    payload = decoded[1][1]
    assert payload["prompt"] == "a red circle"
    kind, _, pixels = payload["target"]
    assert kind == "pixels" and pixels.shape == (3, 32, 32) and pixels.min() < 0  # SD's [-1, 1]
    assert payload["condition"][2].min() >= 0  # conditions in [0, 1]
