"""The house plan, checked: which room of the engine may import which, no import circles, and an
engine that never reaches for the face (ctrlora_cli, Typer, Rich)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A room may import itself and the rooms it lists (the engine's base modules are "base").
ALLOWED = {
    "base": {"base"},
    "models": {"base", "models"},
    "formats": {"base", "models", "formats"},
    "generation": {"base", "models", "formats", "generation"},
    "training": {"base", "models", "formats", "generation", "training"},
    "demo": {"base", "models", "formats", "generation", "training", "demo"},
    # networks that make condition images from photos; they share the demo's parameter declarations
    "annotators": {"base", "models", "formats", "generation", "training", "demo", "annotators"},
}
FACE = ("ctrlora_cli", "typer", "rich")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # "from engine.models import adapters" imports the module engine.models.adapters
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "engine" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ALLOWED else "base"


def _graph(package: str) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in (REPO / package).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_engine_rooms_import_only_downwards():
    graph = _graph("engine")
    wrong = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
             if _room(module) and _room(target) not in ALLOWED[_room(module)]]
    assert not wrong, "imports against the house plan: " + ", ".join(sorted(wrong))


def test_engine_never_imports_the_face():
    wrong = [f"{_module_name(p)} -> {m}" for p in (REPO / "engine").rglob("*.py") for m in _imports(p)
             if m.split(".")[0] in FACE]
    assert not wrong, ", ".join(sorted(wrong))


# The store is a library of its own: it may import the engine, itself and the one reader of the
# environment, never the command modules (the face) nor Typer or Rich.
STORE_MAY_IMPORT = ("ctrlora_cli.store", "ctrlora_cli.envconfig")


def _store_import_allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top in ("typer", "rich"):
        return False
    if top != "ctrlora_cli":
        return True  # the engine, the standard library, third parties
    # "from ctrlora_cli import envconfig" also names the package itself, whose __init__ any import runs
    return module == "ctrlora_cli" or any(module == m or module.startswith(m + ".") for m in STORE_MAY_IMPORT)


def test_store_imports_only_engine_and_itself():
    files = [*(REPO / "ctrlora_cli" / "store").rglob("*.py"), REPO / "ctrlora_cli" / "envconfig.py"]
    wrong = [f"{_module_name(p)} -> {m}" for p in files for m in _imports(p) if not _store_import_allowed(m)]
    assert not wrong, ", ".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Circles in the graph (a package's own ``__init__`` importing its children does not count)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if node.startswith(nxt + "."):  # a module importing its own package's __init__
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_circles():
    for package in ("engine", "ctrlora_cli"):
        cycles = _cycles(_graph(package))
        assert not cycles, f"{package}: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_circle_and_a_wrong_arrow():
    """The checks above can fail: a made-up circle is found, and models -> training is refused."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert "training" not in ALLOWED[_room("engine.models.adapters")]
    assert _room("engine.files") == "base" and _room("engine.training.fit") == "training"
    assert not _store_import_allowed("ctrlora_cli.console") and not _store_import_allowed("rich.markup")
    assert _store_import_allowed("ctrlora_cli.store.hub") and _store_import_allowed("engine.files")
