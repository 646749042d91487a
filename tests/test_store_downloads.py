"""Downloads cut at any point continue from the last byte received, whatever the file's size, and
"resuming" is said only when the server sent just the missing bytes (a real HTTP server on
127.0.0.1: tests/hub_server.py)."""

from __future__ import annotations

import random

import pytest

from hub_fixtures import CTRLORA_REPO, SD_REPO, cli, hub, hub_server, store_env, tiny_sd_folder  # noqa: F401
from ctrlora_cli.store import hub as hub_client
from ctrlora_cli.store.events import Message
from ctrlora_cli.store.store import Store
from engine.errors import CtrloraError
from engine.files import sha256_bytes

SMALL_REPO, SMALL_FILE = "test/small", "weights.safetensors"
DATA = random.Random(14).randbytes(300_000)  # 300 kB: well under the 1 MiB a read used to wait for
CUT = 123_456


def _fetch(store, remote, said):
    return hub_client.fetch(store, remote, on_event=lambda e: said.append(e.text) if isinstance(e, Message) else None)


@pytest.fixture()
def small(store_env, hub):
    hub.add_repo(SMALL_REPO, {SMALL_FILE: DATA})
    store = Store(store_env["CTRLORA_HOME"])
    remote = hub_client.resolve(SMALL_REPO).file(SMALL_FILE)
    hub.cut(SMALL_REPO, SMALL_FILE, after=CUT)
    said = []
    with pytest.raises(CtrloraError, match=r"download interrupted .* with 0\.1 MB of 0\.3 MB kept; run the same "
                                           r"pull again to continue"):
        _fetch(store, remote, said)
    part = store.partial / f"{remote.key}.part"
    assert part.read_bytes() == DATA[:CUT]  # every byte the server sent before the cut, and no other
    assert not any("resuming" in text for text in said)
    hub.log.clear()
    return store, remote, part


def test_a_cut_300_kB_file_resumes_from_the_last_byte(small, hub):
    store, remote, part = small
    said = []
    fetched = _fetch(store, remote, said)
    assert [g.range for g in hub.gets(SMALL_FILE)] == [f"bytes={CUT}-"]  # only the missing bytes were asked for
    assert fetched.how == "resume" and fetched.digest == sha256_bytes(DATA) == f"sha256:{remote.sha256}"
    assert fetched.path.read_bytes() == DATA
    assert said == [f"{SMALL_FILE}: resuming at 0.1 MB of 0.3 MB"]


def test_a_server_that_ignores_range_is_not_said_to_resume(small, hub):
    store, remote, part = small
    hub.ignore_range.add(f"{SMALL_REPO}/{SMALL_FILE}")
    said = []
    fetched = _fetch(store, remote, said)
    assert [g.range for g in hub.gets(SMALL_FILE)] == [f"bytes={CUT}-"]  # asked, and answered 200 with all of it
    assert fetched.how == "download" and fetched.digest == sha256_bytes(DATA)
    assert not any("resuming" in text for text in said)
    assert said == [f"{SMALL_FILE}: the server sent the whole file again (it ignored the range request); "
                    f"downloading 0.3 MB from the start"]


def test_a_pull_cut_in_a_file_under_1_MiB_continues_on_the_next_pull(store_env, hub):
    vae = "vae/diffusion_pytorch_model.fp16.safetensors"
    size = len(hub.repos[SD_REPO].files[vae])
    assert 500_000 < size < 1 << 20
    hub.cut(SD_REPO, vae, after=300_000)
    hub.log.clear()
    first = cli("pull", f"sd:{SD_REPO}", "--name", "cut-sd")
    finished = {g.path for g in hub.gets()} - {g.path for g in hub.gets(vae)}
    assert finished
    total = f"{size / 1e6:.1f} MB"
    assert first.code == 1 and f"0.3 MB of {total} kept; run the same pull again to continue" in first.err
    store = Store(store_env["CTRLORA_HOME"])
    assert store.list() == [] and 300_000 in [p.stat().st_size for p in store.partials()]

    hub.log.clear()
    second = cli("pull", f"sd:{SD_REPO}", "--name", "cut-sd")
    assert second.code == 0, second.err
    assert [g.range for g in hub.gets(vae)] == ["bytes=300000-"]
    assert f"{vae}: resuming at 0.3 MB of {total}" in second.err
    assert not finished & {g.path for g in hub.gets()}  # the files the first pull finished were kept
    record = next(f for f in store.get("cut-sd").files if f.path == "vae/diffusion_pytorch_model.safetensors")
    assert record.digest == f"sha256:{hub.repos[SD_REPO].etag(vae)}" and store.partials() == []
    assert cli("verify", "cut-sd").code == 0


def test_ctrl_c_during_a_pull_exits_130_and_keeps_what_was_downloaded(store_env, hub):
    import signal
    import time

    from hub_fixtures import BASE_FILE
    from test_store_slow import _spawn

    store = Store(store_env["CTRLORA_HOME"])
    hub.rate = 1_500_000  # the 14.8 MB base takes about 10 s
    proc = _spawn(store_env, "pull", f"hf://{CTRLORA_REPO}/{BASE_FILE}", "--name", "stopped")
    deadline = time.time() + 120
    while time.time() < deadline and not (store.partials() and store.partials()[0].stat().st_size > 1_000_000):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "warning: interrupted: the same pull continues from the bytes already downloaded"
    assert "Traceback" not in err and store.list() == [] and store.partials()[0].stat().st_size > 1_000_000
