"""``ctrlora train-base``: pretrain a Base ControlNet on many GPUs through torchrun."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import typer

from ctrlora_cli.console import ask, err, interactive, out
from engine.errors import CtrloraError, UsageError


def register(app: typer.Typer) -> None:
    app.command("train-base")(train_base)


def train_base(
    data: list[str] = typer.Argument(None, help="Condition folders in the fit layout: COND=DIR, or DIR (named after the folder)."),
    shards: list[str] = typer.Option([], "--shards", help="WebDataset-style tar shards (glob); repeatable."),
    out_name: str = typer.Option(None, "--out", help="Store name of the new base; adapters become OUT-COND."),
    init: str = typer.Option(None, "--init", help="Store name: an SD model (its UNet encoder is copied) or a base to continue."),
    sd: str = typer.Option(None, "--sd", help="The frozen SD model (default: --init's, or the base's pairing)."),
    nodes: int = typer.Option(None, "--nodes", help="Number of nodes (default 1, or SLURM's)."),
    nproc_per_node: int = typer.Option(None, "--nproc-per-node", help="Processes (GPUs) per node (default 1, or SLURM's)."),
    node_rank: int = typer.Option(None, "--node-rank", help="This node's rank (default 0, or SLURM's)."),
    rdzv_endpoint: str = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT every node can reach (usually node 0)."),
    rdzv_id: str = typer.Option(None, "--rdzv-id", help="Identifies this job at the rendezvous (default: ctrlora-OUT)."),
    rdzv_timeout: int = typer.Option(None, "--rdzv-timeout", help="Seconds to wait for all nodes to join."),
    conditions: str = typer.Option(None, "--conditions", help="Comma-separated subset of the conditions to train."),
    steps: int = typer.Option(1000, "--steps", min=1),
    batch: int = typer.Option(1, "--batch", min=1, help="Per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    lr: float = typer.Option(1e-5, "--lr"),
    rank: int = typer.Option(128, "--rank", min=1, help="LoRA rank of every condition."),
    precision: str = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 (default: bf16 on GPU, fp32 on CPU)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing"),
    save_every: int = typer.Option(1000, "--save-every", min=0),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its checkpoint."),
    resolution: int = typer.Option(512, "--resolution", min=8),
    seed: int = typer.Option(0, "--seed"),
    run_dir: Path = typer.Option(None, "--run-dir", help="Checkpoints and logs (default: the store's runs/ folder)."),
    print_command: bool = typer.Option(False, "--print-command", help="Print the torchrun command of every node and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Pretrain a Base ControlNet and one adapter per condition (torchrun, DDP; gloo on CPU, NCCL on GPU)."""
    from ctrlora_cli.store.names import validate_name
    from ctrlora_cli.store.store import Store
    from engine.training.launcher import Topology, all_node_commands, topology_from_slurm, worker_command

    store = Store()
    out_name = out_name or ask("Name of the new base", "missing --out; pass --out NAME")
    validate_name(out_name)
    init = init or ask("SD model or base to start from (store name)", "missing --init; pass --init NAME")
    if not data and not shards:
        raise UsageError("no training data: give condition folders (COND=DIR) and/or --shards GLOB")
    if precision not in (None, "fp32", "bf16", "fp16"):
        raise UsageError(f"--precision must be fp32, bf16 or fp16, not {precision!r}")

    slurm = topology_from_slurm()
    topo = Topology(
        nodes=nodes or (slurm.nodes if slurm else 1),
        nproc_per_node=nproc_per_node or (slurm.nproc_per_node if slurm else 1),
        node_rank=node_rank if node_rank is not None else (slurm.node_rank if slurm else 0),
        rdzv_endpoint=rdzv_endpoint or (slurm.rdzv_endpoint if slurm else None),
        rdzv_id=rdzv_id or (slurm.rdzv_id if slurm else f"ctrlora-{out_name}"),
        rdzv_timeout=rdzv_timeout,
    ).check()

    sd_name, init_base = _resolve_init(store, init, sd)
    run = Path(run_dir) if run_dir else store.root / "runs" / "train-base" / out_name
    worker_args = ["--sd", str(store.folder(sd_name)), "--out", str(run), "--steps", str(steps), "--batch", str(batch),
                   "--grad-accum", str(grad_accum), "--lr", repr(lr), "--rank", str(rank), "--save-every",
                   str(save_every), "--resolution", str(resolution), "--seed", str(seed)]
    if init_base:
        worker_args += ["--init-base", str(init_base)]
    for item in data or []:
        condition, sep, folder = item.partition("=")
        worker_args += ["--data", f"{condition}={Path(folder).resolve()}" if sep else str(Path(item).resolve())]
    for pattern in shards:
        worker_args += ["--shards", str(Path(pattern).expanduser().absolute())]
    for flag, value in (("--conditions", conditions), ("--precision", precision)):
        if value:
            worker_args += [flag, value]
    if grad_checkpointing:
        worker_args.append("--grad-checkpointing")
    if resume:
        worker_args.append("--resume")

    if print_command:
        for line in all_node_commands(topo, worker_args, python=_python()):
            typer.echo(line)
        return

    run.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run / "rendezvous.json").unlink(missing_ok=True)
    started = time.time()
    code = _run_with_progress(worker_command(topo, worker_args), run, steps, show=interactive() and not as_json)
    if code != 0:
        _explain_failure(code, run, topo)
    if topo.node_rank != 0:
        out.print(f"node {topo.node_rank} done; node 0 writes the result into its store")
        return
    summary = _import_result(store, run, out_name, sd_name, steps)
    summary["seconds"] = round(time.time() - started, 1)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        out.print(f"base [bold]{out_name}[/bold] and adapters {', '.join(summary['adapters'])} are in the store "
                  f"(eval loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f})", highlight=False)


