"""The import rules of docs/ARCHITECTURE.md, read from the source with :mod:`ast` (nothing is imported).

Every ``import`` of every module of ``qc``, ``daemon`` and ``windows_service`` is recorded with where it
runs: at import time (module level, class bodies, ``try``/``if`` blocks at module level), inside a
function (a lazy import: runs when the function is called), or only for type checkers (under
``if TYPE_CHECKING:``). ``importlib.import_module("name")`` with a literal name counts as an import too.

The rules (issue #14, item 5):

- No cycle among the project's import-time imports. A lazy import cannot meet a half-initialised module
  at start-up (by the time a function runs, every module it names has been imported or can be), and
  type-checking imports never run, so neither takes part in a cycle. Importing ``a.b.c`` runs the
  ``__init__`` of ``a`` and ``a.b`` first, so it also counts as importing those packages, except the
  importer's own packages (already initialised, or being initialised, when the importer runs); a module
  that takes names from its own package's ``__init__`` does count, and would be a cycle when that
  ``__init__`` imports it.
- ``qc`` is a library (../shared/STYLE.md): it never imports ``daemon``, ``windows_service`` or the
  service's dependencies (watchdog, APScheduler, structlog, boto3, ...), not even lazily.
- ``windows_service`` depends on ``daemon``, never the other way at import time. ``daemon`` reaches
  the Windows wrapper only lazily, at the few places where a command dispatches to it on Windows
  (:data:`DAEMON_TO_WINDOWS_ALLOWED`); any other import of ``windows_service`` from ``daemon`` fails.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("qc", "daemon", "windows_service")

#: Import-time: runs when the module is imported. Lazy: inside a function. Typing: under TYPE_CHECKING.
IMPORT_TIME, LAZY, TYPING = "import-time", "lazy", "typing"

#: What qc must never import: the other packages and the service's own dependencies (pyproject.toml):
#: scheduling, watching, logging setup, storage clients, notifications, metrics export, the database,
#: pywin32. (psutil is allowed: qc.report asks whether a half-written output's writer still runs.)
QC_FORBIDDEN = frozenset(
    {
        "daemon",
        "windows_service",
        "watchdog",
        "apscheduler",
        "structlog",
        "boto3",
        "botocore",
        "oss2",
        "apprise",
        "desktop_notifier",
        "prometheus_client",
        "sdnotify",
        "rich",
        "sqlite3",
        "win32api",
        "win32service",
        "win32serviceutil",
        "win32event",
        "servicemanager",
        "win32com",
    }
)

#: The only places daemon may import windows_service, lazily: (importer, imported module) -> why.
DAEMON_TO_WINDOWS_ALLOWED: Mapping[tuple[str, str], str] = {
    ("daemon.install", "windows_service.manage"): "`imageqc service ...` on Windows dispatches to the wrapper",
    ("daemon.follow", "windows_service.desktop"): "`imageqc follow --notify` asks which Windows session it runs in",
}


@dataclass(frozen=True)
class Import:
    """One imported module as a module's source names it."""

    importer: str
    target: str  # dotted module name; for a project module the module itself, else as written
    kind: str  # IMPORT_TIME, LAZY or TYPING
    line: int

    @property
    def where(self) -> str:
        return f"{self.importer}:{self.line} ({self.kind})"


def module_files(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the packages (``__init__`` names its package)."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    """Every import of one module's tree, with the kind of place it is in."""

    def __init__(self, module: str, is_package: bool, known: frozenset[str]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.kind = IMPORT_TIME
        self.found: list[Import] = []

    def _with_kind(self, kind: str, nodes: Iterable[ast.AST]) -> None:
        before = self.kind
        if before != TYPING:  # typing-only stays typing-only, even inside a function
            self.kind = kind
        for node in nodes:
            self.visit(node)
        self.kind = before

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._with_kind(LAZY, ast.iter_child_nodes(node))

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._with_kind(TYPING, node.body)
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _add(self, target: str, line: int) -> None:
        self.found.append(Import(self.module, target, self.kind, line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            up = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*up, base] if base else up)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            # `from pkg import submodule` imports the submodule; `from module import name` the module
            self._add(sub if sub in self.known else base, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0] if node.args else None
        if name == "import_module" and isinstance(first, ast.Constant) and isinstance(first.value, str):
            self._add(first.value, node.lineno)
        self.generic_visit(node)


def collect_imports(files: Mapping[str, Path]) -> list[Import]:
    """Every import of every module in ``files`` (see :func:`module_files`)."""
    known = frozenset(files)
    out: list[Import] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        collector = _Collector(module, path.name == "__init__.py", known)
        collector.visit(tree)
        out += collector.found
    return out


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_time_graph(imports: Iterable[Import], known: Iterable[str]) -> dict[str, dict[str, int]]:
    """Project module -> {project module it runs at import time: line}, packages' ``__init__`` included."""
    known = set(known)
    graph: dict[str, dict[str, int]] = {m: {} for m in known}
    for imp in imports:
        if imp.kind != IMPORT_TIME:
            continue
        own = set(_ancestors(imp.importer))
        for target in [*_ancestors(imp.target), imp.target]:
            if target in known and target != imp.importer and target not in own - {imp.target}:
                graph[imp.importer].setdefault(target, imp.line)
    return graph


def find_cycles(graph: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one; [] when acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(root: str) -> None:  # Tarjan's algorithm, iterative (no recursion limit)
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: Mapping[str, Mapping[str, object]], members: set[str]) -> list[str]:
    """A shortest cycle through the first member of one strongly connected component."""
    start = min(members)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(members)}")  # pragma: no cover


def describe(cycle: list[str], graph: Mapping[str, Mapping[str, int]]) -> str:
    """``a (line 3) -> b (line 9) -> a``: each step with the line of the importer that makes it."""
    steps = [f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)]
    return " -> ".join([*steps, cycle[-1]])


