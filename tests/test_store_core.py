"""The store's core: blobs, manifests written last, views, removal and garbage collection."""

import json

import pytest

from ctrlora_cli.store.names import validate_name
from ctrlora_cli.store.store import Store
from engine.errors import UsageError
from engine.models.storage import load_base, load_sd


def test_tiny_entries_load(tiny_store):
    base = tiny_store.get("tiny")
    assert base.kind == "base" and base.arch == "tiny" and base.sd == "tiny-sd"
    assert "random-weights" in base.labels
    controlnet = load_base(tiny_store.folder("tiny") / "controlnet")
    sd = load_sd(tiny_store.folder("tiny-sd"))
    assert controlnet.config.block_out_channels == sd.unet.config.block_out_channels


def test_blobs_are_content_addressed_and_shared(tmp_path):
    store = Store(tmp_path / "s")
    (tmp_path / "a.bin").write_bytes(b"same bytes")
    first = store.add("one", "adapter", {"adapter.safetensors": tmp_path / "a.bin"})
    second = store.add("two", "adapter", {"adapter.safetensors": tmp_path / "a.bin"})
    assert first.files[0].digest == second.files[0].digest
    assert len(list(store.blobs.iterdir())) == 1
    assert store.remove(["one"]) == 0  # still referenced by "two"
    assert store.remove(["two"]) == len(b"same bytes")
    assert list(store.blobs.iterdir()) == []


def test_entry_is_invisible_until_its_manifest_is_written(tmp_path):
    store = Store(tmp_path / "s")
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    store.put_file(tmp_path / "a.bin")  # a pull that died before its manifest
    assert store.list() == []
    with store.lock():
        assert store.gc() == 10


def test_manifest_round_trip_and_view(tmp_path):
    store = Store(tmp_path / "s")
    (tmp_path / "c.json").write_text("{}")
    store.add("m", "base", {"controlnet/config.json": tmp_path / "c.json"}, arch="tiny", extra={"k": 1})
    manifest = json.loads((store.manifests / "m.json").read_text())
    assert manifest["files"][0]["path"] == "controlnet/config.json"
    assert (store.folder("m") / "controlnet" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("bad", ["", "UPPER", "a/b", "..", "a..b", "x" * 65, "sp ace"])
def test_bad_names(bad):
    with pytest.raises(UsageError):
        validate_name(bad)
