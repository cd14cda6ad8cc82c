"""The package's import structure: no cycle, counting imports inside functions; the toolkit's layers; no private
names across modules; and modules import alone.

The graph is read from the source (every module of src/cdgrad, the toolkit included) with `ast`: an edge for each
import at module level and, in the function-level graph, for each import inside a function body too (`if
TYPE_CHECKING:` blocks excluded in both). With no cycle in the module-level graph, no import order can meet a
partially initialised module; with none in the function-level graph, the layers are real and no import inside a
function hides a circle. A few modules (the bottom of each layer) are also imported alone, each in a fresh
interpreter, in parallel.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cdgrad

PACKAGE_DIR = Path(cdgrad.__file__).resolve().parent


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ("cdgrad", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _module_level(body: list[ast.stmt]):
    """Statements executed when the module is imported (descending into if/try/with, not into defs)."""
    for node in body:
        if isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                yield from _module_level(node.orelse)
                continue
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)
        else:
            yield node


def _everywhere(body: list[ast.stmt]):
    """Every statement of the module, inside function and class bodies too (`if TYPE_CHECKING:` blocks excluded)."""
    for node in _module_level(body):
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _everywhere(node.body)
        elif isinstance(node, (ast.For, ast.While, ast.If)):
            yield from _everywhere(node.body)
            yield from _everywhere(node.orelse)


def _imports(name: str, path: Path, known: dict[str, Path], statements):
    """(target module, imported names) for each import statement among `statements` that names a package module."""
    is_package = path.name == "__init__.py"
    for node in statements:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    yield a.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = tuple(a.name for a in node.names)
            if prefix in known:
                yield prefix, tuple(n for n in names if f"{prefix}.{n}" not in known)
            for n in names:
                if f"{prefix}.{n}" in known:
                    yield f"{prefix}.{n}", ()


def import_graph(functions: bool = False) -> dict[str, set[str]]:
    """module -> the package modules it imports at module level (`functions`: anywhere, function bodies too)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        body = ast.parse(path.read_text(), str(path)).body
        statements = _everywhere(body) if functions else _module_level(body)
        # an ancestor package is initialised before its modules: no edge back to it
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        targets = {t for t, _ in _imports(name, path, known, statements)}
        graph[name] = {t for t in targets if t != name and t not in ancestors}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_reader_sees_the_layers():
    """The reader is not vacuous: it finds the edges the layering promises."""
    graph = import_graph()
    assert len(graph) >= 20 and "cdgrad.experiments.cli" in graph
    assert "cdgrad._kernels" in graph["cdgrad.distributed"]
    assert "cdgrad.distributed" in graph["cdgrad.functional"]
    assert "cdgrad.functional" in graph["cdgrad.transforms"]
    assert {"cdgrad.sgs.nmi", "cdgrad.sgs.dependence", "cdgrad.sgs.transform"} <= graph["cdgrad.sgs"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_counting_imports_inside_functions():
    graph = import_graph(functions=True)
    assert "cdgrad.experiments.train" in graph["cdgrad.experiments.runner"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (imports inside functions counted): " + " -> ".join(cycle or [])


# The toolkit's layers, bottom up: a module imports only modules of its own layer or below (functions included).
TOOLKIT_LAYERS = [
    ("registry", "launch", "progress"),
    ("data", "models", "unet", "spade", "metrics", "fid", "method_params", "methods", "tasks"),
    ("config", "config_cli", "checks"),
    ("setup", "checkpoint", "store", "store_errors", "records", "locks", "environment", "tracking"),
    ("train",),
    ("runner", "presets", "worker", "executors", "status", "sweeps"),
    ("report", "plots", "analyze", "cli"),
]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["cdgrad", "experiments"] or len(parts) < 3:
        return None
    return next((i for i, layer in enumerate(TOOLKIT_LAYERS) if parts[2] in layer), None)


def test_toolkit_layers_import_only_downwards():
    graph = import_graph(functions=True)
    toolkit = [m for m in graph if m.startswith("cdgrad.experiments.")]
    unplaced = [m for m in toolkit if _layer(m) is None]
    assert not unplaced, f"modules without a layer in TOOLKIT_LAYERS: {unplaced}"
    upward = [
        (m, e)
        for m in toolkit
        for e in graph[m]
        if _layer(e) is not None and _layer(e) > _layer(m)  # type: ignore
    ]
    assert not upward, "imports from a lower layer into a higher one: " + ", ".join(f"{m} -> {e}" for m, e in upward)


def test_no_module_imports_another_modules_private_names():
    known = modules()
    found = []
    for name, path in known.items():
        body = ast.parse(path.read_text(), str(path)).body
        for target, names in _imports(name, path, known, _everywhere(body)):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            found += [f"{name}: from {target} import {n}" for n in private if target != name]
    assert not found, "private names imported across modules: " + "; ".join(found)


def test_kernel_layer_depends_on_nothing_above_it():
    """_kernels and distributed sit below functional; nothing in the library core imports the toolkit."""
    graph = import_graph()
    assert graph["cdgrad._kernels"] <= {"cdgrad._native", "cdgrad.validation"}
    assert graph["cdgrad.sharded"] <= {"cdgrad._kernels", "cdgrad.validation"}
    assert graph["cdgrad.distributed"] <= {"cdgrad._kernels", "cdgrad.sharded", "cdgrad.validation"}
    for name, edges in graph.items():
        if not name.startswith("cdgrad.experiments"):
            assert not {e for e in edges if e.startswith("cdgrad.experiments")}, name


ALONE = [
    "cdgrad.distributed",
    "cdgrad.sharded",
    "cdgrad.functional",
    "cdgrad.transforms",
    "cdgrad.sgs.transform",
    "cdgrad.experiments.launch",
]


@pytest.mark.parametrize("group", [ALONE])
def test_modules_import_alone_in_fresh_interpreters(group):
    env = {**os.environ, "CDGRAD_NATIVE": "0"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import {name}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name in group
    }
    failures = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failures[name] = err.decode()[-2000:]
    assert not failures, failures


def test_the_frameworks_are_imported_only_by_their_adapters():
    """`import cdgrad` (and `cdgrad.integrations`) loads no framework: they are optional extras."""
    code = (
        "import sys, cdgrad, cdgrad.integrations\n"
        "names = ('lightning', 'transformers', 'accelerate', 'pytorch_optimizer')\n"
        "heavy = sorted(m for m in names if m in sys.modules)\n"
        "sys.exit(f'imported: {heavy}' if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
