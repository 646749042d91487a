"""train-base's data path alone (no model): streamed shards over many simulated ranks and readers."""

import io
import json
import tarfile
from collections import Counter

import pytest

from engine.errors import UsageError
from engine.training.stream import Layout, fresh_states, open_feed, resume_states
from engine.training.worker import condition_at

CONDITIONS = ["canny", "depth"]


def make_shards(folder, count, per_shard=2):
    """``count`` tiny tar shards of ``per_shard`` samples each (only a .json: condition and id),
    the conditions alternating; plus one sample of a condition the run does not train."""
    folder.mkdir()
    paths = []
    for s in range(count):
        path = folder / f"shard-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard + (s == 3)):
                meta = {"condition": CONDITIONS[(s + k) % 2] if k < per_shard else "other", "id": f"{s}/{k}"}
                data = json.dumps(meta).encode()
                info = tarfile.TarInfo(f"{s:05d}{k:03d}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def decode(sample):
    meta = json.loads(sample["json"])
    return None if meta["condition"] == "other" else (meta["condition"], meta["id"])


def run_steps(paths, layout, states, leftovers, first_step, steps, batch=2, background=False):
    """The training loop's data path: each micro-step draws one condition (the shared schedule);
    every rank takes ``batch`` samples of it. Returns the feeds and the (epoch, id) each step used."""
    feeds = [open_feed(paths, layout, r, states, leftovers.get(r, []), seed=7, decode=decode, background=background)
             for r in range(layout.ranks)]
    used = []
    for step in range(first_step, first_step + steps):
        condition = condition_at(step, CONDITIONS, 7)
        for feed in feeds:
            taken = feed.take(condition, batch)
            assert all(t.condition == condition for t in taken)
            used += [(t.epoch, t.payload) for t in taken]
    return feeds, used


def checkpoint(feeds, layout):
    return json.loads(json.dumps({"layout": [layout.ranks, layout.workers], "ranks": [f.state() for f in feeds]}))


def test_every_sample_once_per_epoch_across_a_kill_and_resume_at_another_world_size(tmp_path):
    """8 ranks x 4 readers over 1,000 shards (2,000 samples): 40 steps, a checkpoint, 15 more
    steps lost to a kill; resumed on 3 ranks x 2 readers, checkpointed again and resumed on the
    same layout. The samples the kept steps used: each one of every epoch exactly once."""
    paths = make_shards(tmp_path / "shards", 1000)
    everything = {f"{s}/{k}" for s in range(1000) for k in range(2)}
    big, small = Layout(8, 4), Layout(3, 2)

    feeds, kept = run_steps(paths, big, *fresh_states(big), 0, 40)
    saved = checkpoint(feeds, big)
    _, lost = run_steps(paths, big, *fresh_states(big), 0, 55)  # the killed run went on, then died
    assert lost[:len(kept)] == kept  # the same run: seeded, whatever the timing

    feeds, more = run_steps(paths, small, *resume_states(saved, small, 1000, 7), 40, 201)
    kept += more
    saved = checkpoint(feeds, small)
    assert any(part["leftovers"] for part in saved["ranks"])  # samples received but not used yet
    states, leftovers = resume_states(saved, small, 1000, 7)
    _, more = run_steps(paths, small, states, leftovers, 241, 500)
    kept += more

    per_epoch = Counter(epoch for epoch, _ in kept)
    assert per_epoch[0] == per_epoch[1] == 2000 and per_epoch[2] > 0
    for epoch in (0, 1, 2):
        ids = [i for e, i in kept if e == epoch]
        assert len(ids) == len(set(ids))  # never twice in an epoch
        if epoch < 2:
            assert set(ids) == everything  # and every one of them
    # The epochs differ in order; readers never read another's shards in an epoch.
    assert [i for e, i in kept if e == 0][:50] != [i for e, i in kept if e == 1][:50]


def test_background_readers_and_refusals(tmp_path):
    """DataLoader workers (2 processes) deliver each reader's samples in its order, the same as
    reading in the rank's own process; fewer shards than readers is refused."""
    paths = make_shards(tmp_path / "shards", 6)
    layout = Layout(1, 2)
    _, inline = run_steps(paths, layout, *fresh_states(layout), 0, 6)
    feeds, background = run_steps(paths, layout, *fresh_states(layout), 0, 6, background=True)
    assert sorted(background) == sorted(inline) and len(set(background)) == 12
    assert set(feeds[0].state()["readers"]) == {"0", "1"}
    with pytest.raises(UsageError, match="6 shard.* for 4 process.* x 2 reader"):
        Layout(4, 2).check(6)
