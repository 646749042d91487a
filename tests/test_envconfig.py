"""The environment, read in one place: typed accessors read at call time, one true/false parser,
``ctrlora env``, and no other module of the package reading os.environ."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from ctrlora_cli import envconfig
from engine.errors import UsageError
from hub_fixtures import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def clean_env(monkeypatch):
    for variable in envconfig.VARIABLES:
        monkeypatch.delenv(variable.name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("value, meant", [("1", True), ("on", True), (" YES ", True), ("True", True),
                                          ("0", False), ("no", False), ("", False), (None, False),
                                          ("2", False)])
def test_one_reading_of_true_and_false(value, meant):
    assert envconfig.flag(value) is meant


def test_accessors_read_the_environment_at_call_time(clean_env, tmp_path):
    from platformdirs import user_data_dir

    assert envconfig.home() == Path(user_data_dir("ctrlora"))
    clean_env.setenv("CTRLORA_HOME", str(tmp_path / "home"))
    assert envconfig.home() == tmp_path / "home"
    clean_env.setenv("CTRLORA_HOME", "")  # empty counts as unset
    assert envconfig.home() == Path(user_data_dir("ctrlora"))

    assert not envconfig.offline()
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    assert envconfig.offline()
    clean_env.delenv("HF_HUB_OFFLINE")
    clean_env.setenv("CTRLORA_OFFLINE", "yes")
    assert envconfig.offline()

    assert envconfig.download_retries() == envconfig.DEFAULT_RETRIES == 5
    clean_env.setenv("CTRLORA_DOWNLOAD_RETRIES", "-3")
    assert envconfig.download_retries() == 0
    clean_env.setenv("CTRLORA_DOWNLOAD_RETRIES", "many")
    with pytest.raises(UsageError, match="CTRLORA_DOWNLOAD_RETRIES must be a whole number"):
        envconfig.download_retries()

    assert envconfig.hf_endpoint() == "https://huggingface.co"
    clean_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert envconfig.hf_endpoint() == "http://127.0.0.1:9"

    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    assert envconfig.hf_hub_cache() == tmp_path / "hf" / "hub"
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert envconfig.hf_hub_cache() == tmp_path / "cache"

    assert envconfig.catalog_file() is None and envconfig.demo_dir() is None
    clean_env.setenv("CTRLORA_CATALOG", str(tmp_path / "c.json"))
    clean_env.setenv("CTRLORA_DEMO_DIR", str(tmp_path / "demo"))
    assert envconfig.catalog_file() == tmp_path / "c.json" and envconfig.demo_dir() == tmp_path / "demo"


def test_quiet_libraries_keeps_what_the_user_set(clean_env):
    clean_env.setenv("TRANSFORMERS_VERBOSITY", "info")
    clean_env.delenv("DIFFUSERS_VERBOSITY", raising=False)
    clean_env.setenv("CTRLORA_OFFLINE", "on")
    envconfig.quiet_libraries()
    import os

    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and os.environ["DIFFUSERS_VERBOSITY"] == "error"
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # CTRLORA_OFFLINE reaches every library


def test_ctrlora_env_prints_every_variable(clean_env):
    clean_env.setenv("CTRLORA_DOWNLOAD_RETRIES", "2")
    clean_env.setenv("HF_TOKEN", "hf_secret_value")
    result = cli("env", "--json")
    assert result.code == 0, result.err
    shown = {v["name"]: v for v in json.loads(result.out)}
    assert list(shown) == [v.name for v in envconfig.VARIABLES]
    assert shown["CTRLORA_DOWNLOAD_RETRIES"]["value"] == "2" and shown["CTRLORA_DOWNLOAD_RETRIES"]["default"] == "5"
    assert shown["CTRLORA_HOME"]["value"] is None and shown["CTRLORA_HOME"]["help"] == "where the store lives"
    assert shown["HF_TOKEN"]["value"] == "(set)"  # a secret is never printed
    text = cli("env")
    assert text.code == 0 and "hf_secret_value" not in text.out
    assert all(v.name in text.out for v in envconfig.VARIABLES) and "VALUE" in text.out


def test_every_variable_is_documented_in_the_store_page():
    page = (REPO / "docs" / "store.md").read_text()
    assert [v.name for v in envconfig.VARIABLES if f"`{v.name}" not in page] == []


def test_no_other_module_reads_the_environment():
    """os.environ and os.getenv appear in envconfig alone (data/ holds scripts, not the package's code)."""
    package = REPO / "ctrlora_cli"
    readers = []
    for path in package.rglob("*.py"):
        if path.name == "envconfig.py" or "data" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert readers == []
