"""Imports run one way: every import inside the package (module level and inside functions, plus the
names a package's lazy exports resolve) goes from a higher layer to a lower one of the order written in
docs/architecture.md, and no set of modules imports itself round in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megatron_elastic"
DOC = REPO / "docs" / "architecture.md"


def read_layers() -> dict[str, int]:
    """``{"megatron_elastic.model": 3, ...}`` from the fenced block under '## Layers' of the doc."""
    text = DOC.read_text()
    section = text.split("## Layers", 1)[1]
    block = section.split("```", 2)[1]
    layers: dict[str, int] = {}
    for line in block.splitlines():
        m = re.match(r"\s*(\d+)\s+(megatron_elastic[\w.]*(?:\s*,\s*megatron_elastic[\w.]*)*)", line)
        if m:
            for name in re.split(r"\s*,\s*", m.group(2)):
                layers[name] = int(m.group(1))
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module ``name`` imports, wherever the statement stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:  # an attribute of a module -> the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_elastic"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if not module.startswith("megatron_elastic"):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in modules else module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports" and len(node.args) == 3:
            exports = node.args[2]
            if isinstance(exports, ast.Dict):  # a package's lazy face: name -> module it resolves from
                for value in exports.values:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        target = value.value
                        add(name + target if target.startswith(".") else target)
    return found


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest listed name that is ``module`` or a package above it."""
    probe = module
    while probe:
        if probe in layers:
            return layers[probe]
        probe = probe.rpartition(".")[0]
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_doc_lists_every_package_and_top_level_module():
    layers = read_layers()
    assert len(layers) >= 15, layers
    missing = []
    for name in package_modules():
        if name == "megatron_elastic":  # the package face (lazy exports) stands above every layer
            continue
        if layer_of(name, layers) is None:
            missing.append(name)
    assert not missing, f"modules with no layer in docs/architecture.md: {missing}"


def test_no_import_climbs_to_a_higher_layer(graph):
    layers = read_layers()
    climbing = []
    for source, targets in graph.items():
        if source == "megatron_elastic":
            continue
        src_layer = layer_of(source, layers)
        for target in targets:
            if target == "megatron_elastic":
                climbing.append(f"{source} -> {target} (the package face)")
                continue
            same_package = source.split(".")[:2] == target.split(".")[:2]
            tgt_layer = layer_of(target, layers)
            if same_package:
                continue
            if tgt_layer >= src_layer:
                climbing.append(f"{source} (layer {src_layer}) -> {target} (layer {tgt_layer})")
    assert not climbing, "imports that do not go down the layer order:\n" + "\n".join(sorted(climbing))


def test_no_import_cycle(graph):
    # Tarjan's strongly connected components over module -> imported module.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walker_sees_imports_inside_functions():
    """The checks above are only as good as the walk: a function-level import is found."""
    modules = package_modules()
    found = imports_of("megatron_elastic.api", PACKAGE / "api.py", modules)
    source = (PACKAGE / "api.py").read_text()
    inner = re.findall(r"^\s{4,}from (megatron_elastic[\w.]*) import", source, flags=re.M)
    assert inner, "api.py imports inside functions (the case this test is about)"
    for module in inner:
        assert any(t == module or t.startswith(module + ".") for t in found), (module, found)
