"""Building torchrun (torch.distributed.run) command lines for ``train-base``, and what the
launching side knows of a run's folder.

We never launch processes ourselves: torchrun starts one worker per GPU on each node and handles
rendezvous; the worker is ``python -m engine.training.worker``. This module only decides the
arguments, from the user's options or from SLURM's environment. The worker's own arguments are
written from the fields of ``TrainBaseSettings`` and read back by the same fields, so its options
exist once.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from engine.checks import at_least
from engine.errors import CtrloraError, SettingError, UsageError
from engine.training.settings import TrainBaseSettings
from engine.training.metrics import TENSORBOARD

DEFAULT_PORT = 29500
WORKER_MODULE = "engine.training.worker"

# The run folder, as the worker writes it and the command reads it.
RENDEZVOUS_MARKER = "rendezvous.json"  # written by rank 0 once every node has joined
RUN_JSON = "run.json"  # written by rank 0 when a new run has read its data: what a resume must keep
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"  # one JSON line per logged step, from rank 0
RESULT = "result"  # controlnet/, adapters/COND.safetensors, summary.json; removed once stored
RANKS = "ranks"  # rank<R>.json: each rank's schedule, weights digest and threads (evidence for tests)
# What a run writes into its folder (``--force`` clears these; the latent cache, keyed by content, stays).
RUN_FILES = (RUN_JSON, CHECKPOINT, METRICS, RESULT, f".{RESULT}.tmp", RANKS, RENDEZVOUS_MARKER, TENSORBOARD)


@dataclass
class Topology:
    nodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT; None on one node means --standalone
    rdzv_id: str = "ctrlora"
    rdzv_timeout: int | None = None  # seconds to wait for every node to join
    max_restarts: int = 0  # torchrun restarts every worker this many times after a failure (from the checkpoint)

    def check(self) -> "Topology":
        at_least("nodes", self.nodes, 1)
        at_least("nproc_per_node", self.nproc_per_node, 1)
        at_least("max_restarts", self.max_restarts, 0)
        if not 0 <= self.node_rank < self.nodes:
            raise SettingError("node_rank", f"{self.node_rank} is outside 0..{self.nodes - 1}")
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise SettingError("rdzv_endpoint", "several nodes need a meeting point: HOST:PORT, a host every node "
                                                "can reach (usually node 0)")
        if self.rdzv_endpoint:
            split_endpoint(self.rdzv_endpoint)
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingError("rdzv_endpoint", f"{endpoint!r} must be HOST:PORT, e.g. node0:{DEFAULT_PORT}")
    return host, int(port)


def torchrun_args(topo: Topology) -> list[str]:
    """torchrun's own options for one node."""
    args = ["--nnodes", str(topo.nodes), "--nproc-per-node", str(topo.nproc_per_node)]
    if topo.max_restarts:
        args += ["--max-restarts", str(topo.max_restarts)]
    if topo.nodes == 1 and not topo.rdzv_endpoint:
        return ["--standalone", *args]
    args += ["--node-rank", str(topo.node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", topo.rdzv_endpoint,
             "--rdzv-id", topo.rdzv_id]
    if topo.rdzv_timeout:
        args += ["--rdzv-conf", f"join_timeout={topo.rdzv_timeout}"]
    return args


def threads_per_process(nproc_per_node: int) -> int:
    """CPU threads for each of a node's workers: its share of the cores this process may use, so
    that several workers on one machine do not oversubscribe OpenMP."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc_per_node)


def worker_env(nproc_per_node: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of torchrun and its workers: ``OMP_NUM_THREADS`` is each worker's share of
    the cores (``threads_per_process``) unless the user set it. torchrun alone would give every
    worker 1 thread when there are several, and all the cores to a single one."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(threads_per_process(nproc_per_node))
    return env


def worker_command(topo: Topology, settings: TrainBaseSettings, python: str | None = None) -> list[str]:
    """The full command for one node: ``python -m torch.distributed.run <topology> -m engine.training.worker ...``."""
    return [python or sys.executable, "-m", "torch.distributed.run", *torchrun_args(topo), "-m", WORKER_MODULE,
            *worker_args(settings)]


def all_node_commands(topo: Topology, settings: TrainBaseSettings, python: str = "python") -> list[str]:
    """One shell line per node (``--print-command``), node ranks 0..N-1."""
    lines = []
    for rank in range(topo.nodes):
        node = replace(topo, node_rank=rank)
        lines.append(shlex.join(worker_command(node, settings, python=python)))
    return lines


def explain_failure(code: int, run: Path, topo: Topology) -> CtrloraError:
    """The error to report when torchrun ended with ``code``: a rendezvous that never happened is
    told apart from a failed training (the workers' own messages are above it)."""
    if topo.nodes > 1 and not (run / RENDEZVOUS_MARKER).is_file():
        host, _, port = (topo.rdzv_endpoint or "").rpartition(":")
        return CtrloraError(
            f"rendezvous failed: node {topo.node_rank} could not meet the others at {host} port {port} "
            f"(id {topo.rdzv_id!r}); check that {host} resolves and port {port} is open from every node, that all "
            f"{topo.nodes} nodes were started with the same --rdzv-id, and rerun with NCCL_DEBUG=INFO for details")
    return CtrloraError(f"training failed (torchrun exit {code}); the workers' messages are above; the run folder "
                        f"is {run} (continue with --resume)")


def explain_stop(run: Path) -> CtrloraError:
    """The run stopped on SIGTERM (pre-emption): where it stands and how to go on (exit 143)."""
    import torch

    checkpoint = Path(run) / CHECKPOINT
    where = (f"its checkpoint is at step {torch.load(checkpoint, weights_only=True, mmap=True)['step']}"
             if checkpoint.is_file() else "it stopped before its first checkpoint")
    error = CtrloraError(f"stopped by SIGTERM (pre-emption): {where}; run the same command with --resume to "
                         f"continue (run folder {run})")
    error.exit_code = 143
    return error


# -- the data and the run folder, checked before any work -------------------------------------

def shard_files(patterns) -> list[Path]:
    """The files the ``--shards`` globs match, sorted; a glob that matches none is refused."""
    files: set[Path] = set()
    for pattern in patterns:
        found = {Path(p) for p in glob.glob(pattern) if Path(p).is_file()}
        if not found:
            raise UsageError(f"--shards {pattern!r} matches no file")
        files |= found
    return sorted(files)


def check_data(settings: TrainBaseSettings) -> tuple[list[str], bool]:
    """Refuse data that cannot be read (a folder missing or not a folder, a shard glob that
    matches nothing, ``--conditions`` naming a condition no folder has while there are no
    shards, raw shards without ``--conditions``: they are streamed, never indexed). Returns the
    run's conditions, and True (they are all known before any shard is read: from
    ``--conditions``, the folders or the latent shards' manifest)."""
    if not settings.data and not settings.shards:
        raise UsageError("no training data: give condition folders (COND=DIR) and/or --shards GLOB")
    folders = settings.folders()
    for folder in folders.values():
        if not folder.exists():
            raise UsageError(f"data folder {folder} does not exist")
        if not folder.is_dir():
            raise UsageError(f"data folder {folder} is not a folder")
    shard_files(settings.shards)
    wanted = settings.wanted_conditions()
    if settings.shards and not wanted:
        from engine.training.latent_shards import shards_manifest

        latent = shards_manifest(shard_files(settings.shards))
        if latent:  # encode-shards counted their conditions
            return sorted(set(latent["conditions"]) | set(folders)), True
        raise SettingError("conditions", "shards are streamed, not indexed: name the conditions to train from them "
                                         "(comma-separated, e.g. --conditions canny,depth)")
    if wanted and not settings.shards:
        unknown = sorted(set(wanted) - set(folders))
        if unknown:
            raise SettingError("conditions", f"names {unknown} with no data (have: {sorted(folders)})")
    return (wanted or sorted(folders)), bool(wanted) or not settings.shards


def run_identity(settings: TrainBaseSettings, world_size: int) -> dict:
    """What a resumed run must keep, as JSON: the settings that shape the result (by flag), the
    conditions trained and their order (``--conditions``, else the folders'; the shards' are in
    their files), the total batch (a run may resume on another number of processes with the same
    total), and the data by its folders and its shard files with their sizes, not by content (the
    worker adds the pair count of each condition once it has read them)."""
    identity = {_flag(name): getattr(settings, name) for name in TrainBaseSettings.RESUME_FIXED}
    identity["conditions"] = check_data(settings)[0]
    identity["total batch (--batch x processes)"] = settings.batch * world_size
    identity["data folders"] = {c: str(Path(f).absolute()) for c, f in sorted(settings.folders().items())}
    identity["shard files (path, bytes)"] = [[str(p.absolute()), p.stat().st_size]
                                             for p in shard_files(settings.shards)]
    return json.loads(json.dumps(identity))


def resume_changes(saved: dict, now: dict) -> list[str]:
    """``KEY OLD -> NEW`` for each part of a run's identity that differs (keys in both)."""
    return [f"{key} {saved[key]!r} -> {value!r}" for key, value in now.items() if key in saved and saved[key] != value]


def refuse_changes(run: Path, changes: list[str]) -> None:
    """The one refusal of a resume with other settings or data (the command's and the worker's)."""
    if changes:
        raise UsageError(f"cannot resume {run} with other settings or data ({'; '.join(changes)}); use the "
                         f"original ones, or start over with --force or another --run-dir")


def saved_run(run: Path) -> dict | None:
    """The run folder's ``run.json`` (None when the run never got that far)."""
    path = Path(run) / RUN_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def holds_run(run: Path) -> bool:
    """A run started in this folder (its settings, a checkpoint or metrics are there)."""
    return any((Path(run) / name).exists() for name in (RUN_JSON, CHECKPOINT, METRICS))


def check_run_folder(run: Path, settings: TrainBaseSettings, world_size: int, force: bool = False,
                     remove_hint: str = "delete the folder") -> None:
    """What a run may do with its folder, checked before any work, by the command and again by
    every worker: a new run never replaces an old one's checkpoint and metrics unless ``force``
    (the command then clears them); ``resume`` needs a checkpoint, and the settings and data the
    run started with (``run.json``). ``remove_hint``: how else the user can clear the folder."""
    run = Path(run)
    if not settings.resume:
        if holds_run(run) and not force:
            raise UsageError(f"run folder {run} already holds a run; continue it with --resume, or start over "
                             f"with --force (which clears it) or {remove_hint}")
        return
    if not (run / CHECKPOINT).is_file():
        why = ("the run stopped before its first checkpoint; start it again with --force" if holds_run(run)
               else "start without --resume")
        raise UsageError(f"nothing to resume in {run}: no {CHECKPOINT} there ({why})")
    saved = saved_run(run)
    if saved is not None:
        refuse_changes(run, resume_changes(saved["identity"], run_identity(settings, world_size)))


def clear_run(run: Path) -> None:
    """``--force``: remove what an earlier run wrote into the folder (``RUN_FILES``), nothing else."""
    for name in RUN_FILES:
        path = Path(run) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# -- the worker's arguments: TrainBaseSettings' fields ------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def worker_args(settings: TrainBaseSettings) -> list[str]:
    """The worker's arguments for ``settings``: each field that differs from its default, as
    ``--field-name VALUE`` (a list: the flag once per item; a flag: alone)."""
    args: list[str] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            args.append(_flag(f.name))
        elif isinstance(value, tuple):
            args += [x for item in value for x in (_flag(f.name), str(item))]
        else:
            args += [_flag(f.name), str(value)]
    return args


def read_worker_args(argv: list[str] | None = None, description: str | None = None) -> TrainBaseSettings:
    """``TrainBaseSettings`` from the worker's arguments, checked; the parser is made from the
    fields (each value's type is its default's; None defaults are paths or names, so text)."""
    parser = argparse.ArgumentParser(prog=WORKER_MODULE, description=description)
    for f in fields(TrainBaseSettings):
        help_text = f.metadata["help"] or argparse.SUPPRESS
        if isinstance(f.default, bool):
            parser.add_argument(_flag(f.name), action="store_true", help=help_text)
        elif isinstance(f.default, tuple):
            parser.add_argument(_flag(f.name), action="append", default=[], help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=str if f.default is None else type(f.default), default=f.default,
                                required=f.metadata.get("required", False), help=help_text)
    values = vars(parser.parse_args(argv))
    try:
        return TrainBaseSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}).checked()
    except SettingError as exc:
        parser.error(f"{_flag(exc.setting)}: {exc}")  # exits 2, as argparse's own refusals


