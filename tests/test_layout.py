"""The package's import graph: no cycles, no project import hidden inside a function, every
import going down the layers of shared/DESIGN.md (a package imports only its own layer and those
below it), and the model below the quantisation algorithms (the decoder never pulls in AWQ or GPTQ)."""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jaxinfer", "pallas_kernels")


def _modules() -> dict[str, str]:
    """Module name -> file, for every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def _imports(node: ast.AST, modules: dict[str, str]) -> set[str]:
    """Project modules imported by the statements directly in `node` (top level of a module)."""
    found = set()
    for stmt in ast.walk(node) if not isinstance(node, ast.Module) else node.body:
        names = []
        if isinstance(stmt, ast.Import):
            names = [a.name for a in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module:
            names = [stmt.module] + [f"{stmt.module}.{a.name}" for a in stmt.names]
        found |= {n for n in names if n in modules}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        deps = _imports(tree, modules)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        for dep in list(deps):
            parts = dep.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules}
        graph[name] = deps - {name} - {p for p in modules if name.startswith(p + ".")}
    return graph


def test_no_import_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


# The layers, bottom up: a module may import modules of its own layer and of the layers below.
LAYERS = [
    ("pallas_kernels",),
    ("jaxinfer.buckets", "jaxinfer.sampling", "jaxinfer.structured"),
    ("jaxinfer.models", "jaxinfer.sharding"),
    ("jaxinfer.checkpoints", "jaxinfer.quant", "jaxinfer.lora", "jaxinfer.data", "jaxinfer.memory",
     "jaxinfer.hardware"),
    ("jaxinfer.speculative",),
    ("jaxinfer.engine",),
    ("jaxinfer.serving", "jaxinfer.evaluation"),
]


def _layer(module: str) -> int | None:
    """The layer of a module (None: the package's own __init__, which re-exports the public API)."""
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if _layer(m) is None and m != "jaxinfer"]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_imports_go_down_the_layers():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in _graph().items() for d in deps
              if _layer(m) is not None and _layer(d) is not None and _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_project_import_inside_a_function():
    modules = _modules()
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden = _imports(fn, modules)
                assert not hidden, f"{name}.{fn.name} imports {sorted(hidden)} inside the function"


def test_model_does_not_import_the_quantisation_algorithms():
    graph, seen, todo = _graph(), set(), ["jaxinfer.models.decoder"]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    assert not {m for m in seen if m.startswith("jaxinfer.quant")}, sorted(seen)
    assert "jaxinfer.models.matmul" in seen and "jaxinfer.models.formats" in seen


def test_every_experiment_imports_beside_the_others():
    """The experiments share one absl flag namespace: a flag two scripts define would stop the
    second from importing (shared flags live in experiments/common.py)."""
    import importlib

    names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "experiments"))
                   if f.endswith(".py") and f != "__init__.py")
    for name in names:
        importlib.import_module(f"experiments.{name}")