def _python() -> str:
    import sys

    return sys.executable


def _resolve_init(store, init: str, sd: str | None) -> tuple[str, Path | None]:
    """(SD entry for the frozen parts, base folder to continue or None to copy the UNet)."""
    manifest = store.get(init)
    if manifest.kind == "sd":
        return sd or init, None
    if manifest.kind == "base":
        from ctrlora_cli.store.resolve import base_folders

        _, controlnet_dir, _ = base_folders(store, init, sd)
        return sd or manifest.sd, controlnet_dir
    raise UsageError(f"--init {init!r} is an adapter; give an SD model or a base")


def _run_with_progress(command: list[str], run: Path, steps: int, show: bool) -> int:
    """Run torchrun, following rank 0's metrics.jsonl to draw total and per-rank throughput."""
    process = subprocess.Popen(command)
    if not show:
        return process.wait()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    metrics = run / "metrics.jsonl"
    seen = 0
    with Progress(TextColumn("[bold]train-base"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[detail]}"), console=err) as bars:
        task = bars.add_task("train", total=steps, detail="starting")
        while process.poll() is None:
            time.sleep(0.5)
            if not metrics.is_file():
                continue
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line being written
                per_rank = " ".join(f"{r:.1f}" for r in record["per_rank_samples_per_s"])
                bars.update(task, completed=record["step"],
                            detail=f"loss {record['loss']:.4f}  {record['samples_per_s']:.1f} samples/s  "
                                   f"(ranks: {per_rank})  {', '.join(record['conditions'])}")
                seen += 1
    return process.returncode


def _explain_failure(code: int, run: Path, topo) -> None:
    if topo.nodes > 1 and not (run / "rendezvous.json").is_file():
        host, _, port = (topo.rdzv_endpoint or "").rpartition(":")
        raise CtrloraError(
            f"rendezvous failed: node {topo.node_rank} could not meet the others at {host} port {port} "
            f"(id {topo.rdzv_id!r}); check that {host} resolves and port {port} is open from every node, that all "
            f"{topo.nodes} nodes were started with the same --rdzv-id, and rerun with NCCL_DEBUG=INFO for details")
    raise CtrloraError(f"training failed (torchrun exit {code}); the workers' messages are above; the run folder "
                       f"is {run} (continue with --resume)")


def _import_result(store, run: Path, out_name: str, sd_name: str, steps: int) -> dict:
    result = run / "result"
    summary = json.loads((result / "summary.json").read_text())
    source = {"type": "train-base", "run": str(run)}
    files = {f"controlnet/{p.name}": p for p in sorted((result / "controlnet").iterdir()) if p.is_file()}
    store.add(out_name, "base", files, arch=summary["arch"], sd=sd_name, source=source,
              extra={"steps": steps, "conditions": summary["conditions"],
                     "zero_convs_and_norms_from": summary["base_zero_convs_from"]})
    from engine.formats.adapter_file import read_adapter_metadata

    names = []
    for condition in summary["conditions"]:
        name = f"{out_name}-{condition}"
        path = result / "adapters" / f"{condition}.safetensors"
        meta = read_adapter_metadata(path)
        store.add(name, "adapter", {"adapter.safetensors": path}, arch=summary["arch"], condition=condition,
                  rank=meta["rank"], source=source, extra={"base": out_name, "steps": steps})
        names.append(name)
    return {"base": out_name, "adapters": names, "run": str(run), **summary}
