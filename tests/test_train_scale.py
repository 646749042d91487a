"""train-base at scale: latent shards (encode-shards), streamed on 2 processes, SIGTERM -> checkpoint -> resume."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import REPO, run_cli
from engine.errors import SettingError, UsageError
from engine.training.launcher import Topology, torchrun_args
from test_train_base import make_pairs


def raw_shards(tmp_path):
    """4 raw shards of 2 samples (edges and mask alternating): 8 samples."""
    edges, masks = make_pairs(tmp_path / "edges", count=4), make_pairs(tmp_path / "mask", count=4, kind="mask", seed=1)
    folder = tmp_path / "raw"
    folder.mkdir()
    for s in range(4):
        with tarfile.open(folder / f"shard-{s}.tar", "w") as tar:
            for k, (condition, pairs) in enumerate((("edges", edges), ("mask", masks))):
                key = f"{s}{k:05d}"
                tar.add(pairs / "target" / f"{s}.png", arcname=f"{key}.png")
                tar.add(pairs / "source" / f"{s}.png", arcname=f"{key}.cond.png")
                meta = tmp_path / "meta.json"
                meta.write_text(json.dumps({"condition": condition, "prompt": "a red circle"}))
                tar.add(meta, arcname=f"{key}.json")
    return folder


def _torchrun(nproc, worker_args, **popen):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                             "--nproc-per-node", str(nproc), "-m", "engine.training.worker", *worker_args],
                            env=env, **popen)


def _last_step(run) -> int:
    path = run / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")] if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow
def test_latent_shards_on_two_processes_stop_on_sigterm_and_resume_on_one(tiny_store, tmp_path):
    """encode-shards, then train-base from the latent shards (no VAE) on 2 processes x 1 reader,
    in bf16 (the frozen UNet held in bf16, fp32 master weights for what trains); SIGTERM to the
    whole job at step 2 (its periodic checkpoints are every 100 steps): the ranks write a
    checkpoint at step 2 and stop. Resumed on 1 process x 2 readers (the same total batch) to step
    6: 12 samples in all, each of the 8 of epoch 0 once, then 4 of epoch 1, none twice."""
    import torch
    from safetensors.torch import load

    from engine.runtime import resolve_device
    from engine.training.latent_shards import encode_shards
    from engine.training.stream import read_shard

    sd = tiny_store.folder("tiny-sd")
    inputs = sorted(raw_shards(tmp_path).glob("*.tar"))
    latent = tmp_path / "latent"
    summary = encode_shards(inputs, latent, sd, 64, resolve_device("cpu"), batch=3, part=0, parts=2)
    assert summary["encoded"] == 2 and "conditions" not in summary  # the manifest waits for every shard
    summary = encode_shards(inputs, latent, sd, 64, resolve_device("cpu"), batch=3)
    assert (summary["encoded"], summary["skipped"], summary["conditions"]) == (2, 2, {"edges": 4, "mask": 4})
    with pytest.raises(UsageError, match="shard-0.tar was encoded at 64 px with another VAE or size"):
        encode_shards(inputs, latent, sd, 32, resolve_device("cpu"))  # never replaced by another recipe
    _, sample = next(read_shard(latent / "shard-0.tar"))
    tensors = load(sample["latents.safetensors"])
    assert tensors["target"].dtype == torch.float16 and tensors["target"].shape == (8, 8, 8)
    assert tensors["ids"].shape == (77,) and json.loads(sample["json"])["condition"] == "edges"

    run = tmp_path / "run"
    common = ["--sd", str(sd), "--init-base", str(tiny_store.folder("tiny") / "controlnet"), "--shards",
              str(latent / "*.tar"), "--out", str(run), "--steps", "6", "--rank", "4", "--resolution", "64",
              "--save-every", "100", "--seed", "3", "--precision", "bf16"]
    process = _torchrun(2, [*common, "--workers", "1", "--pause-after", "2"], start_new_session=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _last_step(run) < 2:
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # as SLURM: every process of the job
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode != 0 and "SIGTERM: checkpoint at step 2" in stderr, stderr[-3000:]
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and {t.dtype for t in checkpoint["model"].values()} == {torch.float32}
    first = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert not any(r["vae_loaded"] for r in first) and first[0]["weights"] == first[1]["weights"]
    assert [(r["precision"], r["unet_dtype"]) for r in first] == [("bf16", "bfloat16")] * 2

    resumed = _torchrun(1, [*common, "--workers", "2", "--batch", "2", "--resume"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert (run / "result" / "adapters" / "mask.safetensors").is_file()
    used = [tuple(u) for r in first for u in r["used"]]
    used += [tuple(u) for u in json.loads((run / "ranks" / "rank0.json").read_text())["used"]]
    assert len(used) == 12 and len(set(used)) == 12  # 6 steps x total batch 2; no sample twice in an epoch
    assert sorted((s, p) for e, s, p in used if e == 0) == [(s, p) for s in range(4) for p in range(2)]
    assert sum(e == 1 for e, _, _ in used) == 4


def test_refusals_before_any_work(tiny_store, tmp_path):
    from engine.training.settings import TrainBaseSettings

    for name, value in (("workers", -1), ("timeout", 0)):
        with pytest.raises(SettingError, match="must be at least"):
            TrainBaseSettings(sd="/sd", out="/run", **{name: value}).checked()
    with pytest.raises(SettingError, match="must be at least 0"):
        Topology(max_restarts=-1).check()
    raw = raw_shards(tmp_path)
    for args, message in ((("--part", "3/2"), "error: --part: expects I/N with 1 <= I <= N, e.g. 2/8, not '3/2'"),
                          ((), "error: missing --sd; pass --sd NAME (the SD model train-base will use)")):
        result = run_cli("encode-shards", str(raw), str(tmp_path / "out"), *args, *(("--sd", "tiny") if args else ()))
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [message], result.stderr
    assert not (tmp_path / "out").exists()
    # Raw shards are streamed, never indexed: their conditions are named up front.
    result = run_cli("train-base", "--shards", str(raw / "*.tar"), "--out", "x", "--init", "tiny", "--print-command")
    assert result.returncode == 2 and "--conditions: shards are streamed, not indexed" in result.stderr


def test_max_restarts_reach_torchrun():
    for topo in (Topology(max_restarts=3), Topology(nodes=2, rdzv_endpoint="n0:29500", max_restarts=3)):
        args = torchrun_args(topo)
        assert args[args.index("--max-restarts") + 1] == "3"
    assert "--max-restarts" not in torchrun_args(Topology())
