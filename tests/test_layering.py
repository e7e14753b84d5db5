"""The layers hold: crypto ← federation/marketplace ← node, node/p2p is transport only, and no import cycles.

Every import in the tree counts, module-level or inside a function (a lazy import is still a dependency), read
with `ast` from the source files.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("crypto", "federation", "marketplace", "node")


def module_name(path: Path) -> str:
    """`node/p2p/host.py` -> `node.p2p.host`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The project modules `name` imports (relative imports resolved; `from pkg import mod` counts as pkg.mod)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import node.p2p.host.X` -> the nearest module
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules()
    known = set(modules)
    return {name: set(imports_of(name, path, known)) for name, path in modules.items()}


GRAPH = import_graph()


def _violations(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[0] in sources or any(module.startswith(f"{s}.") or module == s for s in sources)
        for target in targets
        if any(target == f or target.startswith(f"{f}.") for f in forbidden)
    )


@pytest.mark.parametrize(
    ("sources", "forbidden"),
    [
        (("crypto",), ("federation", "marketplace", "node")),
        (("federation", "marketplace"), ("node",)),
        (("node.p2p",), ("federation", "marketplace", "node.market", "node.fed", "node.api", "node.cli")),
        (("node.p2p", "node.market", "node.fed", "federation", "marketplace"), ("node.memory", "node.api.memory")),
    ],
    ids=[
        "crypto is a leaf",
        "federation and marketplace never import node",
        "node.p2p is transport only",
        "memory never reaches the code that publishes, gossips or federates",
    ],
)
def test_no_layer_imports_upward(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    # Arrange / Act
    found = _violations(sources, forbidden)
    # Assert
    assert found == []


def test_there_is_no_import_cycle() -> None:
    # Arrange: Tarjan's strongly connected components over the import graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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
                cycles.append(sorted(component))

    # Act
    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    # Assert
    assert cycles == []


def test_the_graph_sees_the_imports_it_must() -> None:
    """The walk itself works: known edges, module-level and lazy, are found."""
    assert "node.p2p.host" in GRAPH["node.daemon"]
    assert "crypto.identity" in GRAPH["federation.descriptor"]
    assert "node.cli.doctor" in GRAPH["node.cli.main"]  # imported inside a function
