"""The house rules, read from the source with ``ast``: imports run down the floors, no circles, no god modules.

Floors, top to bottom (docs/architecture.md): ``launch`` (command line and
simulation launcher) > ``clients``, ``server`` (the Flower apps) > ``wire``
(their message contract) and ``attacks`` > ``fedistill`` (the library, no
Flower). Every import statement counts, wherever it stands: inside a function
or under ``if TYPE_CHECKING:`` it is still a dependency, so a circle cannot
hide behind a late import. ``from package import name`` depends on the
submodule ``package.name`` when there is one, else on the package itself.
Importing a submodule also runs its package's ``__init__``; that implicit step
is not counted, as every import tool does, because a package always starts
before its submodules and re-exporting them is what ``__init__`` is for.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, set[str]] = {
    "fedistill": {"fedistill"},
    "attacks": {"fedistill", "attacks"},
    "wire": {"fedistill", "wire"},
    "clients": {"fedistill", "attacks", "wire", "clients"},
    "server": {"fedistill", "attacks", "wire", "server"},
    "launch": {"fedistill", "attacks", "wire", "clients", "server", "launch"},
}
"""Which of the project's packages each package may import."""

MAX_LINES = 600
"""No module grows past this; split it along its seams instead (see docs/architecture.md)."""


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the given packages."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The dotted name behind every import anywhere in ``tree``: ``pkg.name`` for ``from pkg import name``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def dependency_graph(files: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports: for each import, the longest prefix of its name that is a module."""
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        for name in imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py"):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
        targets.discard(module)
        graph[module] = targets
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None; depth-first search with the path on a stack."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def project_graph() -> dict[str, set[str]]:
    return dependency_graph(module_files(REPO, ALLOWED))


def upward_imports(graph: Mapping[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    )


def test_the_library_imports_no_floor_above_it_and_no_flower() -> None:
    files = module_files(REPO, ["fedistill"])
    offending = []
    for module, path in files.items():
        for name in imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top in {"clients", "server", "attacks", "wire", "launch", "flwr"}:
                offending.append(f"{module} imports {name}")
    assert offending == [], "fedistill/ is the ground floor:\n" + "\n".join(sorted(set(offending)))


def test_imports_run_down_the_floors() -> None:
    assert upward_imports(project_graph()) == []


def test_no_import_circles() -> None:
    cycle = find_cycle(project_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_module_is_a_god_module(package: str) -> None:
    long = {
        str(path.relative_to(REPO)): count
        for path in (REPO / package).rglob("*.py")
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"over {MAX_LINES} lines; split along the seams: {long}"


def test_the_checks_see_late_and_type_checking_imports(tmp_path: Path) -> None:
    """The detectors themselves: a circle closed by a function-level import, and an upward import under TYPE_CHECKING."""
    (tmp_path / "fedistill" / "sub").mkdir(parents=True)
    (tmp_path / "server").mkdir()
    (tmp_path / "fedistill" / "__init__.py").write_text("")
    (tmp_path / "fedistill" / "sub" / "__init__.py").write_text("")
    (tmp_path / "fedistill" / "a.py").write_text("from fedistill.sub import b\n")
    (tmp_path / "fedistill" / "sub" / "b.py").write_text("def late():\n    from ..a import late_name\n")
    (tmp_path / "fedistill" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from server.app import App\n"
    )
    (tmp_path / "server" / "__init__.py").write_text("")
    (tmp_path / "server" / "app.py").write_text("import fedistill.c\n")
    graph = dependency_graph(module_files(tmp_path, ["fedistill", "server"]))
    assert find_cycle(graph) in (
        ["fedistill.a", "fedistill.sub.b", "fedistill.a"],
        ["fedistill.sub.b", "fedistill.a", "fedistill.sub.b"],
    )
    assert upward_imports(graph) == ["fedistill.c imports server.app"]
