"""The package's layering (DESIGN.md): arrows point down only and no module imports itself
back, counting imports inside functions too (a cycle hidden in a function is still a cycle)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders installed as packages: kernels/ is installed as astrea.kernels.
PACKAGE_DIRS = {"astrea": ROOT / "astrea", "astrea.kernels": ROOT / "kernels"}


def _module_name(path: Path) -> str:
    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda item: -len(item[0])):
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((package, *parts)).removesuffix(".__init__")
    raise ValueError(path)


def _modules() -> dict[str, Path]:
    paths = [*PACKAGE_DIRS["astrea"].rglob("*.py"), *PACKAGE_DIRS["astrea.kernels"].rglob("*.py")]
    return {_module_name(p): p for p in paths}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The astrea modules ``path`` imports anywhere in its body (``from a import b`` counts
    ``a.b`` when that is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


GRAPH = {name: _imports(path, _modules()) - {name} for name, path in _modules().items()}


def _package_of(module: str) -> str:
    """The folder of ``module`` for the layering: its first two name parts (astrea.ops, ...)."""
    return ".".join(module.split(".")[:2])


def test_no_module_imports_itself_back():
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return
        if module in visiting:
            cycle = visiting[visiting.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        visiting.append(module)
        for imported in sorted(GRAPH[module]):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


# What each layer may import from astrea: only layers below it.
BELOW = {
    "astrea.kernels": {"astrea.kernels"},
    "astrea.reference": {"astrea.reference", "astrea._validation"},
    "astrea.ops": {"astrea.ops", "astrea.kernels", "astrea.reference", "astrea._backend", "astrea._extension",
                   "astrea._errors", "astrea._validation", "astrea._residual_draw", "astrea._blas"},
}


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_arrows_point_down(layer):
    for module, imported in GRAPH.items():
        if _package_of(module) != layer:
            continue
        upward = sorted(name for name in imported if _package_of(name) not in BELOW[layer])
        assert not upward, f"{module} imports {upward}, which are not below {layer}"


def test_the_graph_sees_function_level_imports():
    """The ops import their Triton kernels inside functions (astrea imports without triton)."""
    assert "astrea.kernels.router" in GRAPH["astrea.ops.router"]
