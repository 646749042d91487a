"""Streamed shards: each reader (one per rank and DataLoader worker) reads only its own share of
the shard list, in a seeded order per epoch, and a checkpoint holds where every reader stands.

The layout: ``ranks x workers`` readers; reader ``g = rank * workers + worker``. In epoch ``e``
the shard list is put in a seeded order (``epoch_order``) and reader ``g`` takes the shards at
positions ``g, g + R, g + 2R, ...`` (R readers), each read from its first sample to its last
(tar shards, read as a stream by ``webdataset``; nothing indexes them). A reader that has read
its share moves on to its share of the next epoch on its own: readers are never synchronised.

Every sample carries its tag (reader, epoch, shard, position in the shard). The training process
of each rank (``RankFeed``) mirrors each of its readers' queue from the tags it receives, keeps
what it received but did not use yet in one queue per condition (each micro-batch holds one
condition), and hands its state to the checkpoint: per reader, the work it has left (items
``[epoch, shard, first, stop]``) and the next epoch it would start; and the samples received but
not used (``leftovers``, each an item of one sample).

Exactly once: every sample of epoch ``e`` that a run uses, it uses once, across kills and resumes
counted from the checkpoint (what was used after the last checkpoint was undone with the model and
is used again). With the same layout, each reader continues its own queue. With another layout
(other ``--nproc-per-node``/nodes or ``--workers``), the work left of every epoch already started
by any reader (the old readers' queues, the shares of such epochs they had not reached, the
leftovers) is pooled in (epoch, shard, first) order and dealt to the new readers round-robin; the
epochs after those are then shared among the new readers as above. So an epoch's samples are each
used once, whichever layout used them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from engine.errors import UsageError

STOP = -1  # an item's stop: read to the end of the shard


@dataclass(frozen=True)
class Layout:
    ranks: int
    workers: int  # readers per rank (DataLoader workers; 1 when the rank reads in its own process)

    @property
    def readers(self) -> int:
        return self.ranks * self.workers

    def reader(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    def check(self, shards: int) -> "Layout":
        if shards < self.readers:
            raise UsageError(f"{shards} shard(s) for {self.ranks} process(es) x {self.workers} reader(s): every "
                             f"reader needs at least one shard; use fewer --workers or processes, or more shards")
        return self


def epoch_order(seed: int, epoch: int, shards: int) -> np.ndarray:
    """The shard positions of an epoch, in its seeded order."""
    return np.random.default_rng([seed, 0x5A4D, epoch]).permutation(shards)


@dataclass
class ReaderState:
    """One reader's work left: ``items`` ([epoch, shard, first, stop]) then its share of ``next_epoch``, ..."""

    items: list[list[int]] = field(default_factory=list)
    next_epoch: int = 0

    def to_json(self) -> dict:
        return {"items": [list(map(int, i)) for i in self.items], "next_epoch": int(self.next_epoch)}

    @classmethod
    def from_json(cls, value: dict) -> "ReaderState":
        return cls([list(map(int, i)) for i in value["items"]], int(value["next_epoch"]))

    def refill(self, reader: int, readers: int, shards: int, seed: int) -> None:
        """Queue the reader's share of the next epoch (when its queue ran out)."""
        share = epoch_order(seed, self.next_epoch, shards)[reader::readers]
        self.items = [[self.next_epoch, int(s), 0, STOP] for s in share]
        self.next_epoch += 1


@dataclass
class Tagged:
    reader: int
    epoch: int
    shard: int
    position: int
    condition: str
    payload: object


def read_shard(path: str | Path, first: int = 0, stop: int = STOP) -> Iterator[tuple[int, dict]]:
    """(position, sample) for the samples of a tar shard from ``first`` (to ``stop``): a sample is
    the members that share a key (``000017.png``, ``000017.cond.png``, ``000017.json`` ...),
    {suffix: bytes, "__key__": key}, grouped by webdataset as it streams the file."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        with open(path, "rb") as stream:
            samples = group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))
            for position, sample in enumerate(samples):
                if stop != STOP and position >= stop:
                    return
                if position >= first:
                    yield position, sample
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"shard {path} is not a readable tar file ({exc})") from None


def sample_meta(sample: dict) -> dict:
    """A shard sample's ``.json`` (``{"condition": ..., "prompt": ...}``), {} when it has none."""
    raw = sample.get("json")
    return json.loads(raw) if raw else {}


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def _first(sample: dict, names) -> bytes | None:
    return next((sample[n] for n in names if n in sample), None)