# ---- the project ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, Path], list[Import]]:
    files = module_files()
    return files, collect_imports(files)


def test_every_package_is_walked(project):
    files, imports = project
    for package in PACKAGES:
        assert package in files, f"{package}/__init__.py not found under {REPO}"
    # subpackages and their modules are seen, and imports inside functions are recorded
    assert {"qc.track", "qc.track.detect", "qc.stitching.pairs", "daemon.upload.s3"} <= set(files)
    assert any(i.kind == LAZY and i.target == "qc.pipeline" for i in imports)
    assert any(i.kind == TYPING for i in imports)


def test_no_import_cycles(project):
    files, imports = project
    graph = import_time_graph(imports, files)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (at import time; see docs/ARCHITECTURE.md, 'Import rules'):\n" + "\n".join(
        describe(c, graph) for c in cycles
    )


def test_qc_is_a_library(project):
    _files, imports = project
    bad = [
        f"{i.where} imports {i.target}"
        for i in imports
        if i.importer.split(".")[0] == "qc" and i.target.split(".")[0] in QC_FORBIDDEN
    ]
    assert not bad, "qc is a library: it never imports the service or its dependencies:\n" + "\n".join(bad)


def test_daemon_does_not_depend_on_windows_service(project):
    _files, imports = project
    bad = [
        f"{i.where} imports {i.target}"
        for i in imports
        if i.importer.split(".")[0] == "daemon"
        and i.target.split(".")[0] == "windows_service"
        and not (i.kind == LAZY and (i.importer, i.target) in DAEMON_TO_WINDOWS_ALLOWED)
    ]
    assert not bad, (
        "windows_service depends on daemon, never the other way (only the lazy dispatches listed in "
        "DAEMON_TO_WINDOWS_ALLOWED are allowed):\n" + "\n".join(bad)
    )


def test_the_allowed_lazy_imports_still_exist(project):
    """An allowance nobody uses any more is removed, so the list says what the code does."""
    _files, imports = project
    used = {(i.importer, i.target) for i in imports if i.kind == LAZY}
    assert set(DAEMON_TO_WINDOWS_ALLOWED) <= used, set(DAEMON_TO_WINDOWS_ALLOWED) - used


# ---- the walker itself, on small made-up trees ---------------------------------------------------------


def _tree(tmp_path: Path, sources: Mapping[str, str]) -> tuple[dict[str, Path], list[Import]]:
    for rel, text in sources.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    files = module_files(tmp_path, sorted({rel.split("/")[0] for rel in sources}))
    return files, collect_imports(files)


def test_a_module_level_cycle_is_found_and_named(tmp_path):
    files, imports = _tree(
        tmp_path,
        {
            "p/__init__.py": "",
            "p/cli.py": "from p.codes import EXIT_OK\nfrom p import demo\n",
            "p/codes.py": "import os\n\nEXIT_OK = 0\n",
            "p/demo.py": "import json\n\nfrom p.cli import EXIT_OK\n",
        },
    )
    graph = import_time_graph(imports, files)
    cycles = find_cycles(graph)
    assert cycles == [["p.cli", "p.demo", "p.cli"]]
    assert describe(cycles[0], graph) == "p.cli (line 2) -> p.demo (line 3) -> p.cli"


def test_lazy_and_typing_imports_make_no_cycle_but_are_recorded(tmp_path):
    files, imports = _tree(
        tmp_path,
        {
            "p/__init__.py": "",
            "p/a.py": "from p import b\n",
            "p/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from p.a import X\n"
                "def f():\n    from p.a import Y\n"
                "class C:\n    def m(self):\n        import importlib\n        importlib.import_module('p.a')\n"
            ),
        },
    )
    assert find_cycles(import_time_graph(imports, files)) == []
    kinds = sorted((i.kind, i.line) for i in imports if i.importer == "p.b" and i.target == "p.a")
    assert kinds == [(LAZY, 5), (LAZY, 9), (TYPING, 3)]


def test_a_package_init_importing_its_modules_is_no_cycle_unless_one_imports_the_init(tmp_path):
    sources = {
        "p/__init__.py": "from p.sub import f\n",
        "p/sub/__init__.py": "from p.sub.one import f\n",
        "p/sub/one.py": "from p.sub.two import g\n\ndef f(): return g()\n",
        "p/sub/two.py": "from . import three\n\ndef g(): return 1\n",
        "p/sub/three.py": "",
        "p/outside.py": "from p.sub.two import g\n",
    }
    files, imports = _tree(tmp_path, sources)
    graph = import_time_graph(imports, files)
    assert find_cycles(graph) == []
    assert "p.sub.three" in graph["p.sub.two"]  # `from . import three` resolved to the module
    assert "p.sub" in graph["p.outside"]  # importing p.sub.two runs p.sub's __init__ first
    (tmp_path / "p/sub/two.py").write_text("from p.sub import f\n\ndef g(): return 1\n", encoding="utf-8")
    files = module_files(tmp_path, ["p"])
    cycles = find_cycles(import_time_graph(collect_imports(files), files))
    assert cycles == [["p.sub", "p.sub.one", "p.sub.two", "p.sub"]]
