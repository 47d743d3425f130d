"""The house rules, read from the source with `ast`: imports flow one way (no cycle between modules
or between folders), the faces' shared library is session.py (pipelines never import the CLI), and
modules and functions stay small enough to read."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pufferfish_jax", "pipelines")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module prefix of a dotted import name."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, type-checking blocks too)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [_resolve(f"{node.module}.{alias.name}", modules) for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [_resolve(alias.name, modules) for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t and t != name}
    return graph


def folder_of(module: str, modules: dict[str, Path]) -> str:
    """A module's folder (its package), except modules at a package's top, which stand alone:
    the root modules (config, session, cli, ...) are the layers between the folders."""
    path = modules[module]
    depth = len(path.relative_to(ROOT).parts)
    if path.name == "__init__.py" or depth <= 2:
        return module
    return module.rsplit(".", 1)[0]


def folder_graph() -> dict[str, set[str]]:
    modules, graph = _modules(), import_graph()
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        a = folder_of(module, modules)
        for target in targets:
            b = folder_of(target, modules)
            if a != b and not b.startswith(a + ".") and not a.startswith(b + "."):
                folders.setdefault(a, set()).add(b)
            folders.setdefault(b, set())
    return folders


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node: str) -> list[str] | None:
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = "black"
        return None

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert len(graph) > 30 and graph["pufferfish_jax.session"]  # the graph is real, not empty
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycle_between_folders():
    graph = folder_graph()
    assert "pufferfish_jax.train" in graph and "pufferfish_jax.budget" in graph["pufferfish_jax.loop"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_train_imports_no_planner_and_pipelines_no_cli():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("pufferfish_jax.train"):
            assert not any(t.startswith("pufferfish_jax.budget") for t in targets), module
        if module.startswith("pipelines"):
            assert "pufferfish_jax.cli" not in targets, module


def test_the_commands_load_without_the_export_formats_library():
    """gguf is `export`'s alone: an image without it (the GPU machine's had none) must still train."""
    code = ("import sys, pufferfish_jax.cli, pipelines.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gguf'))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in _modules().items():
        source = path.read_text()
        if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (length := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