def raw_fields(sample: dict) -> tuple[str, str, bytes, bytes]:
    """A raw shard sample's (condition, prompt, target image bytes, condition image bytes)."""
    meta = sample_meta(sample)
    condition = meta.get("condition")
    target = _first(sample, (*IMAGE_EXTS, *(f"target.{e}" for e in IMAGE_EXTS)))
    cond = _first(sample, [f"{role}.{e}" for e in IMAGE_EXTS for role in ("cond", "source")])
    if target is None or cond is None or not condition:
        raise UsageError(f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r} lacks a target image, a "
                         f".cond image or a .json with \"condition\"")
    prompt = (sample.get("txt") or b"").decode("utf-8", "replace").strip() or meta.get("prompt", "")
    return condition, prompt, target, cond


def vae_input(data: bytes, role: str, resolution: int):
    """An image as the VAE is fed it: short side resized, centre crop; a target in SD's [-1, 1],
    a condition in [0, 1] (as ``engine.training.pairs.encode_pairs``)."""
    import io

    from PIL import Image

    from engine.images import image_to_tensor, resize_center_crop

    with Image.open(io.BytesIO(data)) as image:
        pixels = image_to_tensor(resize_center_crop(image.convert("RGB"), resolution))
    return pixels * 2 - 1 if role == "target" else pixels


def iterate_reader(state: ReaderState, reader: int, readers: int, paths: list, seed: int,
                   decode: Callable[[dict], tuple[str, object] | None]) -> Iterator[Tagged]:
    """A reader's samples, forever (epoch after epoch); ``decode`` turns a raw sample into
    (condition, payload), or None for one the run does not use (another condition)."""
    state = ReaderState.from_json(state.to_json())  # the caller's copy stays as it was
    found = True
    while True:
        if not state.items:
            if not found:  # a whole share of an epoch without a sample the run uses: nothing will come
                return
            state.refill(reader, readers, len(paths), seed)
            found = False
        epoch, shard, first, stop = state.items.pop(0)
        for position, sample in read_shard(paths[shard], first, stop):
            decoded = decode(sample)
            if decoded is not None:
                found = True
                yield Tagged(reader, epoch, shard, position, *decoded)


def round_robin(iterators: list[Iterator]) -> Iterator:
    """One item from each in turn (as a DataLoader takes its workers' samples), skipping ended ones."""
    live = list(iterators)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


class RankFeed:
    """What one rank's training loop draws from: ``take(condition, n)`` returns the next ``n``
    samples of that condition from the rank's readers; ``state()`` is the rank's part of the
    checkpoint."""

    def __init__(self, samples: Iterable[Tagged], states: dict[int, ReaderState], leftovers: list[Tagged],
                 layout: Layout, shards: int, seed: int):
        self.samples = iter(samples)
        self.states = {g: ReaderState.from_json(s.to_json()) for g, s in states.items()}
        self.layout, self.shards, self.seed = layout, shards, seed
        self.queues: dict[str, list[Tagged]] = {}
        self.used: list[list[int]] = []  # [epoch, shard, position] of each sample taken (evidence)
        for tagged in leftovers:
            self.queues.setdefault(tagged.condition, []).append(tagged)

    def take(self, condition: str, n: int) -> list[Tagged]:
        queue = self.queues.setdefault(condition, [])
        while len(queue) < n:
            try:
                tagged = next(self.samples)
            except StopIteration:
                raise UsageError(f"the shards hold no more samples of condition {condition!r}") from None
            self._advance(tagged)
            self.queues.setdefault(tagged.condition, []).append(tagged)
        taken, self.queues[condition] = queue[:n], queue[n:]
        self.used += [[t.epoch, t.shard, t.position] for t in taken]
        return taken

    def _advance(self, tagged: Tagged) -> None:
        """Mirror the reader's queue: everything before this sample is read."""
        state = self.states[tagged.reader]
        while True:
            if not state.items:
                state.refill(tagged.reader, self.layout.readers, self.shards, self.seed)
            epoch, shard, first, stop = state.items[0]
            if (epoch, shard) == (tagged.epoch, tagged.shard) and tagged.position >= first and \
                    (stop == STOP or tagged.position < stop):
                state.items[0][2] = tagged.position + 1
                if stop != STOP and tagged.position + 1 >= stop:
                    state.items.pop(0)
                return
            state.items.pop(0)

    def state(self) -> dict:
        leftovers = [[t.epoch, t.shard, t.position, t.position + 1] for q in self.queues.values() for t in q]
        return {"readers": {str(g): s.to_json() for g, s in sorted(self.states.items())},
                "leftovers": sorted(leftovers)}


