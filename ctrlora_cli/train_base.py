"""``ctrlora train-base``: pretrain a Base ControlNet on many GPUs through torchrun."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import typer

from ctrlora_cli import envconfig
from ctrlora_cli.completion import init_names
from ctrlora_cli.console import ask, interactive, out
from ctrlora_cli.options import JsonOpt, LogToOpt, Precision, PrecisionOpt, SdOpt, SeedOpt, StepsOpt, examples, print_json
from ctrlora_cli.options import retold
from engine.errors import UsageError
from engine.training.settings import TrainBaseSettings

TRAIN = TrainBaseSettings()  # the defaults, the worker's too
TrainSdOpt = retold(SdOpt, "The frozen SD model (default: --init's, or the base's pairing).")
TrainStepsOpt = retold(StepsOpt, TrainBaseSettings.help_of("steps"))
TrainSeedOpt = retold(SeedOpt, TrainBaseSettings.help_of("seed"))
_help = TrainBaseSettings.help_of


def register(app: typer.Typer) -> None:
    app.command("train-base", epilog=examples(
        "ctrlora train-base canny=data/canny depth=data/depth --init sd15 --out mybase",
        "ctrlora train-base --shards 'shards/*.tar' --init sd15 --out b --batch 8",
        "ctrlora train-base canny=data/canny --init sd15 --out b --print-command --json"))(train_base)


def train_base(
    data: list[str] = typer.Argument(None, help="Condition folders in the fit layout: COND=DIR, or DIR (named after the folder)."),
    shards: list[str] = typer.Option([], "--shards", help="WebDataset-style tar shards (glob); repeatable."),
    out_name: str = typer.Option(None, "--out", help="Store name of the new base; adapters become OUT-COND."),
    init: str = typer.Option(None, "--init", help="Store name: an SD model (its UNet encoder is copied) or a base to "
                             "continue.", autocompletion=init_names),
    sd: TrainSdOpt = None,
    nodes: int = typer.Option(None, "--nodes", help="Number of nodes (default 1, or SLURM's)."),
    nproc_per_node: int = typer.Option(None, "--nproc-per-node", help="Processes (GPUs) per node (default 1, or SLURM's)."),
    node_rank: int = typer.Option(None, "--node-rank", help="This node's rank (default 0, or SLURM's)."),
    rdzv_endpoint: str = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT every node can reach (usually node 0)."),
    rdzv_id: str = typer.Option(None, "--rdzv-id", help="Identifies this job at the rendezvous (default: ctrlora-OUT)."),
    rdzv_timeout: int = typer.Option(None, "--rdzv-timeout", help="Seconds to wait for all nodes to join."),
    max_restarts: int = typer.Option(0, "--max-restarts", help="torchrun restarts the workers this many times "
                                     "after a failure, each time from the last checkpoint."),
    conditions: str = typer.Option(TRAIN.conditions, "--conditions", help=_help("conditions")),
    steps: TrainStepsOpt = TRAIN.steps,
    batch: int = typer.Option(TRAIN.batch, "--batch", help=_help("batch")),
    grad_accum: int = typer.Option(TRAIN.grad_accum, "--grad-accum", help=_help("grad_accum")),
    lr: float = typer.Option(TRAIN.lr, "--lr", help=_help("lr")),
    rank: int = typer.Option(TRAIN.rank, "--rank", help=_help("rank")),
    precision: PrecisionOpt = Precision(TRAIN.precision),
    grad_checkpointing: bool = typer.Option(TRAIN.grad_checkpointing, "--grad-checkpointing",
                                            help=_help("grad_checkpointing")),
    save_every: int = typer.Option(TRAIN.save_every, "--save-every", help=_help("save_every")),
    workers: int = typer.Option(TRAIN.workers, "--workers", help=_help("workers")),
    timeout: int = typer.Option(TRAIN.timeout, "--timeout", help=_help("timeout")),
    resume: bool = typer.Option(TRAIN.resume, "--resume", help="Continue the run in --run-dir from its checkpoint "
                                "(with the settings and data it began with; --steps may grow)."),
    force: bool = typer.Option(False, "--force", help="Replace store entries OUT and OUT-COND, and start over in a "
                               "run folder that holds a run."),
    resolution: int = typer.Option(TRAIN.resolution, "--resolution", help=_help("resolution")),
    seed: TrainSeedOpt = TRAIN.seed,
    run_dir: Path = typer.Option(None, "--run-dir", help="Checkpoints and logs (default: the store's runs/ folder)."),
    print_command: bool = typer.Option(False, "--print-command", help="Print the torchrun command of every node and exit."),
    as_json: JsonOpt = False,
    log_to: LogToOpt = None,
    pause_after: int = typer.Option(0, "--pause-after", hidden=True),  # tests: the workers wait to be killed there
) -> None:
    """Pretrain a Base ControlNet and one adapter per condition (torchrun, DDP; gloo on CPU, NCCL on GPU)."""
    from dataclasses import replace

    from ctrlora_cli.store.names import validate_name
    from ctrlora_cli.store.store import Store
    from ctrlora_cli.store.results import add_trained_base, resolve_init, run_removal_hint
    from ctrlora_cli.tensorboard_log import check_available
    from engine.training import launcher

    # Bad input before any question or work: ranges, then the data (the workers may run
    # elsewhere, other nodes or another folder: every path absolute).
    settings = TrainBaseSettings(conditions=conditions, steps=steps, batch=batch, grad_accum=grad_accum, lr=lr,
                                 rank=rank, precision=precision.value, grad_checkpointing=grad_checkpointing,
                                 cpu_bf16={None: "auto", True: "1", False: "0"}[envconfig.cpu_bf16()],
                                 save_every=save_every, resume=resume, workers=workers, timeout=timeout,
                                 resolution=resolution, seed=seed, pause_after=pause_after,
                                 data=tuple(_absolute_data(item) for item in data or []),
                                 shards=tuple(str(Path(pattern).expanduser().absolute()) for pattern in shards)
                                 ).checked()
    known_conditions, _ = launcher.check_data(settings)
    check_available(log_to)
    store = Store()
    out_name = out_name or ask("Name of the new base", "missing --out; pass --out NAME", batch=as_json)
    validate_name(out_name)
    init = init or ask("SD model or base to start from (store name)", "missing --init; pass --init NAME",
                       batch=as_json)
    topo = launcher.choose_topology(nodes, nproc_per_node, node_rank, rdzv_endpoint, rdzv_id, rdzv_timeout,
                                    default_id=f"ctrlora-{out_name}", max_restarts=max_restarts)
    sd_name, init_base = resolve_init(store, init, sd)
    # The store's one rule for names, before any work. The conditions of shards are known only
    # once they are read: without --conditions their adapters' names are claimed by
    # add_trained_base, before anything is stored.
    for name in (out_name, *(f"{out_name}-{c}" for c in known_conditions)):
        store.claim(name, force, "--out")
    run = Path(run_dir).absolute() if run_dir else store.run_folder(out_name, "train-base")
    settings = replace(settings, sd=str(store.folder(sd_name)), out=str(run),
                       init_base=str(init_base) if init_base else None)
    if topo.node_rank == 0 or print_command:  # node 0 owns the run folder (the others' see its files appear)
        if print_command and force and not resume and launcher.holds_run(run):
            raise UsageError(f"--print-command does not clear run folders: delete {run} first, or choose another "
                             f"--run-dir")
        launcher.check_run_folder(run, settings, topo.world_size, force,
                                  remove_hint=run_removal_hint(store, run) if launcher.holds_run(run) else "")
    if print_command:
        commands = launcher.all_node_commands(topo, settings, python=sys.executable)
        if as_json:
            print_json({"run_dir": str(run), "nodes": topo.nodes, "commands": commands})
        else:
            for line in commands:
                typer.echo(line)
        return

    if topo.node_rank == 0 and force and not resume:
        launcher.clear_run(run)
    run.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run / launcher.RENDEZVOUS_MARKER).unlink(missing_ok=True)
    started = time.time()
    code, stopped = _run_with_progress(launcher.worker_command(topo, settings), run, settings,
                                       show=interactive() and not as_json, env=launcher.worker_env(topo.nproc_per_node),
                                       log_to=log_to and topo.node_rank == 0)
    if stopped and code != 0:  # a run that finished as the signal came is stored as usual
        raise launcher.explain_stop(run)
    if code != 0:
        raise launcher.explain_failure(code, run, topo)
    if topo.node_rank != 0:
        done = {"node_rank": topo.node_rank, "done": True, "note": "node 0 writes the result into its store"}
        print_json(done) if as_json else out.print(f"node {topo.node_rank} done; {done['note']}")
        return
    summary = add_trained_base(store, run / launcher.RESULT, run, out_name, sd_name, steps, force=force)
    summary["seconds"] = round(time.time() - started, 1)
    if as_json:
        print_json(summary)
    else:
        out.print(f"base [bold]{out_name}[/bold] and adapters {', '.join(summary['adapters'])} are in the store "
                  f"(eval loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f})", highlight=False)


def _absolute_data(item: str) -> str:
    """COND=DIR or DIR, with DIR absolute."""
    condition, sep, folder = item.partition("=")
    return f"{condition}={Path(folder).resolve()}" if sep else str(Path(item).resolve())


def _run_with_progress(command: list[str], run: Path, settings: TrainBaseSettings, show: bool, env: dict[str, str],
                       log_to: bool) -> tuple[int, bool]:
    """Run torchrun; rank 0's metrics lines become progress events (with it/s; bars at a terminal,
    plain lines in logs) and, with ``log_to``, TensorBoard scalars written here (see
    ``ctrlora_cli.tensorboard_log``). A SIGTERM (SLURM's pre-emption) reaches torchrun and its
    workers, which checkpoint and stop: this process waits for them. Returns torchrun's exit
    status and whether SIGTERM came."""
    import signal

    from ctrlora_cli.progress import describe_train_base, progress_bars
    from ctrlora_cli.tensorboard_log import TensorBoardLog
    from engine.progress import Progress
    from engine.training.launcher import METRICS
    from engine.training.metrics import MetricsTail

    stopped = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    tail, board = MetricsTail(run / METRICS), TensorBoardLog(run) if log_to else None
    process = subprocess.Popen(command, env=env)
    try:
        with progress_bars(show, describe=describe_train_base) as callback:
            callback(Progress("train-base", 0, settings.steps))
            while True:
                running = process.poll() is None
                for record in tail.read():
                    samples_per_step = settings.batch * settings.grad_accum * record.get("world_size", 1)
                    record = {**record, "it_s": record["samples_per_s"] / samples_per_step, "lr": settings.lr}
                    callback(Progress("train-base", record["step"], settings.steps, record))
                    if board:
                        board.train_base_record(record)
                if not running:
                    return process.returncode, bool(stopped)
                time.sleep(0.5)
    finally:
        if board:
            board.close()
