"""Nothing a user makes is lost or silently replaced (issue 14, the store's part): taken names,
``rm`` of what other entries need, run folders, views wherever the store is, one exit code per
kind of error, and the base an adapter was made for. Real store folders, real ``mv`` and ``cp``,
real subprocesses of the CLI (one at a real pseudo-terminal)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, ctrl_c_as_at_a_terminal, run_cli
from hub_fixtures import COND0_FILE, COND1_FILE, CTRLORA_REPO, cli, hub, hub_server, store_env, tiny_sd_folder  # noqa: F401
from ctrlora_cli.store import resolve
from ctrlora_cli.store.store import Store
from engine.errors import CtrloraError, UsageError


def _blobs(store: Store) -> set[str]:
    return {p.name for p in store.blobs.iterdir()}


def _referenced(store: Store) -> set[str]:
    return {store.blob_path(f.digest).name for m in store.list() for f in m.files}


def _human(n: int) -> str:
    from rich.filesize import decimal

    return decimal(n)


def _at_a_terminal(args: list[str], env: dict, answer: str | None, timeout: float = 120) -> tuple[int, str]:
    """``ctrlora ARGS`` in a subprocess whose stdin and stdout are a pseudo-terminal; ``answer``
    is typed once the question shows (None: Ctrl-C instead). Returns (exit code, everything it wrote)."""
    master, slave = pty.openpty()
    full = dict(os.environ, **env, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                COLUMNS="200", TERM="dumb")
    proc = subprocess.Popen([sys.executable, "-m", "ctrlora_cli", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=full, close_fds=True, preexec_fn=ctrl_c_as_at_a_terminal)
    os.close(slave)
    seen, answered, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            # select first: a child waiting on a question we never saw must not hang the suite
            wait = max(0.0, deadline - time.monotonic())
            if answer is None and answered:
                wait = min(wait, 2.0)  # after Ctrl-C the child should end at once
            ready, _, _ = select.select([master], [], [], wait)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if not answered and b"[y/N]" in seen:
                if answer is None:
                    proc.send_signal(signal.SIGINT)
                else:
                    os.write(master, answer.encode() + b"\n")
                answered = True
        if answer is None and answered:
            # A SIGINT that lands between printing the question and reading the answer can be
            # swallowed on its way (a person would press Ctrl-C again): repeat it a few times.
            for _ in range(5):
                try:
                    return proc.wait(timeout=2), seen.decode(errors="replace").replace("\r", "")
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=timeout), seen.decode(errors="replace").replace("\r", "")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


# -- 1. one rule for a name already in the store ----------------------------------------------------

def test_pull_tiny_and_demo_refuse_a_taken_name_and_force_replaces_it(tiny_store, ref_tiny):
    store = tiny_store
    mine = cli("pull", str(ref_tiny / "adapter_cond1.safetensors"), "--name", "mine")  # converted: a blob of its own
    assert mine.code == 0, mine.err
    old_blob = store.blob_path(store.get("mine").files[0].digest).name
    before, tiny_before = _blobs(store), store.get("tiny")

    for source in ("tiny", "demo"):
        refused = cli("pull", source, "--name", "mine")
        assert refused.code == 2 and refused.err == (
            f"error: 'mine' is already in the store (adapter from {ref_tiny / 'adapter_cond1.safetensors'}); use "
            f"another --name, or --force to replace it\n")
        assert _blobs(store) == before and not store.exists("mine-sd")  # refused before any work
        assert os.listdir(store.scratch()) == []
    taken = cli("pull", "demo", "--name", "tiny")
    assert taken.code == 2 and "'tiny' is already in the store (base from random tiny)" in taken.err

    again = cli("pull", "tiny")  # the same source: nothing to do, nothing replaced
    assert again.code == 0 and again.out.startswith("tiny is up to date")
    assert store.get("tiny") == tiny_before

    forced = cli("pull", "tiny", "--name", "mine", "--force")
    assert forced.code == 0, forced.err
    assert store.get("mine").kind == "base" and store.get("mine-canny").made_for["name"] == "mine"
    assert old_blob not in _blobs(store) and _blobs(store) == _referenced(store)  # the old entry's blob collected

    demo = cli("pull", "demo", "--name", "toy")
    assert demo.code == 0, demo.err
    assert store.get("toy-seg").made_for == {"name": "toy", "digest": store.get("toy").weights_digest}
    assert cli("pull", "demo", "--name", "toy").out.startswith("toy is up to date (the demo model")


def test_a_hub_pull_of_another_source_under_a_taken_name_is_refused(store_env, hub, tiny_store_template, monkeypatch):
    shutil.copytree(tiny_store_template, store_env["CTRLORA_HOME"])  # tiny (a tiny base), tiny-sd, tiny-canny
    store = Store(store_env["CTRLORA_HOME"])
    one, other = f"hf://{CTRLORA_REPO}/{COND1_FILE}", f"hf://{CTRLORA_REPO}/{COND0_FILE}"
    assert cli("pull", one, "--name", "c").code == 0
    first = store.get("c")

    hub.log.clear()
    refused = cli("pull", other, "--name", "c")
    assert refused.code == 2 and refused.err.startswith(
        f"error: 'c' is already in the store (adapter from {CTRLORA_REPO}@{first.source['commit'][:12]} {COND1_FILE})")
    assert hub.log == []  # refused before the network
    monkeypatch.setenv("CTRLORA_OFFLINE", "1")
    offline = cli("pull", other, "--name", "c")  # used to say "c is in the store" and exit 0
    assert offline.code == 2 and "already in the store" in offline.err
    assert cli("pull", one, "--name", "c").out.startswith("c is in the store (offline")
    monkeypatch.delenv("CTRLORA_OFFLINE")
    assert cli("pull", one, "--name", "c").out.startswith("c is up to date")
    assert store.get("c") == first

    # --base on an entry already there: checked like a new one, and recorded
    assert cli("pull", "demo").code == 0
    wrong = cli("pull", one, "--name", "c", "--base", "demo")
    assert wrong.code == 2 and "'c' was made for a tiny base, not demo ('demo')" in wrong.err
    right = cli("pull", one, "--name", "c", "--base", "tiny")
    assert right.code == 0 and "c: recorded as made for base 'tiny'" in right.out
    assert store.get("c").made_for == {"name": "tiny", "digest": store.get("tiny").weights_digest}
    assert cli("pull", one, "--name", "c", "--base", "demo-seg").code == 2  # not a base

    forced = cli("pull", other, "--name", "c", "--force")
    assert forced.code == 0, forced.err
    assert store.get("c").source["path"] == COND0_FILE
    assert _blobs(store) == _referenced(store) and store.blob_path(first.files[0].digest).name not in _blobs(store)


def test_a_new_adapter_records_the_base_it_was_made_for(store_env, hub, tiny_store_template):
    shutil.copytree(tiny_store_template, store_env["CTRLORA_HOME"])
    store = Store(store_env["CTRLORA_HOME"])
    pulled = cli("pull", f"hf://{CTRLORA_REPO}/{COND0_FILE}", "--name", "edges", "--base", "tiny")
    assert pulled.code == 0 and "(adapter cond0, rank 4, for tiny bases, made for tiny)" in pulled.out
    assert store.get("edges").made_for == {"name": "tiny", "digest": store.get("tiny").weights_digest}
    assert resolve.made_for(store, "edges") == store.get("edges").made_for
    catalog = cli("pull", "tiny-cond1")  # the catalog names its base; the store does not hold it (yet)
    assert catalog.code == 0 and store.get("tiny-cond1").made_for == {"name": "tiny-official", "digest": None}
    assert "next: ctrlora pull tiny-official" in catalog.out


# -- 2 and 7. rm of what others need; run folders -----------------------------------------------------

def test_rm_of_a_base_names_what_was_made_for_it(tiny_store):
    store = tiny_store
    refused = cli("rm", "tiny")
    assert refused.code == 2 and refused.err == (
        "error: not removing tiny without confirmation (no terminal); tiny-canny would point to nothing: pass -y\n")
    env = {"CTRLORA_HOME": str(store.root)}
    code, said = _at_a_terminal(["rm", "tiny"], env, "n")
    assert code == 1 and "adapter tiny-canny was made for tiny" in said
    assert "Remove tiny (base, 14.3 MB), leaving tiny-canny pointing to nothing? [y/N]" in said
    assert "nothing removed" in said and store.exists("tiny")
    code, said = _at_a_terminal(["rm", "tiny"], env, None)  # Ctrl-C at the question
    assert code == 130 and "Aborted" not in said and store.exists("tiny")

    removed = cli("rm", "-y", "tiny", "tiny-sd")
    assert removed.code == 0 and removed.out.startswith("removed tiny, tiny-sd; freed")
    assert "adapter 'tiny-canny' was made for base 'tiny', which is gone" in removed.err
    listing = cli("list")
    assert "MISSING" in listing.out and "base tiny" in listing.out
    assert "tiny-canny: made for or paired with a model no longer in the store" in listing.out
    assert json.loads(cli("list", "--json").out)[0]["missing"] == {"base": "tiny"}
    assert "made for      base tiny (not in the store)" in cli("show", "tiny-canny").out
    adapter = store.get("tiny-canny")
    again = cli("pull", "tiny")  # as the warning says: the missing ones are made, the adapter is kept
    assert again.code == 0 and again.out == ("pulled tiny (base, tiny, random weights) and tiny-sd (sd); tiny-canny "
                                             "already there\n")
    assert store.get("tiny-canny") == adapter and adapter.made_for["digest"] == store.get("tiny").weights_digest
    assert "MISSING" not in cli("list").out


def _pairs(folder):
    from pairs import make_pairs

    return make_pairs(folder, n=2, size=64)


def test_rm_of_a_fit_result_removes_its_run_folder(tiny_store, tmp_path):
    store = tiny_store
    data = _pairs(tmp_path / "data")
    settings = ["--base", "tiny", "--steps", "2", "--rank", "4", "--resolution", "64", "--save-every", "0",
                "--workers", "1", "--device", "cpu"]
    fitted = cli("fit", str(data), "--name", "circles", *settings, "--json")
    assert fitted.code == 0, fitted.err
    run = store.run_folder("circles")
    summary = json.loads(fitted.out)  # --json: one document, nothing else on stdout
    assert (summary["name"], summary["base"], summary["steps"], summary["pairs"], summary["run_dir"]) == (
        "circles", "tiny", 2, 2, str(run)) and summary["final_loss"] > 0
    assert run.is_dir() and store.run_of(store.get("circles")) == run
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    assert cli("fit", str(data), "--name", "kept", "--run-dir", str(tmp_path / "mine"), *settings).code == 0

    code, said = _at_a_terminal(["rm", "circles", "kept"], {"CTRLORA_HOME": str(store.root)}, "y")
    assert code == 0, said
    assert f"run folder {run} ({_human(size)}) goes too" in said
    assert f"removed run folder {run} ({_human(size)})" in said
    assert f"kept run folder {tmp_path / 'mine'} (outside the store)" in said
    assert not run.exists() and (tmp_path / "mine").is_dir() and not store.exists("circles")


def test_a_train_base_run_goes_with_the_last_entry_made_in_it(tiny_store, tmp_path):
    """The entries train-base writes (its call of Store.add), over a run folder in the store."""
    store = tiny_store
    run = store.run_folder("mybase", "train-base")
    (run / "result").mkdir(parents=True)
    (run / "result" / "checkpoint.pt").write_bytes(b"x" * 5000)
    source = {"type": "train-base", "run": str(run)}
    base = store.get("tiny")
    store.add("mybase", "base", {r.path: store.folder("tiny") / r.path for r in base.files}, arch="tiny",
              sd="tiny-sd", source=source)
    store.add("mybase-canny", "adapter", {"adapter.safetensors": store.file("tiny-canny", "adapter.safetensors")},
              arch="tiny", source=source, extra={"base": "mybase"})
    only_base = cli("rm", "-y", "mybase")
    assert only_base.code == 0 and "run folder" not in only_base.out and run.is_dir()  # mybase-canny was made in it
    last = cli("rm", "-y", "mybase-canny")
    assert last.code == 0 and f"removed run folder {os.path.realpath(run)} ({_human(5000)})" in last.out
    assert not run.exists() and store.runs.is_dir()


# -- 3. views wherever the store is ---------------------------------------------------------------

@pytest.mark.slow
def test_views_work_with_a_relative_home_after_mv_and_cp(tiny_store_template, tmp_path, monkeypatch, one_thread):
    work = tmp_path / "work"
    shutil.copytree(tiny_store_template, work / "home", ignore=shutil.ignore_patterns("views", ".lock"))
    relative = {"CTRLORA_HOME": "home"}
    adapter = work / "mine.safetensors"
    shutil.copyfile(Store(work / "home").folder("tiny-canny") / "adapter.safetensors", adapter)
    shutil.rmtree(work / "home" / "views")
    # --base reads the base's config through its view: from a relative CTRLORA_HOME, in its own folder
    pulled = run_cli("pull", "mine.safetensors", "--name", "mine", "--base", "tiny", env=relative, cwd=work)
    assert pulled.returncode == 0, pulled.stderr
    assert os.readlink(work / "home" / "views" / "tiny" / "controlnet" / "config.json").startswith("../../../blobs/")

    subprocess.run(["mv", str(work / "home"), str(tmp_path / "moved")], check=True)
    image = tmp_path / "edges.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 255, 255)).save(image)
    monkeypatch.setenv("CTRLORA_HOME", str(tmp_path / "moved"))  # gen in this process (pull was a real one)
    monkeypatch.chdir(tmp_path)
    gen = cli("gen", "--cond", f"mine={image}", "-p", "a red circle", "--steps", "1", "--width", "32",
              "--height", "32", "--seed", "1", "--device", "cpu", "--out", str(tmp_path / "out.png"))
    assert gen.code == 0, gen.err
    assert Image.open(tmp_path / "out.png").size == (32, 32)

    subprocess.run(["cp", "-r", str(tmp_path / "moved"), str(tmp_path / "copied")], check=True)
    subprocess.run(["rm", "-rf", str(tmp_path / "moved")], check=True)
    copied = Store(tmp_path / "copied")
    assert [m.name for m in copied.list()] == ["mine", "tiny", "tiny-canny", "tiny-sd"]
    assert [copied.view_problems(m) for m in copied.list()] == [[], [], ["no view"], []]  # tiny-canny: never used
    from engine.models.storage import load_base

    assert load_base(copied.folder("tiny") / "controlnet").config.block_out_channels == [32, 64, 128, 128]


def test_verify_rebuilds_views_an_older_version_made_with_absolute_links(tiny_store, tmp_path):
    store = tiny_store
    view = store.folder("tiny")
    for record in store.get("tiny").files:  # as views were made before: links to the absolute blob path
        link = view / record.path
        link.unlink()
        link.symlink_to(store.blob_path(record.digest))
    moved = tmp_path / "moved"
    subprocess.run(["mv", str(store.root), str(moved)], check=True)
    store = Store(moved)
    assert store.view_problems(store.get("tiny")) == [
        "controlnet/config.json: does not lead to its blob",
        "controlnet/diffusion_pytorch_model.safetensors: does not lead to its blob"]
    result = run_cli("verify", env={"CTRLORA_HOME": str(moved)})
    assert result.returncode == 0, result.stderr
    assert "ok       tiny: view rebuilt (controlnet/config.json: does not lead to its blob and 1 more)" in result.stdout
    assert "3 verified, all intact" in result.stdout
    assert store.view_problems(store.get("tiny")) == []


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_views_without_symbolic_links(tiny_store_template, tmp_path, mode):
    """Where symbolic links cannot be made, views are hard links, else copies; both move with the store."""
    shutil.copytree(tiny_store_template, tmp_path / "a", ignore=shutil.ignore_patterns("views", ".lock"))
    store = Store(tmp_path / "a", links=(mode,))
    view = store.folder("tiny-sd")
    files = [view / r.path for r in store.get("tiny-sd").files]
    assert not any(f.is_symlink() for f in files)
    blob = store.blob_path(store.get("tiny-sd").files[0].digest)
    assert os.path.samefile(files[0], blob) == (mode == "hardlink")
    os.rename(tmp_path / "a", tmp_path / "b")
    moved = Store(tmp_path / "b", links=(mode,))
    assert moved.view_problems(moved.get("tiny-sd")) == []
    from engine.models.storage import load_sd

    assert load_sd(moved.folder("tiny-sd")).unet.config.block_out_channels == [32, 64, 128, 128]


# -- 5. exit codes ----------------------------------------------------------------------------------

def test_one_exit_code_for_a_name_not_in_the_store(tiny_store, ref_tiny):
    adapter = str(ref_tiny / "adapter_cond1.safetensors")
    for args in (("show", "tiyn"), ("rm", "-y", "tiyn"), ("verify", "tiyn"), ("pull", adapter, "--base", "tiyn")):
        result = cli(*args)
        assert result.code == 2, args
        assert "error: 'tiyn' is not in the store; did you mean 'tiny'? (see: ctrlora list)" in result.err, args
    assert cli("show", "nothing-like-it").err.startswith("error: 'nothing-like-it' is not in the store (")
    typo = cli("pull", "cany")
    assert typo.code == 2 and "unknown model 'cany': did you mean 'canny'?" in typo.err
    assert "did you mean 'tiny'?" in cli("pull", "tinyy").err


def test_a_damaged_entry_is_a_failure_at_run_time(tiny_store, ref_tiny):
    store = tiny_store
    config = next(r for r in store.get("tiny").files if r.path == "controlnet/config.json")
    store.blob_path(config.digest).unlink()
    with pytest.raises(CtrloraError) as info:
        store.folder("tiny")
    assert info.value.exit_code == 1 and not isinstance(info.value, UsageError)
    result = cli("pull", str(ref_tiny / "adapter_cond1.safetensors"), "--name", "c", "--base", "tiny")
    assert result.code == 1 and result.err == (
        f"error: 'tiny' is damaged (files missing from {store.blobs}); see: ctrlora verify tiny; repair with: "
        f"ctrlora pull tiny --force\n")
    assert "  ctrlora pull tiny --force" in cli("verify").out
    assert cli("pull", "tiny", "--force").code == 0 and cli("verify").code == 0


def test_repair_hints_name_a_command_that_works(tiny_store):
    from ctrlora_cli.store.sources import repair_command

    assert cli("pull", "tiny", "--name", "toy").code == 0
    assert cli("pull", "demo").code == 0
    hints = {m.name: repair_command(m) for m in tiny_store.list()}
    assert hints["tiny-canny"] == hints["tiny-sd"] == hints["tiny"] == "ctrlora pull tiny --force"
    assert hints["toy-canny"] == hints["toy-sd"] == "ctrlora pull tiny --name toy --force"
    assert hints["demo-seg"] == hints["demo-sd"] == hints["demo"] == "ctrlora pull demo --force"
    manifest = tiny_store.get("toy-canny")  # pulled before the group's name was recorded
    del manifest.source["name"]
    assert repair_command(manifest) == "ctrlora pull tiny --name toy --force"


# -- 6. the base an adapter was made for ----------------------------------------------------------------

def _other_base(store: Store, name: str, like: str = "tiny") -> None:
    """A base of the same architecture as ``like``, with other weights."""
    from safetensors.torch import load_file, save_file

    folder = store.folder(like) / "controlnet"
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    key = next(iter(state))
    state[key] = state[key] + 1
    tmp = store.scratch() / f"{name}.safetensors"
    save_file(state, str(tmp))
    store.add(name, "base", {"controlnet/config.json": folder / "config.json",
                             "controlnet/diffusion_pytorch_model.safetensors": tmp}, arch="tiny", sd="tiny-sd")
    tmp.unlink()


def test_the_base_for_an_adapter(tiny_store):
    store = tiny_store
    tiny = store.get("tiny")
    assert resolve.made_for(store, "tiny-canny") == {"name": "tiny", "digest": tiny.weights_digest}
    assert resolve.made_for(store, "x.safetensors") is None
    _other_base(store, "other")
    with pytest.raises(UsageError, match="several bases"):
        resolve.default_base(store)
    assert resolve.base_for(store, ["tiny-canny"]) == "tiny"  # its own, though the store holds two
    assert resolve.base_for(store, ["tiny-canny", "x.safetensors"]) == "tiny"
    assert resolve.base_for(store, ["tiny-canny"], "other") == "other"
    assert resolve.base_warning(store, "tiny-canny", tiny) is None
    assert resolve.base_warning(store, "tiny-canny", store.get("other")) == (
        "adapter 'tiny-canny' was made for base 'tiny', not 'other' (same architecture, tiny): it runs, but may "
        "follow its condition less well; pass --base tiny to use its own")

    # nothing recorded: today's default
    store.add("plain", "adapter", {"adapter.safetensors": store.file("tiny-canny", "adapter.safetensors")},
              arch="tiny")
    assert resolve.base_warning(store, "plain", store.get("other")) is None
    with pytest.raises(UsageError, match="several bases"):
        resolve.base_for(store, ["plain"])
    # two adapters that disagree: today's default
    store.add("for-other", "adapter", {"adapter.safetensors": store.file("tiny-canny", "adapter.safetensors")},
              arch="tiny", extra={"base": "other", "base_digest": store.get("other").weights_digest})
    with pytest.raises(UsageError, match="several bases"):
        resolve.base_for(store, ["tiny-canny", "for-other"])

    # the same weights under another name are found by digest; a replaced base is named as such
    store.add("renamed", "base", {r.path: store.folder("tiny") / r.path for r in tiny.files}, arch="tiny", sd="tiny-sd")
    store.remove(["tiny"])
    assert resolve.base_for(store, ["tiny-canny"]) == "renamed"
    assert resolve.base_warning(store, "tiny-canny", store.get("renamed")) is None
    store.remove(["renamed"])
    _other_base(store, "tiny", like="other")
    assert resolve.base_warning(store, "tiny-canny", store.get("tiny")) == (
        "adapter 'tiny-canny' was made for base 'tiny' as it was before it was replaced; it runs, but may follow "
        "its condition less well")
    store.remove(["tiny"])
    assert resolve.base_for(store, ["tiny-canny"]) == "other"  # its base is gone: the only one
    assert "which is not in the store" in resolve.base_warning(store, "tiny-canny", store.get("other"))


def test_claim_is_the_rule_for_every_writer(tiny_store):
    store = tiny_store
    assert store.claim("fresh") is None
    with pytest.raises(UsageError, match=r"^'tiny' is already in the store \(base from random tiny\); use another "
                                         r"--out, or --force to replace it$"):
        store.claim("tiny", flag="--out")
    assert store.claim("tiny", force=True) == store.get("tiny")
    with pytest.raises(UsageError, match="invalid name"):
        store.claim("Bad Name")
