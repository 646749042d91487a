"""Distributed pretraining of a Base ControlNet: the worker that torchrun starts on every GPU.

    python -m torch.distributed.run ... -m engine.training.worker --sd SD --data canny=DIR ... --out RUN

Its arguments are the fields of ``engine.training.settings.TrainBaseSettings`` (defaults and
ranges there; ``python -m engine.training.worker --help`` lists them).

The reference schedule: every micro-batch holds ONE condition and switches that condition's
adapter in; all ranks draw the same condition at each micro-step from a seeded schedule (each
round of micro-steps visits every condition once, in random order). The base and every
condition's adapter are trained together with the one loss.

Gradients: DDP reduces the base's. Each condition's adapter is idle on the steps that drew
another, so DDP is told to ignore adapter parameters, and the adapters used in an optimizer step
are all-reduced explicitly once per step, in the schedule's order (identical on every rank). No
unused-parameter search, and idle adapters keep ``grad=None`` so AdamW leaves them untouched.

Randomness is a pure function of (seed, micro-step, rank), and a folder's data positions are
counters per condition, so a checkpoint holds everything needed to continue exactly, bit for bit.
With another number of processes (the same total batch) the schedule and the samples of each step
are the same (positions are counted globally; each rank takes its own slice), but not the noise,
which is drawn per rank. Shards are streamed by each rank's readers (``engine.training.stream``);
the checkpoint holds where every reader stands, so each sample is used once per epoch across
resumes, with any number of processes and readers.

SIGTERM (SLURM's pre-emption; torchrun forwards its own): the ranks agree at the end of the step,
checkpoint there and stop (exit 143). Restarted by torchrun (``--max-restarts``), a worker
continues from the checkpoint.

Rank 0 writes checkpoints and the result atomically; ``<run>/metrics.jsonl`` carries progress for
the CLI to render. A run keeps its folder: a new run refuses a folder that holds one, and
``--resume`` needs a checkpoint and the settings and data the run began with (``run.json``,
written by rank 0 once the data is read); the command checks this before launching, and every
worker checks it again (``engine.training.launcher.check_run_folder``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.errors import UsageError
from engine.training import launcher
from engine.training.launcher import CHECKPOINT, METRICS, RANKS, RENDEZVOUS_MARKER, RESULT, RUN_JSON, read_worker_args
from engine.training.metrics import truncate_metrics
from engine.training.settings import TrainBaseSettings
from engine.files import atomic_path, write_json

# The models (torch, diffusers) are imported where they are used: a worker that refuses its run
# folder does so in a second or two, before loading them.


# -- the schedule and the data positions -------------------------------------------------------

def condition_at(micro_step: int, conditions: list[str], seed: int) -> str:
    """The condition of a global micro-step: each round of len(conditions) micro-steps is a
    seeded random permutation, so every condition is visited equally often, in random order."""
    n = len(conditions)
    order = np.random.default_rng([seed, micro_step // n]).permutation(n)
    return conditions[int(order[micro_step % n])]


def sample_indices(cursor: int, rank: int, batch: int, size: int, seed: int, condition: str) -> torch.Tensor:
    """This rank's samples for the global positions [cursor + rank*batch, +batch) of a condition's
    stream: epoch e is a seeded permutation of its ``size`` samples, so within an epoch no sample
    is read twice, whatever the number of ranks."""
    positions = range(cursor + rank * batch, cursor + (rank + 1) * batch)
    out = []
    for pos in positions:
        epoch, offset = divmod(pos, size)
        out.append(int(_permutation(seed, condition, epoch, size)[offset]))
    return torch.tensor(out, dtype=torch.long)


_PERMS: dict = {}


def _permutation(seed: int, condition: str, epoch: int, size: int) -> np.ndarray:
    key = (seed, condition, epoch, size)
    if key not in _PERMS:
        tag = int.from_bytes(hashlib.sha256(condition.encode()).digest()[:4], "little")
        _PERMS.clear()  # one epoch per condition at a time is all a run needs
        _PERMS[key] = np.random.default_rng([seed, tag, epoch]).permutation(size)
    return _PERMS[key]


def step_generator(seed: int, micro_step: int, rank: int, device, stream: int = 0) -> torch.Generator:
    """Noise, timesteps and prompt dropout of one micro-step on one rank (``stream`` 1: evaluation)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.default_rng([seed, stream, micro_step, rank]).integers(2**62)))
    return g


# -- distributed helpers -----------------------------------------------------------------------

