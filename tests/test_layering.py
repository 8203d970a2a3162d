"""The package's shape: imports point down the layers, only ops/ draws, no cycles, no oversized files."""
from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "kgsupervisor"

VOCABULARY = "vocabulary"  # the top-level modules: errors, states, config, logs, ...
ENTRY = "entry"  # the package's __init__, __main__ and compat: the Python APIs and the command
ENTRY_MODULES = ("__main__", "compat")  # top-level modules that are entry points, not vocabulary
# Bottom to top: each layer may import itself and the layers before it, except that kg needs
# only the vocabulary (the queue joins store and kg). ops/ and the entry points may import anything.
LAYERS = [VOCABULARY, "store", "kg", "queue", "worker", "pool", "ops"]
ALLOWED = {
    VOCABULARY: [VOCABULARY],
    "store": [VOCABULARY, "store"],
    "kg": [VOCABULARY, "kg"],
    "queue": [VOCABULARY, "store", "kg", "queue"],
    "worker": [VOCABULARY, "store", "kg", "queue", "worker"],
    "pool": [VOCABULARY, "store", "kg", "queue", "worker", "pool"],
}
UI_LIBRARIES = ("click", "rich")  # terminal drawing belongs to ops/ alone
WEB_LIBRARIES = ("flask", "jinja2", "waitress", "werkzeug")  # so does the web console
MAX_FILE_LINES = 400
MAX_CLASS_LINES = 300


@dataclass(frozen=True)
class Module:
    """One .py file of the package, parsed."""

    name: str  # dotted, e.g. "kgsupervisor.store.backend"
    path: Path
    tree: ast.Module
    lines: int


@dataclass(frozen=True)
class Import:
    """What one import statement reaches, seen from the importing module."""

    target: str  # a module of the package, or a third-party top-level name
    line: int
    name: str | None  # for `from target import name` when name is not a module itself


def load_modules(package_dir: Path) -> dict[str, Module]:
    """Every module of the package in package_dir, by dotted name."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        text = path.read_text(encoding="utf-8")
        modules[name] = Module(name, path, ast.parse(text, str(path)), len(text.splitlines()))
    return modules


def layer_of(name: str, modules: dict[str, Module]) -> str:
    """A module's layer: its subpackage, VOCABULARY at the top level, ENTRY for the entry points."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] in ENTRY_MODULES:
        return ENTRY
    if len(parts) > 2 or modules[name].path.name == "__init__.py":
        return parts[1]
    return VOCABULARY


