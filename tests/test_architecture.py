"""The layout docs/architecture.md describes, held against the code: every import points down the
layers (or stays inside its own), no module imports itself round a circle, function-local imports of
the package only where start-up time asks for them (the commands and the command line), no source
file over 500 lines and no function over 80 without a comment saying why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "switchformer"

# bottom to top; a package may import from its own layer's other packages only where said below
LAYERS = [
    {"runs"},
    {"data", "moe", "runtime"},
    {"inference"},
    {"models"},
    {"interop"},
    {"parallel"},
    {"train"},
    {"analysis", "lifecycle"},
    {"serve"},
    {"commands"},
    {"cli", "__init__"},
    {"__main__"},
]
LOCAL_IMPORTS_ALLOWED = {"commands", "cli", "__init__"}  # start-up time: the parser loads no library code
LONG_FUNCTION_MARK = "long by design:"  # a comment inside a function over 80 lines says why


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0].removesuffix(".py")
        name = ".".join(("switchformer", *rel.with_suffix("").parts)).removesuffix(".__init__")
        yield path, name, top


def _layer(top: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def _imports(tree):
    """(module imported, whether the import is inside a function, line) of every switchformer import."""
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("switchformer"):
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("switchformer")]
        else:
            continue
        for target in targets:
            yield target, id(node) not in top_level, node.lineno


MODULES = {name: (path, top) for path, name, top in _modules()}


def _resolve(target: str) -> str | None:
    """The module an import names (``from pkg import mod`` names ``pkg.mod``)."""
    return target if target in MODULES else None


def test_every_import_points_down_the_layers():
    wrong = []
    for path, top in MODULES.values():
        for target, _, line in _imports(ast.parse(path.read_text())):
            module = _resolve(target)
            if module is None or module == "switchformer":
                continue
            other = MODULES[module][1]
            if other == top:
                continue
            if _layer(other) >= _layer(top) and top not in ("__init__",):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line}: {top} (layer {_layer(top)}) imports {module} "
                             f"(layer {_layer(other)})")  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_round_a_circle():
    graph = {name: set() for name in MODULES}
    for name, (path, _) in MODULES.items():
        for target, _, _ in _imports(ast.parse(path.read_text())):
            module = _resolve(target)
            if module and module != name and module != "switchformer":
                graph[name].add(module)
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_function_local_imports_only_where_start_up_time_asks():
    found = []
    for path, top in MODULES.values():
        if top in LOCAL_IMPORTS_ALLOWED:
            continue
        lines = path.read_text().split("\n")
        for target, local, line in _imports(ast.parse(path.read_text())):
            if local and "#" not in lines[line - 1]:
                found.append(f"{path.relative_to(PACKAGE)}:{line}: {target}")
    assert not found, "function-local imports without a comment saying why:\n" + "\n".join(sorted(set(found)))


def test_no_source_file_over_500_lines():
    long_files = [f"{p.relative_to(PACKAGE)} ({n})" for p, _, _ in _modules()
                  if (n := len(p.read_text().split("\n"))) > 500]  # fmt: skip
    assert not long_files, long_files


def test_no_function_over_80_lines_without_a_comment_saying_why():
    long_functions = []
    for path, _, _ in _modules():
        text = path.read_text()
        lines = text.split("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                if length > 80 and LONG_FUNCTION_MARK not in body:
                    long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length})")
    assert not long_functions, long_functions


@pytest.mark.parametrize("top", sorted({top for _, top in MODULES.values()}))
def test_every_package_has_its_layer(top):
    assert any(top in layer for layer in LAYERS), f"{top}: not in the layer list of docs/architecture.md"