def all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    """Average gradients across ranks in one flat buffer (one collective, not one per tensor)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_from_rank0(tensors: list[torch.Tensor], world: int) -> None:
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _save_atomic(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# -- the run -----------------------------------------------------------------------------------

def main(argv=None) -> None:
    _end_with_torchrun()
    args = read_worker_args(argv, description=__doc__.split("\n\n")[0])
    out = Path(args.out)
    restarted = _attempt() > 0
    if restarted:  # torchrun --max-restarts started us again: continue from the last checkpoint, if any
        from dataclasses import replace

        # (--pause-after holds a test's first attempt only: the restarted one runs to the end)
        args = replace(args, resume=(out / CHECKPOINT).is_file(), pause_after=0)
    signal.signal(signal.SIGTERM, lambda signum, frame: _STOP.set())
    try:
        # The command checked this already; a worker started by hand (--print-command) checks it too.
        launcher.check_run_folder(out, args, int(os.environ.get("WORLD_SIZE", "1")), force=restarted)
        finished = _run(args, out)
    except UsageError as exc:  # one line, exit 2, as the command's own refusals
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if _STOP.is_set() and not finished:
        raise SystemExit(128 + signal.SIGTERM)


# SIGTERM (SLURM's pre-emption, torchrun's shutdown): the ranks agree at the end of the step,
# write a checkpoint at that step and stop; the run continues with --resume.
_STOP = threading.Event()


def _agreed_stop(world: int, device) -> bool:
    flag = torch.tensor([1.0 if _STOP.is_set() else 0.0], device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _end_with_torchrun() -> None:
    """torchrun starts each worker in a session of its own, so killing the command's process
    group with SIGKILL (or losing torchrun any other way) would leave its workers training on,
    writing checkpoints into the folder that a resumed run then uses. A worker started by
    torchrun ends itself, as by SIGKILL, once its parent is gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-torchrun", daemon=True).start()


def _run(args: TrainBaseSettings, out: Path) -> bool:
    from datetime import timedelta

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    timeout = timedelta(seconds=args.timeout)
    if cuda:
        # Each rank on its own GPU before NCCL starts: a communicator (or a barrier) made first
        # would sit on GPU 0 for every rank of the node.
        torch.cuda.set_device(device)
        _init_process_group("nccl", timeout, device_id=device)
    else:
        _init_process_group("gloo", timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(out / RENDEZVOUS_MARKER, {"world_size": world, "time": time.time()})
    try:
        return _train(args, out, rank, world, device)
    finally:
        dist.destroy_process_group()


def _attempt() -> int:
    """Which start of the workers this is: 0 the first, more after torchrun restarted them."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _init_process_group(backend: str, timeout, **more) -> None:
    """The process group, its keys kept apart per torchrun attempt. Workers restarted by torchrun
    (``--max-restarts``) meet in the same store as the attempt before, where that attempt's keys
    (each rank's address, NCCL's id) are still set: read by the new ranks, they point at the dead
    ones, and the group never forms (gloo: it waits out ``--timeout``)."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"ctrlora-attempt-{_attempt()}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout, **more)