# -- SLURM ---------------------------------------------------------------------------------------

def choose_topology(nodes: int | None, nproc_per_node: int | None, node_rank: int | None, rdzv_endpoint: str | None,
                    rdzv_id: str | None, rdzv_timeout: int | None, default_id: str,
                    env: dict[str, str] | None = None, max_restarts: int = 0) -> Topology:
    """Each part as the user gave it (None: not given), else SLURM's, else one process on one
    node (rendezvous id ``default_id``); checked."""
    slurm = topology_from_slurm(env)
    return Topology(
        nodes=nodes or (slurm.nodes if slurm else 1),
        nproc_per_node=nproc_per_node or (slurm.nproc_per_node if slurm else 1),
        node_rank=node_rank if node_rank is not None else (slurm.node_rank if slurm else 0),
        rdzv_endpoint=rdzv_endpoint or (slurm.rdzv_endpoint if slurm else None),
        rdzv_id=rdzv_id or (slurm.rdzv_id if slurm else default_id),
        rdzv_timeout=rdzv_timeout,
        max_restarts=max_restarts,
    ).check()


def topology_from_slurm(env: dict[str, str] | None = None, port: int = DEFAULT_PORT) -> Topology | None:
    """Nodes, this node's rank, GPUs per node and the meeting point from SLURM's variables, or
    None outside a SLURM allocation."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env or "SLURM_NNODES" not in env:
        return None
    nodes = int(env["SLURM_NNODES"])
    hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "", env)
    gpus = _gpus_per_node(env)
    endpoint = f"{hosts[0]}:{port}" if hosts and nodes > 1 else None
    return Topology(nodes=nodes, nproc_per_node=gpus, node_rank=int(env.get("SLURM_NODEID", "0")),
                    rdzv_endpoint=endpoint, rdzv_id=f"slurm-{env['SLURM_JOB_ID']}")


def _gpus_per_node(env) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        match = re.search(r"(\d+)$", value.split("(")[0])  # "4", "a100:4", "4(x2)"
        if match:
            return int(match.group(1))
    return 1


def expand_nodelist(nodelist: str, env: dict[str, str] | None = None) -> list[str]:
    """SLURM's compressed host list as hosts, in order: ``scontrol show hostnames`` where SLURM's
    own tool is on the PATH (it knows every form), else ``parse_nodelist``."""
    env = os.environ if env is None else env
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol and nodelist:
        try:
            done = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                  timeout=30)
            hosts = done.stdout.split()
            if done.returncode == 0 and hosts:
                return hosts
        except (OSError, subprocess.SubprocessError):
            pass  # a broken scontrol: the parser below knows the forms SLURM writes
    return parse_nodelist(nodelist)


def parse_nodelist(nodelist: str) -> list[str]:
    """``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1; ``rack[1-2]-node[1-2]`` ->
    rack1-node1 rack1-node2 rack2-node1 rack2-node2. Commas split hosts only outside brackets; a
    range keeps its zero padding (``[001-003]``)."""
    hosts: list[str] = []
    for group in _split_outside_brackets(nodelist):
        hosts += _expand_host(group)
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_host(pattern: str) -> list[str]:
    """Every name of one host pattern: each bracket group in turn, the first varying slowest."""
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.find("]", open_at)
    if close_at < 0:
        return [pattern]  # not a pattern SLURM writes: taken as a name
    prefix, values, rest = pattern[:open_at], pattern[open_at + 1:close_at], pattern[close_at + 1:]
    tails = _expand_host(rest)
    return [f"{prefix}{value}{tail}" for value in _range_values(values) for tail in tails]


def _range_values(spec: str) -> list[str]:
    """``1,3-5`` -> 1 3 4 5; ``001-003`` -> 001 002 003 (the low end's width)."""
    values = []
    for item in spec.split(","):
        lo, _, hi = item.partition("-")
        if not hi:
            values.append(lo)
        else:
            values += [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)]
    return values
