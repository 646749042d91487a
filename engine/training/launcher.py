"""Building torchrun (torch.distributed.run) command lines for ``train-base``.

We never launch processes ourselves: torchrun starts one worker per GPU on each node and handles
rendezvous; the worker is ``python -m engine.training.worker``. This module only decides the
arguments, from the user's options or from SLURM's environment.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass

from engine.errors import UsageError

DEFAULT_PORT = 29500
WORKER_MODULE = "engine.training.worker"


@dataclass
class Topology:
    nodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT; None on one node means --standalone
    rdzv_id: str = "ctrlora"
    rdzv_timeout: int | None = None  # seconds to wait for every node to join

    def check(self) -> "Topology":
        if self.nodes < 1 or self.nproc_per_node < 1:
            raise UsageError("--nodes and --nproc-per-node must be at least 1")
        if not 0 <= self.node_rank < self.nodes:
            raise UsageError(f"--node-rank {self.node_rank} is outside 0..{self.nodes - 1}")
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise UsageError("several nodes need a meeting point: pass --rdzv-endpoint HOST:PORT "
                             "(a host every node can reach, usually node 0)")
        if self.rdzv_endpoint:
            split_endpoint(self.rdzv_endpoint)
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--rdzv-endpoint {endpoint!r} must be HOST:PORT, e.g. node0:{DEFAULT_PORT}")
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


def worker_command(topo: Topology, worker_args: list[str], python: str | None = None) -> list[str]:
    """The full command for one node: ``python -m torch.distributed.run <topology> -m engine.training.worker ...``."""
    return [python or sys.executable, "-m", "torch.distributed.run", *torchrun_args(topo), "-m", WORKER_MODULE,
            *worker_args]


def all_node_commands(topo: Topology, worker_args: list[str], python: str = "python") -> list[str]:
    """One shell line per node (``--print-command``), node ranks 0..N-1."""
    lines = []
    for rank in range(topo.nodes):
        node = Topology(topo.nodes, topo.nproc_per_node, rank, topo.rdzv_endpoint, topo.rdzv_id, topo.rdzv_timeout)
        lines.append(shlex.join(worker_command(node, worker_args, python=python)))
    return lines


# -- SLURM ---------------------------------------------------------------------------------------

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