def _train(args: TrainBaseSettings, out: Path, rank: int, world: int, device: torch.device) -> bool:
    """Train to ``args.steps`` (True), or until stopped (``--stop-after``, SIGTERM: False)."""
    from engine.models import adapters
    from engine.models.state import weights_digest
    from engine.models.storage import load_base, load_sd, save_base, unet_width
    from engine.training.objective import diffusion_loss
    from engine.training.shards import load_condition_data

    from engine.runtime import resolve_precision, set_cpu_bf16

    set_cpu_bf16(None if args.cpu_bf16 == "auto" else args.cpu_bf16 == "1")
    precision = resolve_precision(args.precision, device, training=True, allowed=("fp32", "bf16"),
                                  width=unet_width(args.sd))
    saved = launcher.saved_run(out) if args.resume else None
    if saved is not None and args.precision == "auto":
        # auto keeps what the run began with (an older build, or another CPU, may have decided otherwise)
        precision = saved["identity"].get("precision used", precision)
    from engine.training.shards import needs_vae

    sd = load_sd(args.sd, device=device, vae=needs_vae(args))  # latent shards alone: no VAE
    checkpoint_path = out / CHECKPOINT
    # check_run_folder made sure a resumed run has a checkpoint; its shard readers continue from it
    state = torch.load(checkpoint_path, map_location=device, weights_only=True) if args.resume else None
    data, feed = load_condition_data(args, sd, device, rank, world, state.get("stream") if state else None)
    conditions = list(data)
    wanted = args.wanted_conditions()
    if wanted:
        unknown = sorted(set(wanted) - set(conditions))
        if unknown:
            raise UsageError(f"--conditions names {unknown} with no data (have: {conditions})")
        conditions = wanted
    # The run's identity, now with what only the data tells (its pairs) and the precision decided here.
    identity = {**launcher.run_identity(args, world), "precision used": precision,
                "pairs per condition": {c: len(d) for c, d in data.items() if not d.streamed}}
    if args.resume:
        if saved is not None:
            launcher.refuse_changes(out, launcher.resume_changes(saved["identity"], identity))
    elif rank == 0:
        write_json(out / RUN_JSON, {"identity": identity, "conditions": conditions, "world_size": world,
                                    "settings": asdict(args)}, sort_keys=False)
        truncate_metrics(out / METRICS, 0)  # a restart (torchrun --max-restarts) before the first checkpoint

    from engine.models.controlnet import BaseControlNetModel

    controlnet = load_base(args.init_base, device=device) if args.init_base else BaseControlNetModel.from_unet(sd.unet)
    torch.manual_seed(args.seed)
    for condition in conditions:
        adapters.add_adapter(controlnet, condition, rank=args.rank)
    controlnet.to(device).train()
    if precision == "bf16":
        # The frozen UNet in bf16 (autocast would cast it at every op), once the base has copied
        # its fp32 encoder: what trains keeps fp32 master weights. The VAE and text encoder, which
        # encode the data (and key its cache), stay as loaded.
        sd.unet.to(torch.bfloat16)
    # The base's own zero convs and norms never act while a condition is routed: freeze them.
    own = {f"{n}.{p}" for n in adapters.routed_layers(controlnet) for p in ("weight", "bias")}
    for name, param in controlnet.named_parameters():
        param.requires_grad_(name not in own)
    if args.grad_checkpointing:
        controlnet.enable_gradient_checkpointing()
    adapter_params = {c: list(adapters.adapter_parameters(controlnet, c).values()) for c in conditions}
    adapter_ids = {id(p) for ps in adapter_params.values() for p in ps}
    ignore = [n for n, p in controlnet.named_parameters() if id(p) in adapter_ids or n in own]

    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(controlnet, ignore)
    # DDP broadcasts rank 0's weights except the ignored ones: send those too, so every rank
    # starts from the same adapters whatever its random state.
    ignored = dict(controlnet.named_parameters())
    broadcast_from_rank0([ignored[n].data for n in ignore], world)
    ddp = DDP(controlnet, device_ids=[device.index] if device.type == "cuda" else None)
    trainable = [p for p in controlnet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)

    step, cursors, eval_start = 0, {c: 0 for c in conditions}, None
    metrics = out / METRICS
    if state is not None:
        if state["conditions"] != conditions:
            raise UsageError(f"cannot resume {out}: its checkpoint has the conditions {state['conditions']}, "
                             f"not {conditions}")
        if int(state["step"]) > args.steps:
            raise UsageError(f"cannot resume {out}: its checkpoint is at step {state['step']}, past --steps "
                             f"{args.steps}")
        controlnet.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, cursors = int(state["step"]), {c: int(v) for c, v in state["cursors"].items()}
        eval_start = state.get("eval_start")
        if rank == 0:
            truncate_metrics(metrics, step)

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else nullcontext())
    if step == 0:
        eval_start = _eval_loss(sd, controlnet, data, conditions, args, device, autocast)
    drawn: list[str] = []
    t0, samples_since = time.perf_counter(), 0
    stop_at = min(args.steps, step + args.stop_after) if args.stop_after else args.steps
    while step < stop_at:
        used: list[str] = []
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            micro_step = step * args.grad_accum + micro
            condition = condition_at(micro_step, conditions, args.seed)
            source = data[condition]
            generator = step_generator(args.seed, micro_step, rank, device)
            if source.streamed:
                latents, cond, text = source.next_batch(args.batch, generator, args.drop_prompt)
            else:
                indices = sample_indices(cursors[condition], rank, args.batch, len(source), args.seed, condition)
                cursors[condition] += world * args.batch
                latents, cond, text = source.sample_batch(indices, generator, args.drop_prompt)
            sync = micro == args.grad_accum - 1
            with controlnet.routing.use(condition), autocast, (nullcontext() if sync else ddp.no_sync()):
                loss = diffusion_loss(sd.unet, ddp, sd.scheduler, latents, cond, text, generator)
                (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
            if condition not in used:
                used.append(condition)
            drawn.append(condition)
        for condition in used:  # same order on every rank: the schedule is shared
            all_reduce_mean([p.grad for p in adapter_params[condition] if p.grad is not None], world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples_since += args.batch * args.grad_accum
        if step % args.log_every == 0 or step == stop_at:
            elapsed = time.perf_counter() - t0
            rate = torch.tensor([samples_since / max(elapsed, 1e-9), loss_sum], device=device)
            gathered = [torch.zeros_like(rate) for _ in range(world)]
            dist.all_gather(gathered, rate)
            if rank == 0:
                per_rank = [float(g[0]) for g in gathered]
                record = {"step": step, "steps": args.steps, "loss": sum(float(g[1]) for g in gathered) / world,
                          "conditions": used, "samples_per_s": sum(per_rank), "per_rank_samples_per_s": per_rank,
                          "world_size": world}
                if device.type == "cuda":
                    record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                with open(metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
            t0, samples_since = time.perf_counter(), 0
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            _checkpoint(controlnet, optimizer, step, cursors, feed, conditions, args, checkpoint_path, rank, world,
                        eval_start)
        while args.pause_after and step == args.pause_after and not _STOP.is_set():  # tests: killed here
            time.sleep(0.1)
        if _agreed_stop(world, device):
            if rank == 0:
                print(f"SIGTERM: checkpoint at step {step} in {out}; continue with --resume", file=sys.stderr)
            break
    _checkpoint(controlnet, optimizer, step, cursors, feed, conditions, args, checkpoint_path, rank, world,
                        eval_start)

    # Evidence for tests and logs: each rank's schedule and weights (and the shard samples it used).
    (out / RANKS).mkdir(exist_ok=True)
    write_json(out / RANKS / f"rank{rank}.json", {"drawn": drawn, "weights": weights_digest(controlnet),
                                                  "start_step": step - len(drawn) // args.grad_accum,
                                                  "world_size": world, "threads": torch.get_num_threads(),
                                                  "vae_loaded": sd.vae is not None, "precision": precision,
                                                  "unet_dtype": str(sd.unet.dtype).removeprefix("torch."),
                                                  **_peak_memory(device),
                                                  **({"used": feed.used} if feed is not None else {})})
    if step >= args.steps:
        eval_end = _eval_loss(sd, controlnet, data, conditions, args, device, autocast)
        if rank == 0:
            _write_result(controlnet, conditions, args, out, save_base, eval_start, eval_end)
    dist.barrier()
    return step >= args.steps


def _peak_memory(device: torch.device) -> dict:
    """This process's peak resident memory (what the OS gave it, in MiB) and, on a GPU, the most
    CUDA memory its tensors held (GiB): the memory a precision takes (``bench/train_base.py --memory``)."""
    import resource

    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        peak["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return peak


def _checkpoint(controlnet, optimizer, step, cursors, feed, conditions, args, path: Path, rank: int, world: int,
                eval_start) -> None:
    """Rank 0 writes the weights, the optimizer and every data position: the folders' cursors and
    where each rank's shard readers stand (``engine.training.stream``)."""
    stream = None
    if feed is not None:
        parts = [None] * world
        dist.all_gather_object(parts, feed.state())
        stream = {"layout": [world, feed.layout.workers], "ranks": parts}
    if rank == 0:
        _save_atomic({"model": controlnet.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                      "cursors": cursors, "conditions": conditions, "seed": args.seed, "eval_start": eval_start,
                      **({"stream": stream} if stream else {})}, path)
    dist.barrier()


@torch.no_grad()
def _eval_loss(sd, controlnet, data, conditions, args, device, autocast) -> float:
    """Loss on a fixed set (first samples of each condition, fixed noise): comparable across a run."""
    from engine.training.objective import diffusion_loss

    total = 0.0
    for i, condition in enumerate(conditions):
        generator = step_generator(args.seed, i, 0, device, stream=1)
        latents, cond, text = data[condition].eval_batch(generator)
        with controlnet.routing.use(condition), autocast:
            total += diffusion_loss(sd.unet, controlnet, sd.scheduler, latents, cond, text, generator).item()
    return total / len(conditions)


def _write_result(controlnet, conditions, args, out: Path, save_base, eval_start, eval_end) -> None:
    """The official split: a base folder plus one adapter file per condition. The base's own
    zero convs and norms (the starting point of future conditions) are the first condition's."""
    from engine.formats.adapter_file import save_adapter_file
    from engine.models import adapters
    from engine.models.arch import arch_id

    result = out / RESULT
    tmp = out / f".{RESULT}.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    with torch.no_grad():
        for layer in adapters.routed_layers(controlnet).values():
            weight, bias = layer.params_for(conditions[0])
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    save_base(controlnet, tmp / "controlnet")
    arch = arch_id(controlnet.config)
    for condition in conditions:
        save_adapter_file(tmp / "adapters" / f"{condition}.safetensors",
                          adapters.adapter_state_dict(controlnet, condition), rank=args.rank, alpha=args.rank,
                          base_arch=arch, condition=condition,
                          provenance={"source": "train-base", "steps": args.steps, "seed": args.seed})
    write_json(tmp / "summary.json", {"conditions": conditions, "steps": args.steps, "arch": arch,
                                      "eval_loss_start": eval_start, "eval_loss_end": eval_end,
                                      "base_zero_convs_from": conditions[0]})
    shutil.rmtree(result, ignore_errors=True)
    os.replace(tmp, result)


if __name__ == "__main__":
    main()
