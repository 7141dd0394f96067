"""medseg's layering, read from its source: no import cycles, tracking libraries at the edge.

Data flows one way (io → datasets → pipeline → models → training → inference →
evaluation, workflows above them, tracking and tuning outside); the imports must say so.
Imports inside functions count (they are dependencies all the same); those under
``if TYPE_CHECKING:`` do not (annotations only), nor does the parent package every import
of a submodule initialises first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "medseg"
EDGE_LIBRARIES = ("mlflow", "optuna", "papermill")
EDGE = ("medseg.tracking", "medseg.tuning", "medseg.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    return skipped


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with its line."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import submodule` depends on the submodule; any other name on pkg
            # (a parent package's __init__ runs for every import, so it is no edge itself)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.append((name if name in MODULES else base, node.lineno))
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def internal(name: str) -> str | None:
    """The medseg module ``name`` refers to (a module, or the package holding a name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])  # medseg.<package> (or a top-level module)


def graph(level) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        source = level(name)
        for imported, _ in imports(path):
            target = internal(imported) if imported.startswith("medseg") else None
            if target is not None and level(target) != source:
                edges.setdefault(source, set()).add(level(target))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt, [*stack, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_checker_finds_cycles_and_sees_real_edges():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    edges = graph(package_of)
    # known dependencies, one of them imported inside a function (cli -> tracking)
    assert {"medseg.evaluation", "medseg.training"} <= edges["medseg.workflows"]
    assert "medseg.tracking" in edges["medseg.cli"]
    assert any(n == "mlflow" for n, _ in imports(ROOT / "tracking" / "model.py"))


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_import_cycles(level):
    edges = graph((lambda m: m) if level == "module" else package_of)
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_tracking_libraries_are_imported_only_at_the_edge():
    offenders = [
        f"{name}:{line} imports {imported}"
        for name, path in sorted(MODULES.items())
        if not name.startswith(EDGE)
        for imported, line in imports(path)
        if imported.split(".")[0] in EDGE_LIBRARIES
    ]
    assert offenders == []


def test_evaluation_is_pure():
    edges = graph(package_of)
    assert not edges.get("medseg.evaluation", set()) & {
        "medseg.workflows", "medseg.tracking", "medseg.tuning", "medseg.training",
        "medseg.models", "medseg.cli",
    }, edges.get("medseg.evaluation")


def test_workflows_sit_below_tracking_and_tuning():
    edges = graph(package_of)
    for package in ("medseg.workflows", "medseg.planning", "medseg.training", "medseg.inference"):
        assert not edges.get(package, set()) & {"medseg.tracking", "medseg.tuning", "medseg.cli"}


def test_every_package_is_installed():
    """A package missing from pyproject.toml works from the source tree and breaks once
    installed (CI's clean clone)."""
    import tomllib

    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ])
    packages = {module_name(p) for p in ROOT.rglob("__init__.py")}
    datasets = ROOT.parent / "datasets"
    packages |= {
        "medseg_datasets" + "".join(f".{part}" for part in p.parent.relative_to(datasets).parts)
        for p in datasets.rglob("__init__.py")
        if "dummy_data" not in p.parts
    }
    assert packages - listed == set()
