"""The layering rules of docs/architecture.md, read from the source with ``ast``: imports point down.

* no import cycle among rope_ext's modules at module level, TYPE_CHECKING blocks included (imports
  inside functions are deferred on purpose and not counted);
* ``rope_ext.kernels`` imports nothing of rope_ext outside it;
* ``rope_ext.methods`` (formulas, the method contract) imports no transformers and no glue (only the
  leaf ``rope_ext.validate``);
* the leaves ``rope_ext.validate`` and ``rope_ext.lengths`` import nothing of rope_ext;
* the eval harness and LongLoRA know methods only through the public API and the registry.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rope_ext": ROOT / "rope_ext", "rope_ext.patches": ROOT / "patches", "rope_ext.eval": ROOT / "eval"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """rope_ext modules (and third-party roots) that ``name`` imports."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    nodes = []
    scopes = [tree] if top_level_only else list(ast.walk(tree))
    for scope in scopes:
        for node in ast.iter_child_nodes(scope) if top_level_only else [scope]:
            if isinstance(node, ast.If):  # TYPE_CHECKING blocks count
                nodes.extend(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                nodes.append(node)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        else:
            target = _absolute(name, is_package, node)
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


MODULES = modules()


def graph() -> dict[str, set[str]]:
    return {name: {m for m in imports(name, path, True) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_no_module_level_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(c.startswith(nxt + ".") or c == nxt for c in cycle[1:-1]):
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("rope_ext.kernels")))
def test_kernels_import_nothing_above_them(name):
    above = {m for m in imports(name, MODULES[name], False) if m.startswith("rope_ext") and not m.startswith("rope_ext.kernels")}
    assert not above, f"{name} imports {sorted(above)}"


@pytest.mark.parametrize("name", ["rope_ext.validate", "rope_ext.lengths", "rope_ext.named_registry"])
def test_leaf_modules_import_nothing_of_rope_ext(name):
    found = {m for m in imports(name, MODULES[name], False) if m.startswith("rope_ext")}
    assert not found, f"{name} is a leaf that anything may import; it imports {sorted(found)}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("rope_ext.methods")))
def test_methods_import_no_transformers_and_no_glue(name):
    found = imports(name, MODULES[name], False)
    allowed = ("rope_ext.methods", "rope_ext.kernels", "rope_ext.validate", "rope_ext.named_registry")
    assert not {m for m in found if m.split(".")[0] == "transformers"}, f"{name} imports transformers"
    assert not {m for m in found if m.startswith("rope_ext") and not m.startswith(allowed)}, f"{name} imports glue"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith(("rope_ext.eval", "rope_ext.longlora"))))
def test_eval_and_longlora_know_methods_only_through_the_api(name):
    found = imports(name, MODULES[name], False)
    private = {m for m in found if m in MODULES and m.startswith("rope_ext.methods.") and m != "rope_ext.methods.registry"}
    glue = {m for m in found if m.startswith(("rope_ext.attention", "rope_ext.cache", "rope_ext.kernels", "rope_ext.methods.frequency",
                                               "rope_ext.methods.rerope", "rope_ext.methods.self_extend"))}
    assert not private - {"rope_ext.methods.registry"} and not glue, f"{name} imports {sorted(private | glue)}"
