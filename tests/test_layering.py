"""The import graph of dalle_fast: no cycles, and the Triton kernels below the op layer.

Edges come from the source (ast), every ``import`` / ``from ... import`` of a dalle_fast module,
at module level and inside functions. Importing ``a.b.c`` from outside package ``a.b`` also runs
``a.b``'s ``__init__``, so that is an edge too.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dalle_fast"

#: what dalle_fast.kernels may import of dalle_fast: the leaf modules below the op layer
KERNELS_MAY_IMPORT = {"dalle_fast.masks", "dalle_fast.version", "dalle_fast._checks"}
#: the op layer: no cycles among these even through function-level imports
OP_LAYER = ("dalle_fast.ops", "dalle_fast.decode", "dalle_fast.sampling", "dalle_fast._triton_ops",
            "dalle_fast.kernels", "dalle_fast._checks", "dalle_fast.masks", "dalle_fast.reference",
            "dalle_fast.triton_path", "dalle_fast.cpu_isa", "dalle_fast.nn")


def _modules() -> dict:
    """module name -> source path (kernels/ is a symlink into the package: followed)."""
    mods = {}
    for root, _, files in os.walk(PACKAGE, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                rel = (Path(root) / f).relative_to(PACKAGE.parent).with_suffix("")
                parts = list(rel.parts)
                if parts[-1] == "__init__":
                    parts.pop()
                mods[".".join(parts)] = Path(root) / f
    return mods


def _imports(name: str, path: Path, mods: dict, *, function_level: bool) -> set:
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = ast.walk(tree) if function_level else ast.iter_child_nodes(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + [node.module or ""]).rstrip(".")
            else:
                base = node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            if not t.startswith("dalle_fast."):
                continue
            while t not in mods:
                t = t.rpartition(".")[0]
            parts = t.split(".")
            for i in range(2, len(parts) + 1):  # the module and the packages above it it is not inside
                above = ".".join(parts[:i])
                if above in mods and above != name and not name.startswith(above + "."):
                    found.add(above)
    return found


def _graph(function_level: bool) -> dict:
    mods = _modules()
    return {m: _imports(m, p, mods, function_level=function_level) for m, p in mods.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_graph_sees_the_op_layer():
    graph = _graph(function_level=True)
    assert "dalle_fast.ops._backend" in graph["dalle_fast.ops.attention"]
    assert "dalle_fast.kernels.sparse_attention" in graph["dalle_fast.ops._triton"]  # inside a function
    assert "dalle_fast.kernels.sparse_attention" not in _graph(function_level=False)["dalle_fast.ops._triton"]


def test_no_import_cycles_at_module_level():
    assert _cycles(_graph(function_level=False)) == []


def test_no_import_cycles_in_the_op_layer():
    graph = _graph(function_level=True)
    op_layer = {m: {t for t in ts if _in(t, OP_LAYER)} for m, ts in graph.items() if _in(m, OP_LAYER)}
    assert _cycles(op_layer) == []


def test_no_import_cycles_through_function_level_imports():
    assert _cycles(_graph(function_level=True)) == []


def test_kernels_import_nothing_above_masks():
    graph = _graph(function_level=True)
    for m, targets in graph.items():
        if _in(m, ("dalle_fast.kernels",)):
            above = {t for t in targets if not _in(t, ("dalle_fast.kernels",)) and t not in KERNELS_MAY_IMPORT}
            assert not above, f"{m} imports {sorted(above)}"


def test_op_modules_import_no_module_above_them():
    # the op layer's bottom: _checks (over masks), then ops._backend, then the op modules
    graph = _graph(function_level=True)
    assert graph["dalle_fast._checks"] <= {"dalle_fast.masks"}
    assert graph["dalle_fast.ops._backend"] <= {"dalle_fast._checks"}
    for m in ("dalle_fast.ops.attention", "dalle_fast.ops.decode", "dalle_fast.ops.sampling", "dalle_fast.ops._triton"):
        assert not {t for t in graph[m] if t == "dalle_fast.ops" or t in ("dalle_fast.decode", "dalle_fast.sampling",
                                                                           "dalle_fast._triton_ops")}, m