def _own_module(dotted: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of `dotted` that is a module of the package; None for a third-party name."""
    parts = dotted.split(".")
    return next((".".join(parts[:end]) for end in range(len(parts), 0, -1)
                 if ".".join(parts[:end]) in modules), None)


def _from_base(node: ast.ImportFrom, module: Module) -> str:
    """The absolute module a `from X import ...` names, its leading dots resolved."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    if module.path.name != "__init__.py":
        package = package[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _reached(node: ast.Import | ast.ImportFrom, module: Module,
             modules: dict[str, Module]) -> Iterator[tuple[str, str | None]]:
    """(dotted name, attribute) for each name one import statement binds."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, None
        return
    base = _from_base(node, module)
    for alias in node.names:
        # `from pkg.ops import render` reaches the module pkg.ops.render, not only pkg.ops.
        submodule = f"{base}.{alias.name}"
        yield (submodule, None) if submodule in modules else (base, alias.name)


def imports_of(module: Module, modules: dict[str, Module]) -> list[Import]:
    """Every import in the module wherever it stands: top level, functions, `if TYPE_CHECKING:`."""
    nodes = [node for node in ast.walk(module.tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    found = [Import(_own_module(dotted, modules) or dotted.split(".")[0], node.lineno, name)
             for node in nodes for dotted, name in _reached(node, module, modules)]
    return sorted(found, key=lambda imp: imp.line)


def _defined_names(module: Module) -> set[str]:
    """The names a module binds itself at its top level (not those its __getattr__ imports)."""
    names = set()
    for node in module.tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names.update(target.id for target in targets if isinstance(target, ast.Name))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def _root_constant(imp: Import, modules: dict[str, Module]) -> bool:
    """An import of a name the package root binds itself, such as `from pkg import __version__`.

    It runs only the root's top-level code, which imports nothing; a name the root's lazy
    __getattr__ resolves instead (the Python API) reaches into the top layers.
    """
    return "." not in imp.target and imp.target in modules and imp.name in _defined_names(modules[imp.target])


def target_layer(imp: Import, modules: dict[str, Module]) -> str:
    """The layer an import of a module of the package reaches into."""
    return VOCABULARY if _root_constant(imp, modules) else layer_of(imp.target, modules)


def _where(module: Module, package_dir: Path, line: int | None = None) -> str:
    """The module's file (and line) as a message names it: relative to the package's parent."""
    where = module.path.relative_to(package_dir.parent).as_posix()
    return f"{where}:{line}" if line else where


def _import_problem(imp: Import, layer: str, modules: dict[str, Module]) -> str | None:
    """What is wrong with one import of a module in `layer`, or None."""
    for libraries in (UI_LIBRARIES, WEB_LIBRARIES):
        if imp.target in libraries and layer != "ops":
            return f"{layer} imports {imp.target}; only ops/ may import {' or '.join(libraries)}"
    if imp.target not in modules or layer not in ALLOWED:
        return None
    reached = target_layer(imp, modules)
    if reached in ALLOWED[layer]:
        return None
    shown = f"{imp.target}.{imp.name}" if reached == ENTRY and imp.name else imp.target
    return f"{layer} imports {shown} ({reached}); {layer} may import only {', '.join(ALLOWED[layer])}"


def layer_violations(modules: dict[str, Module], package_dir: Path) -> list[str]:
    """Imports that point up the layers, UI libraries outside ops/, modules in no layer."""
    problems = []
    for module in modules.values():
        layer = layer_of(module.name, modules)
        if layer not in LAYERS and layer != ENTRY:
            problems.append(f"{_where(module, package_dir)}: in no layer: {layer}/ is none of "
                            f"{', '.join(LAYERS[1:])}")
            continue
        for imp in imports_of(module, modules):
            problem = _import_problem(imp, layer, modules)
            if problem:
                problems.append(f"{_where(module, package_dir, imp.line)}: {problem}")
    return list(dict.fromkeys(problems))  # `from x import a, b`: one line, not one per name


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Which modules each module imports, wherever the import stands (TYPE_CHECKING, functions too)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module in modules.values():
        for imp in imports_of(module, modules):
            if imp.target in modules and imp.target != module.name and not _root_constant(imp, modules):
                graph[module.name].add(imp.target)
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of the graph, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            components.append(sorted(component))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def _one_cycle(start: str, graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A shortest way from start back to start inside its component (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & members):
                if successor == start:
                    return paths[node] + [start]
                if successor not in paths:
                    paths[successor] = paths[node] + [successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of {sorted(members)}")


def cycle_violations(modules: dict[str, Module]) -> list[str]:
    """Groups of modules that import one another, one line each with one of their cycles."""
    graph = import_graph(modules)
    return [f"import cycle among {', '.join(component)}: "
            f"{' -> '.join(_one_cycle(component[0], graph, set(component)))}"
            for component in _strongly_connected(graph) if len(component) > 1]


def size_violations(modules: dict[str, Module], package_dir: Path) -> list[str]:
    """Files over MAX_FILE_LINES lines and classes over MAX_CLASS_LINES lines."""
    problems = []
    for module in modules.values():
        if module.lines > MAX_FILE_LINES:
            problems.append(f"{_where(module, package_dir)}: {module.lines} lines, over {MAX_FILE_LINES}")
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                problems.append(f"{_where(module, package_dir, node.lineno)}: class {node.name} is "
                                f"{node.end_lineno - node.lineno + 1} lines, over {MAX_CLASS_LINES}")
    return problems


def architecture_violations(package_dir: Path) -> list[str]:
    """Every way the package in package_dir departs from the layering and size rules."""
    modules = load_modules(package_dir)
    return (layer_violations(modules, package_dir) + cycle_violations(modules)
            + size_violations(modules, package_dir))


def test_the_package_keeps_its_layers_and_sizes():
    problems = architecture_violations(PACKAGE_DIR)
    if problems:
        pytest.fail(f"{len(problems)} architecture violations:\n" + "\n".join(problems), pytrace=False)


# A small package with one of each fault, and beside each the same kind of import done right.
TOY_PACKAGE = {
    "__init__.py": """
        __version__ = "1"

        def __getattr__(name):
            from toy.ops import api
            return getattr(api, name)
        """,
    "__main__.py": "from toy.ops.cli import main\n",
    "errors.py": "class Oops(Exception):\n    pass\n",
    "config.py": "from toy import errors\nfrom toy.store import faults\n",
    "store/__init__.py": "",
    "store/sqlite.py": "from toy.errors import Oops\n",
    "store/faults.py": """
        from toy.errors import Oops

        def classify():
            from toy.ops import cli
        """,
    "store/backend.py": """
        from typing import TYPE_CHECKING

        from . import sqlite
        from toy import KGWorker

        if TYPE_CHECKING:
            from toy.queue.leased import Claim, claim
        """,
    "kg/__init__.py": "",
    "kg/client.py": "import click\nfrom toy import __version__\nfrom .answer import parse\n",
    "kg/web.py": "def page():\n    from flask import render_template\n",
    "kg/answer.py": """
        import json

        def parse():
            from rich.live import Live
            from toy.kg.client import post
        """,
    "queue/__init__.py": "",
    "queue/leased.py": """
        from toy.store.sqlite import connect
        from toy.kg.answer import parse
        from ..worker import kgworker
        """,
    "worker/__init__.py": "",
    "worker/kgworker.py": "from toy.errors import Oops\n",
    "worker/lease.py": "from toy.queue.leased import Claim\n",
    "pool/__init__.py": "",
    "pool/supervisor.py": "from toy.worker import lease\nfrom toy.ops.reporting import Reporter\n\n\n"
                          "class Supervisor:\n" + "    a = 0\n" * 300,
    "pool/slots.py": "class Slots:\n" + "    a = 0\n" * 299,
    "pool/big.py": "a = 0\n" * 401,
    "pool/edge.py": "a = 0\n" * 400,
    "ops/__init__.py": "",
    "ops/cli.py": """
        import click
        import rich.console

        import toy
        from toy import KGWorker
        from toy.pool.supervisor import Supervisor
        """,
    "ops/api.py": "from toy.pool.supervisor import Supervisor\nfrom toy.worker.kgworker import KGWorker\n",
    "ops/console.py": "import waitress\nfrom flask import Flask\nfrom werkzeug.exceptions import HTTPException\n",
    "ops/reporting.py": """
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from toy.pool.supervisor import Supervisor
        """,
    "extras/thing.py": "from toy.errors import Oops\n",
}


def test_the_checker_reports_each_fault_of_a_toy_package_and_nothing_else(tmp_path):
    for name, text in TOY_PACKAGE.items():
        path = tmp_path / "toy" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    assert architecture_violations(tmp_path / "toy") == [
        "toy/config.py:2: vocabulary imports toy.store.faults (store); vocabulary may import only vocabulary",
        "toy/extras/thing.py: in no layer: extras/ is none of store, kg, queue, worker, pool, ops",
        "toy/kg/answer.py:4: kg imports rich; only ops/ may import click or rich",
        "toy/kg/client.py:1: kg imports click; only ops/ may import click or rich",
        "toy/kg/web.py:2: kg imports flask; only ops/ may import flask or jinja2 or waitress or werkzeug",
        "toy/pool/supervisor.py:2: pool imports toy.ops.reporting (ops); "
        "pool may import only vocabulary, store, kg, queue, worker, pool",
        "toy/queue/leased.py:3: queue imports toy.worker.kgworker (worker); "
        "queue may import only vocabulary, store, kg, queue",
        "toy/store/backend.py:4: store imports toy.KGWorker (entry); store may import only vocabulary, store",
        "toy/store/backend.py:7: store imports toy.queue.leased (queue); "
        "store may import only vocabulary, store",
        "toy/store/faults.py:4: store imports toy.ops.cli (ops); store may import only vocabulary, store",
        "import cycle among toy.kg.answer, toy.kg.client: toy.kg.answer -> toy.kg.client -> toy.kg.answer",
        "import cycle among toy.ops.reporting, toy.pool.supervisor: "
        "toy.ops.reporting -> toy.pool.supervisor -> toy.ops.reporting",
        "toy/pool/big.py: 401 lines, over 400",
        "toy/pool/supervisor.py:5: class Supervisor is 301 lines, over 300",
    ]
