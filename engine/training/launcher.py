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
import os
import re
import shlex
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from engine.errors import CtrloraError, SettingError
from engine.checks import at_least
from engine.training.settings import TrainBaseSettings

DEFAULT_PORT = 29500
WORKER_MODULE = "engine.training.worker"

# The run folder, as the worker writes it and the command reads it.
RENDEZVOUS_MARKER = "rendezvous.json"  # written by rank 0 once every node has joined
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"  # one JSON line per logged step, from rank 0
RESULT = "result"  # controlnet/, adapters/COND.safetensors, summary.json


@dataclass
class Topology:
    nodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT; None on one node means --standalone
    rdzv_id: str = "ctrlora"
    rdzv_timeout: int | None = None  # seconds to wait for every node to join

    def check(self) -> "Topology":
        at_least("nodes", self.nodes, 1)
        at_least("nproc_per_node", self.nproc_per_node, 1)
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
    if topo.nodes == 1 and not topo.rdzv_endpoint:
        return ["--standalone", *args]
    args += ["--node-rank", str(topo.node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", topo.rdzv_endpoint,
             "--rdzv-id", topo.rdzv_id]
    if topo.rdzv_timeout:
        args += ["--rdzv-conf", f"join_timeout={topo.rdzv_timeout}"]
    return args


def worker_command(topo: Topology, settings: TrainBaseSettings, python: str | None = None) -> list[str]:
    """The full command for one node: ``python -m torch.distributed.run <topology> -m engine.training.worker ...``."""
    return [python or sys.executable, "-m", "torch.distributed.run", *torchrun_args(topo), "-m", WORKER_MODULE,
            *worker_args(settings)]


def all_node_commands(topo: Topology, settings: TrainBaseSettings, python: str = "python") -> list[str]:
    """One shell line per node (``--print-command``), node ranks 0..N-1."""
    lines = []
    for rank in range(topo.nodes):
        node = Topology(topo.nodes, topo.nproc_per_node, rank, topo.rdzv_endpoint, topo.rdzv_id, topo.rdzv_timeout)
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
                    env: dict[str, str] | None = None) -> Topology:
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
    ).check()


def topology_from_slurm(env: dict[str, str] | None = None, port: int = DEFAULT_PORT) -> Topology | None:
    """Nodes, this node's rank, GPUs per node and the meeting point from SLURM's variables, or
    None outside a SLURM allocation."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env or "SLURM_NNODES" not in env:
        return None
    nodes = int(env["SLURM_NNODES"])
    hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
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


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, e.g. ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.match(r"^(.*?)\[([^\]]*)\](.*)$", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{n:0{width}d}{suffix}" for n in range(int(lo), int(hi) + 1))
    return hosts
