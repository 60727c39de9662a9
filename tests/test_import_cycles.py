"""No import cycles in the project's packages, function-level imports included (DESIGN.md).

Every ``.py`` module under ``trainer/``, ``export/``, ``index/`` and ``app/`` is parsed with ``ast`` (nothing is
imported). Each ``import``/``from ... import`` anywhere in it (module level, in functions, in ``try`` blocks;
only ``if TYPE_CHECKING:`` blocks, which never run, are left out) that names one of the project's packages
becomes an edge to what it makes Python run:

* ``import a.b.c`` / ``from a.b.c import name``: the module ``a.b.c`` and the ``__init__`` of each package on
  the way (``a``, ``a.b``), and, for ``from``, ``a.b.c.name`` too when that is a submodule;
* ``from a.b import name`` where ``a.b`` is a package: its ``__init__``, and ``a.b.name`` when that is a module.

Packages that contain the importing module are left out of the edges they would only get as "a package on
the way": Python runs a package's ``__init__`` before any module inside it, so ``import trainer.objectives.base``
inside ``trainer/objectives/simclr.py`` cannot re-run ``trainer/objectives/__init__``. Taking a *name* (not a
submodule) from such a package does count (``from trainer.objectives import get_objective`` inside
``trainer/objectives/multitask.py``): that name exists only once the package's ``__init__`` has run past the
line defining it, and that ``__init__`` imports ``multitask`` - a real cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "export", "index", "app")


def discover_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root/<package>`` (``pkg/__init__.py`` -> ``pkg``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom in ``tree`` at any depth, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        stack.extend(children)


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``[a, a.b]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph(modules: dict[str, Path], packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules importing it makes Python run (see the module docstring)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        inside = set(_ancestors(module)) | ({module} if is_package else set())  # run before this module is

        def add(target: str, *, on_the_way: bool = False) -> None:
            if target == module or target not in modules or (on_the_way and target in inside):
                return
            graph[module].add(target)

        def add_with_parents(target: str) -> None:
            for parent in _ancestors(target):
                add(parent, on_the_way=True)

        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] not in packages:
                        continue
                    add_with_parents(alias.name)
                    add(alias.name, on_the_way=alias.name in inside)
                continue
            source = _resolve_from(module, is_package, node)
            if source.split(".")[0] not in packages:
                continue
            add_with_parents(source)
            submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
            names = [alias.name for alias in node.names if f"{source}.{alias.name}" not in modules]
            for submodule in submodules:
                add(submodule)
            # The package's (or module's) own namespace is needed for names; a ``from pkg import submodule`` from
            # outside ``pkg`` runs its __init__ as well.
            add(source, on_the_way=not names and source in inside)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one, via Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                        components.append(component)
    return [_cycle_in(sorted(component), graph) for component in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A concrete cycle through the component's first member (shortest, by breadth-first search)."""
    members, start = set(component), component[0]
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
    raise AssertionError(f"no cycle through {start} in {component}")  # pragma: no cover


def test_the_cycle_finder_finds_cycles_in_a_small_graph():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    cycles = find_cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c", "e"}, "e": set()})
    assert sorted(cycles) == [["a", "b", "a"], ["c", "d", "c"]]


def test_the_graph_follows_function_level_relative_and_package_imports(tmp_path):
    """A tiny package: ``pkg/__init__`` imports ``a``; ``a`` imports ``b`` inside a function; ``b`` takes ``a``
    from the package inside a function (a cycle a -> b -> a); ``c`` imports its own package's submodule ``base``
    the way objectives do (no cycle); ``d`` takes a name from its own package (a cycle through __init__)."""
    files = {
        "pkg/__init__.py": "from . import a\nfrom .base import NAME\n",
        "pkg/base.py": "NAME = 1\n",
        "pkg/a.py": "def f():\n    from pkg.b import g\n",
        "pkg/b.py": "import json\n\ndef g():\n    from pkg import a\n",
        "pkg/c.py": "import pkg.base\nfrom .base import NAME\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
                        "def h():\n    from .. import NAME\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(discover_modules(tmp_path, ("pkg",)), ("pkg",))
    assert graph["pkg"] == {"pkg.a", "pkg.base"}
    assert graph["pkg.b"] == {"pkg.a"}  # a submodule of its own package, whose __init__ is already running
    assert graph["pkg.c"] == {"pkg.base"}  # its own package is already running
    assert graph["pkg.sub.d"] == {"pkg"}  # NAME from the package; the TYPE_CHECKING import is left out
    cycles = find_cycles(graph)
    assert len(cycles) == 1 and {"pkg.a", "pkg.b"} <= set(cycles[0])


def test_the_project_has_no_import_cycles():
    modules = discover_modules(REPO)
    graph = import_graph(modules)
    # Not vacuous: the walk sees the project's own imports, function-level ones included.
    assert len(modules) > 80 and sum(map(len, graph.values())) > 150
    assert "trainer.objectives.base" in graph["trainer.objectives.simclr"]
    assert "trainer.loop" in graph["trainer.pretrain"] and "trainer.loop" in graph["trainer.evolve"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(cycle) for cycle in cycles)