def fresh_states(layout: Layout) -> tuple[dict[int, ReaderState], dict[int, list]]:
    """A new run: every reader at the start of epoch 0, no leftovers."""
    return {g: ReaderState() for g in range(layout.readers)}, {}


def resume_states(saved: dict, layout: Layout, shards: int, seed: int) -> tuple[dict[int, ReaderState], dict[int, list]]:
    """Every new reader's state, and each rank's leftovers, from a checkpoint's stream state
    (``{"layout": [ranks, workers], "ranks": [RankFeed.state() of each rank]}``); see the
    module's docstring."""
    old = Layout(*saved["layout"])
    readers = {int(g): ReaderState.from_json(s) for part in saved["ranks"] for g, s in part["readers"].items()}
    if old == layout:
        return readers, {rank: part["leftovers"] for rank, part in enumerate(saved["ranks"])}
    top = max(s.next_epoch for s in readers.values())
    pending = [list(i) for part in saved["ranks"] for i in part["leftovers"]]
    for g, state in readers.items():
        pending += state.items
        for epoch in range(state.next_epoch, top):
            pending += [[epoch, int(s), 0, STOP] for s in epoch_order(seed, epoch, shards)[g::old.readers]]
    pending.sort(key=lambda i: (i[0], i[1], i[2]))
    return {g: ReaderState(pending[g::layout.readers], top) for g in range(layout.readers)}, {}


def rank_states(states: dict[int, ReaderState], layout: Layout, rank: int) -> dict[int, ReaderState]:
    return {layout.reader(rank, w): states[layout.reader(rank, w)] for w in range(layout.workers)}


# -- the readers in DataLoader workers ---------------------------------------------------------

def _torch_iterable():
    from torch.utils.data import IterableDataset

    return IterableDataset


class ShardReaders(_torch_iterable()):
    """A rank's readers as a torch IterableDataset: DataLoader worker ``w`` is reader
    ``rank * workers + w`` (without workers, the rank's one reader)."""

    def __init__(self, paths: list, layout: Layout, rank: int, states: dict[int, ReaderState], seed: int,
                 decode: Callable[[dict], tuple[str, object] | None]):
        self.paths, self.layout, self.rank, self.states, self.seed, self.decode = \
            [str(p) for p in paths], layout, rank, states, seed, decode

    def __iter__(self) -> Iterator[Tagged]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        workers = [info.id] if info is not None else range(self.layout.workers)
        return round_robin([iterate_reader(self.states[g], g, self.layout.readers, self.paths, self.seed, self.decode)
                            for g in (self.layout.reader(self.rank, w) for w in workers)])


def open_feed(paths: list, layout: Layout, rank: int, states: dict[int, ReaderState], leftovers: list[list[int]],
              seed: int, decode: Callable, background: bool) -> RankFeed:
    """The rank's feed: its readers in ``layout.workers`` DataLoader worker processes (``background``),
    else in this process. ``leftovers`` (items of one sample) are read here, first."""
    mine = rank_states(states, layout, rank)
    readers = ShardReaders(paths, layout, rank, mine, seed, decode)
    if background:
        from torch.utils.data import DataLoader

        samples = iter(DataLoader(readers, batch_size=None, num_workers=layout.workers, collate_fn=_identity,
                                  prefetch_factor=4, persistent_workers=False, worker_init_fn=_ignore_sigterm))
    else:
        samples = iter(readers)
    return RankFeed(samples, mine, _read_items(paths, leftovers, decode, layout.reader(rank, 0)), layout,
                    len(paths), seed)


def _identity(x):
    return x


def _ignore_sigterm(worker: int) -> None:
    """A SIGTERM to the whole job (SLURM's pre-emption) must not end the readers before the
    training process has written its checkpoint (torch would fail it on a reader's death); they
    end with it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _read_items(paths: list, items: list[list[int]], decode: Callable, reader: int) -> list[Tagged]:
    out = []
    for epoch, shard, first, stop in items:
        for position, sample in read_shard(paths[shard], first, stop):
            decoded = decode(sample)
            if decoded is not None:
                out.append(Tagged(reader, epoch, shard, position, *decoded))
    return out
