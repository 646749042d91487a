"""The conventions every command keeps (ctrlora_cli/conventions.py, options.py): Examples in its
help that parse, flags without a value placeholder, one meaning per short flag, shell completion
of store names, and --json that prints one JSON document and nothing else."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import typer.main
from rich.text import Text

from conftest import run_cli
from ctrlora_cli.app import app
from ctrlora_cli.conventions import OLD_SHORT_FLAGS, _renamed


def _commands():
    """(path, click command, its context) for the root, every group and every command."""
    root = typer.main.get_command(app)

    def walk(command, ctx, path):
        yield path, command, ctx
        for name in getattr(command, "list_commands", lambda ctx: [])(ctx):
            sub = command.get_command(ctx, name)
            yield from walk(sub, sub.make_context(name, [], parent=ctx, resilient_parsing=True), [*path, name])

    return list(walk(root, root.make_context("ctrlora", [], resilient_parsing=True), []))


COMMANDS = _commands()


def _help(command, ctx) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # Typer's Rich help prints rather than returns
        text = command.get_help(ctx)
    return text + out.getvalue()


def _parse(args: list[str]):
    """``ctrlora ARGS`` parsed and converted as the command would be, down to the leaf; not run."""
    command, ctx = COMMANDS[0][1], None
    name = "ctrlora"
    while True:
        ctx = command.make_context(name, args, parent=ctx)
        if not hasattr(command, "resolve_command"):
            return command
        # A group keeps its command's name apart from the rest (click's protected args).
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        name, command, args = command.resolve_command(ctx, rest)


def test_every_help_has_runnable_examples_and_no_bool_placeholder():
    assert {" ".join(path) for path, _, _ in COMMANDS} >= {"", "pull", "list", "rm", "verify", "gen", "fit",
                                                           "train-base", "world", "world make"}
    for path, command, ctx in COMMANDS:
        shown = _help(command, ctx)
        assert "Examples:" in shown, path
        assert "<bool>" not in shown, path
        lines = [Text.from_markup(line).plain for line in command.epilog.split("Examples:\n")[1].split("\n\n")[0]
                 .splitlines()]
        assert lines, path
        for line in lines:
            args = shlex.split(line)
            assert args[0] == "ctrlora" and args[1:1 + len(path)] == path, line
            if "--help" not in args and "--install-completion" not in args:
                leaf = _parse(args[1:])  # unknown flags, bad numbers or choices raise here
                assert leaf.name == command.name or hasattr(command, "list_commands"), line


def test_the_commands_in_readme_and_docs_parse():
    """Every ``ctrlora ...`` line of a code block in README.md and docs/ names real commands and
    options with valid values (lines with placeholders, ``...`` or ``[...]``, are left out)."""
    repo = Path(__file__).resolve().parents[1]
    parsed = []
    for page in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                for command in line.split("  #")[0].split("&&"):
                    command = command.strip()
                    if command.startswith("ctrlora ") and not any(c in command for c in ("...", "[", "<")):
                        _parse(shlex.split(command)[1:])  # raises on an unknown option or a bad value
                        parsed.append(command)
    assert len(parsed) >= 40


def test_each_short_flag_means_one_long_flag():
    meanings: dict[str, set[str]] = {}
    for path, command, ctx in COMMANDS:
        for param in (p for p in command.get_params(ctx) if p.param_type_name == "option"):
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if not o.startswith("--")):
                assert longs, (path, short)  # a short flag always has its long spelling
                meanings.setdefault(short, set()).add(longs[0])
                assert (" ".join(path), short) not in OLD_SHORT_FLAGS, (path, short)
    assert {s: m for s, m in meanings.items() if len(m) > 1} == {}
    assert meanings["-n"] == {"--count"} and meanings["-p"] == {"--prompt"} and meanings["-c"] == {"--cond"}


def test_old_short_flags_still_read_where_safe():
    assert _renamed("world make", ["d", "-c", "seg", "-n", "2"]) == ["d", "--condition", "seg", "-n", "2"]
    assert _renamed("world make", ["d", "-cseg"]) == ["d", "--condition", "seg"]
    assert _renamed("prep", ["canny", "x.png", "-p", "low=5", "--", "-p"]) == ["canny", "x.png", "--param", "low=5",
                                                                               "--", "-p"]
    assert _renamed("gen", ["-p", "a cat"]) == ["-p", "a cat"]
    refused = run_cli("gen", "-p", "a cat", "-n", "blurry")  # once --negative, now a count elsewhere: refused
    assert refused.returncode == 2 and refused.stdout == ""
    assert "-n no longer means --negative" in refused.stderr and "write --negative" in refused.stderr


def _complete(words: str, env: dict | None = None) -> list[str]:
    result = run_cli(env={"_CTRLORA_COMPLETE": "complete_bash", "COMP_WORDS": words,
                          "COMP_CWORD": str(len(words.split(" ")) - 1), **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_completion_offers_store_names_by_kind_and_condition_kinds(tiny_store):
    # A real subprocess with the variable the installed script sets (what TAB runs).
    assert _complete("ctrlora show tiny-") == ["tiny-canny", "tiny-sd"]
    # The callbacks themselves, in-process: each reads only its kind.
    from ctrlora_cli import completion

    assert completion.base_names("") == ["tiny"] and completion.sd_names("t") == ["tiny-sd"]
    assert completion.cond_values("ti") == ["tiny-canny="] and completion.cond_values("tiny-canny=a") == []
    assert completion.init_names("") == ["tiny", "tiny-sd"]
    assert completion.extractor_kinds("edge=gr") == ["edge=grayscale"]
    assert completion.world_conditions("s") == ["seg", "sketch"]
    assert completion.any_name("") == ["tiny", "tiny-canny", "tiny-sd"]
    (tiny_store.manifests / "torn.json").write_text("{")  # a store that cannot be read completes nothing, quietly
    assert completion.any_name("") == [] and _complete("ctrlora rm t") == []
    help_text = run_cli("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text


def _document(result) -> object:
    """stdout is exactly one JSON document (json.loads refuses anything around it)."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_json_is_one_document_on_every_reporting_command(tiny_store, tmp_path):
    """(fit --json: in test_store_safety's fit, to spend no second training here.)"""
    from pairs import make_pairs

    data = make_pairs(tmp_path / "pairs", n=1, size=64)
    pulled = _document(run_cli("pull", "tiny", "--json"))
    assert pulled["pulled"] == [] and "up to date" in pulled["messages"][0]

    listed = {e["name"]: e for e in _document(run_cli("list", "--json"))}
    base_digest = tiny_store.get("tiny").weights_digest
    assert listed["tiny-canny"]["made_for"] == {"name": "tiny", "digest": base_digest, "in_store": "tiny"}
    assert listed["tiny"]["made_for"] is None
    table = run_cli("list").stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "KIND", "CONDITION", "BASE"]
    assert next(line for line in table if line.startswith("tiny-canny")).split()[3] == "tiny"

    verified = _document(run_cli("verify", "tiny", "tiny-canny", "--json"))
    assert verified["verified"] == 2 and verified["damaged"] == [] and all(e["ok"] for e in verified["entries"])

    command = _document(run_cli("train-base", str(data), "--out", "big", "--init", "tiny", "--nodes", "2",
                                "--rdzv-endpoint", "node0:29500", "--print-command", "--json"))
    assert command["nodes"] == 2 and len(command["commands"]) == 2 and "torch" in command["commands"][0]

    unconfirmed = run_cli("rm", "tiny", "--json")  # --json never asks: -y or nothing
    assert unconfirmed.returncode == 2 and unconfirmed.stdout == "" and tiny_store.exists("tiny")
    removed = _document(run_cli("rm", "tiny", "-y", "--json"))
    assert removed["removed"] == ["tiny"] and removed["freed_bytes"] > 0
    assert removed["dangling"] == [{"name": "tiny-canny", "link": "base", "target": "tiny"}]

    blob = next(tiny_store.blob_path(f.digest) for f in tiny_store.get("tiny-canny").files)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"damaged")
    damaged = run_cli("verify", "tiny-canny", "--json")
    assert damaged.returncode == 1
    report = json.loads(damaged.stdout)
    assert report["damaged"] == ["tiny-canny"] and "ctrlora pull" in report["entries"][0]["repair"]
