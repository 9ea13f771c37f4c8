"""No import cycles inside ``kimia_edge.export``.

What is checked: every ``import`` / ``from ... import`` statement found anywhere in a module's source (parsed with
``ast``, never executed) — module level, inside functions and methods, and under ``if TYPE_CHECKING:`` alike — is
an edge from that module to the module it names (``from a.b import c`` names ``a.b.c`` when that is a module, else
``a.b``). A function-level import is counted on purpose: it only postpones a circle to call time, and the circles
this test was written against went through function-level imports. The graph spans the whole ``kimia_edge``
package, so a circle that leaves ``export/`` (through ``runtime/`` or ``quantization/``) and comes back is found too;
the test fails on every cycle that contains at least one ``kimia_edge.export`` module. Implicit imports of parent
packages (importing ``a.b.c`` runs ``a/b/__init__.py``) and ``importlib.import_module`` calls are not edges.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
# import name -> source folder (pyproject.toml [tool.scikit-build] wheel.packages)
PACKAGES = {
    "kimia_edge": REPO / "src" / "kimia_edge",
    "kimia_edge.runtime": REPO / "runtime",
    "kimia_edge.export": REPO / "export",
    "kimia_edge.quantization": REPO / "quantization",
}
CHECKED = "kimia_edge.export"


def module_files() -> Dict[str, Path]:
    """Every module of the package: dotted name -> file (``__init__.py`` for packages)."""
    out: Dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """module -> the package modules its import statements name (anywhere in the file)."""
    edges: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_from(name, is_package, node)
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # "kimia_edge.x.y.attr" -> the longest module prefix
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, as cycles to report."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _path_within(component: List[str], edges: Dict[str, Set[str]]) -> List[str]:
    """One concrete circle through the component's first module (breadth-first), for the failure message."""
    members, start = set(component), component[0]
    parent: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(parent[chain[-1]])
                    return [*reversed(chain), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def test_the_checker_finds_a_cycle_and_resolves_imports(tmp_path: Path) -> None:
    """The checker itself: a planted circle whose edges are a function-level relative import and a TYPE_CHECKING
    import is reported; attribute paths resolve to their module."""
    sources = {
        "p": "",
        "p.a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import Thing\n",
        "p.b": "def f():\n    from . import a\n    return a\n",
        "p.c": "import p.a.missing_attr\nfrom p import b\n",
    }
    files = {}
    for name, text in sources.items():
        path = tmp_path / (name.replace(".", "/") + ("/__init__.py" if name == "p" else ".py"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        files[name] = path
    edges = import_edges(files)
    assert edges == {"p": set(), "p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a", "p.b"}}
    assert cycles(edges) == [["p.a", "p.b"]]
    assert _path_within(["p.a", "p.b"], edges) == ["p.a", "p.b", "p.a"]


def test_no_import_cycle_inside_export() -> None:
    """Every import statement of every kimia_edge module counts (module level, function level, TYPE_CHECKING)."""
    modules = module_files()
    assert any(m.startswith(CHECKED + ".") for m in modules), "export/ modules not found"
    edges = import_edges(modules)
    bad = [c for c in cycles(edges) if any(m == CHECKED or m.startswith(CHECKED + ".") for m in c)]
    if bad:
        lines = [" -> ".join(_path_within(c, edges)) + f"   (component of {len(c)}: {', '.join(c)})" for c in bad]
        pytest.fail("import cycles (module-level and function-level imports both count):\n" + "\n".join(lines))
