"""The package's parts import each other in one direction only.

Every module of `modelfold` belongs to a part: its subpackage (`modelfold.graph`, ...), its
top-level module (`modelfold.record`, ...) or the package root (`modelfold/__init__.py`). Parts
sit in the layers below, lowest first; a module may import its own part, parts of its own layer
and parts of lower layers, never a higher layer, and the part graph has no cycle; nor has the
graph of modules (so `io.folder` and `io.hf`, say, cannot import each other). Imports inside
functions count too: an upward one is allowed only where `ALLOWED_UPWARD` names it, with the
reason it is needed.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "modelfold"
SRC = Path(__file__).parent.parent / "src" / PACKAGE

LAYERS: list[set[str]] = [
    # foundation: errors, records, folder files, the name -> strategy registry, cache folders,
    # the MAC counter and latency timer
    {"errors", "version", "record", "files", "registry", "cache", "_optional", "macs",
     "latency"},
    {"data", "zoo"},  # datasets and model definitions
    {"graph"},  # channel groups and the per-layer rules they are made of
    {"cluster"},
    {"merge"},
    {"budget"},  # parameter budget -> channels kept per group (allocations)
    {"repair"},
    {"config"},
    {"calibrate", "llm", "graph_fold", "rounding"},  # fold pipelines
    {"api", "summary"},
    {"baselines", "io"},  # compression baselines; save and load
    {""},  # the package root: its public API
    {"cli", "cli_support", "eval", "__main__"},  # applications
]

# (importing module, imported part) -> why it must import upward, for lazy imports only.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

# Packages whose modules may import the package itself, with the reason.
ALLOWED_PACKAGE_CYCLES: dict[str, str] = {
    "modelfold.zoo": "its __init__ defines the model registry, then imports the model modules, "
                     "which register themselves in it",
}


def part_of(module: str) -> str:
    """`modelfold.graph.groups` -> "graph"; the package root -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(file: Path) -> str:
    rel = file.relative_to(SRC.parent).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imported_modules(node: ast.ImportFrom | ast.Import, module: str, is_package: bool
                     ) -> Iterator[str]:
    """The modelfold modules an import statement loads (names imported from a package that
    are its submodules count as those submodules)."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        return
    if node.level:  # relative: resolve against the importing module's package
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    if source.split(".")[0] != PACKAGE:
        return
    for alias in node.names:
        candidate = f"{source}.{alias.name}"
        path = SRC.parent.joinpath(*candidate.split("."))
        yield candidate if path.is_dir() or path.with_suffix(".py").is_file() else source


def imports(file: Path) -> Iterator[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every modelfold import of `file`."""
    module = module_name(file)
    tree = ast.parse(file.read_text(), str(file))

    def walk(node: ast.AST, lazy: bool) -> Iterator[tuple[str, bool, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(child, module, file.name == "__init__.py"):
                    yield target, lazy, child.lineno
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)

    yield from walk(tree, False)


def layer_index() -> dict[str, int]:
    return {part: i for i, layer in enumerate(LAYERS) for part in layer}


def violations(edges: list[tuple[str, str, bool, str]], allowed: dict[tuple[str, str], str]
               ) -> list[str]:
    """Upward imports and part cycles among `edges` = (importing module, imported module,
    lazy, where)."""
    layer = layer_index()
    found: list[str] = []
    graph: dict[str, set[str]] = {}
    for source, target, lazy, where in edges:
        a, b = part_of(source), part_of(target)
        for part in (a, b):
            if part not in layer:
                found.append(f"{where}: part {PACKAGE}.{part} is in no layer of LAYERS")
        if a == b or a not in layer or b not in layer:
            continue
        if layer[b] > layer[a]:
            if (source, b) not in allowed:
                found.append(f"{where}: {source} imports {target}, a higher layer")
                continue
            if not lazy:
                found.append(f"{where}: allowed upward import of {target} is not inside a "
                             "function")
            continue  # allowed upward imports stay out of the cycle check
        graph.setdefault(a, set()).add(b)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        found.append(f"import cycle between parts: {' -> '.join(exc.args[1])}")
    return list(dict.fromkeys(found))


def module_cycle(edges: list[tuple[str, str, bool, str]], allowed: dict[str, str]
                 ) -> list[str] | None:
    """A cycle of module imports, if any; a module importing its own package counts only for
    packages `allowed` does not name."""
    graph: dict[str, set[str]] = {}
    for source, target, _, _ in edges:
        if source == target or (target in allowed and source.startswith(f"{target}.")):
            continue
        graph.setdefault(source, set()).add(target)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def package_edges() -> list[tuple[str, str, bool, str]]:
    edges = []
    for file in sorted(SRC.rglob("*.py")):
        source = module_name(file)
        for target, lazy, line in imports(file):
            edges.append((source, target, lazy, f"{file.relative_to(SRC.parent)}:{line}"))
    return edges


def test_parts_import_downward_only_and_without_cycles():
    edges = package_edges()
    assert len(edges) > 100  # the parser found the imports
    assert violations(edges, ALLOWED_UPWARD) == []


def test_modules_import_each_other_without_cycles():
    assert module_cycle(package_edges(), ALLOWED_PACKAGE_CYCLES) is None


def test_the_module_check_finds_cycles():
    edges = [("modelfold.io.folder", "modelfold.io.hf", False, "f:1"),
             ("modelfold.io.hf", "modelfold.io.folder", True, "h:1")]
    assert module_cycle(edges, {}) is not None
    assert module_cycle(package_edges(), {}) is not None  # the zoo registry, when not allowed


def test_every_allowed_upward_import_is_still_needed():
    used = {(s, part_of(t)) for s, t, _, _ in package_edges()}
    assert set(ALLOWED_UPWARD) <= used


def test_every_part_of_the_package_is_in_a_layer():
    layer = layer_index()
    parts = {part_of(module_name(f)) for f in SRC.rglob("*.py")}
    assert parts <= set(layer), sorted(parts - set(layer))


@pytest.mark.parametrize(("edges", "message"), [
    ([("modelfold.graph.groups", "modelfold.merge.apply", False, "g:1")], "higher layer"),
    ([("modelfold.graph.groups", "modelfold.merge.apply", True, "g:1")], "higher layer"),
    ([("modelfold.io.hf", "modelfold.baselines", True, "h:1"),
      ("modelfold.baselines.llm", "modelfold.io", False, "b:1")], "cycle"),
    ([("modelfold.graph.x", "modelfold.nowhere", False, "g:1")], "in no layer"),
])
def test_the_check_finds_upward_imports_cycles_and_unknown_parts(edges, message):
    assert any(message in v for v in violations(edges, {}))


def test_an_allowed_upward_import_must_be_lazy():
    edge = ("modelfold.graph.groups", "modelfold.merge.apply", False, "g:1")
    allowed = {("modelfold.graph.groups", "merge"): "test"}
    assert any("not inside a function" in v for v in violations([edge], allowed))
    assert violations([(*edge[:2], True, edge[3])], allowed) == []


def test_relative_and_package_imports_are_resolved():
    tree = ast.parse("from . import groups\nfrom .. import record\nimport modelfold as mf\n"
                     "from modelfold import __version__, io\n")
    found = [t for node in tree.body
             for t in imported_modules(node, "modelfold.graph", is_package=True)]
    assert found == ["modelfold.graph.groups", "modelfold.record", "modelfold", "modelfold",
                     "modelfold.io"]
