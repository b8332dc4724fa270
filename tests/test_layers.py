"""The house's layer order, enforced: every kdlib import, at module top or inside a function,
points down (docs/CONVENTIONS.md draws the same picture).

A module may import modules of lower layers only: no import points up, none sideways inside a
layer, so the module graph has no circle. Imports of kdlib modules sit at the top of the module;
only the CLI (`kdlib.__main__`) keeps a few lazy ones, so that ``python -m kdlib --help`` answers
without importing torch, transformers and peft. They are named in `LAZY`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

KDLIB = ROOT / "kdlib"

#: Bottom to top. A module imports only from the layers below its own.
LAYERS: list[set[str]] = [
    {"files", "progress", "text"},
    {"config"},
    {"frames", "distributed"},
    {"data"},
    {"ct2"},
    {"models"},
    {"losses"},
    {"teacher_cache"},
    {"caches", "runs", "decode"},
    {"distill"},
    {"train", "evaluate", "viz"},
    {"pseudo", "tune", "longform"},
    {"__main__"},
]
#: The package face (``kdlib/__init__.py``: version, cache folder) is below every layer.
FACE = "__init__"
#: Function-level kdlib imports kept on purpose: the CLI imports a subcommand's module only when
#: that subcommand runs (``--help`` stays fast and needs no torch).
LAZY = {"__main__"}

LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def kdlib_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported kdlib module, line, at module top?)`` for every kdlib import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == "kdlib" or node.module.startswith("kdlib.")):
            if node.module == "kdlib":  # from kdlib import data, models / cache_dir
                for alias in node.names:
                    name = alias.name if (KDLIB / f"{alias.name}.py").is_file() else FACE
                    found.append((name, node.lineno, id(node) in top))
            else:
                found.append((node.module.split(".")[1], node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kdlib":
                    found.append((FACE, node.lineno, id(node) in top))
                elif alias.name.startswith("kdlib."):
                    found.append((alias.name.split(".")[1], node.lineno, id(node) in top))
    return found


def modules() -> list[Path]:
    return sorted(KDLIB.glob("*.py"))


def test_every_module_has_a_layer():
    names = {p.stem for p in modules()} - {FACE}
    assert names == set(LAYER_OF), (
        f"modules without a layer: {sorted(names - set(LAYER_OF))}; "
        f"layers naming no module: {sorted(set(LAYER_OF) - names)}")


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_imports_point_down(path):
    me = path.stem
    edges = kdlib_imports(path)
    if me == FACE:
        assert edges == [], f"kdlib/__init__.py imports {edges}: the package face must import no kdlib module"
        return
    upward = [f"line {line}: {me} (layer {LAYER_OF[me]}) imports {other} (layer {LAYER_OF[other]})"
              for other, line, _ in edges if other != FACE and LAYER_OF[other] >= LAYER_OF[me]]
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_kdlib_imports_at_module_top(path):
    if path.stem in LAZY:
        return
    lazy = [f"line {line}: {other}" for other, line, at_top in kdlib_imports(path) if not at_top]
    assert not lazy, f"{path.name} imports kdlib modules inside functions (move them to the top):\n" + "\n".join(lazy)


def test_the_walker_sees_function_level_and_upward_imports(tmp_path):
    """The checks above could pass by reading nothing: the walker finds both kinds of import."""
    sample = tmp_path / "sample.py"
    sample.write_text("from kdlib.config import TrainConfig\n\n"
                      "def f():\n    from kdlib import train, cache_dir\n    import kdlib.evaluate\n")
    assert kdlib_imports(sample) == [("config", 1, True), ("train", 4, False), (FACE, 4, False),
                                     ("evaluate", 5, False)]


def test_no_circles():
    """The graph of module-level and function-level imports has no cycle (implied by the layers,
    checked on its own so that a wrong layer table cannot hide one)."""
    graph = {p.stem: {o for o, _, _ in kdlib_imports(p) if o != FACE and o != p.stem} for p in modules()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
