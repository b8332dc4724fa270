"""The house rules: jupytext pairs in sync, no committed outputs, one parameters cell per
notebook, the book's table of contents lists every chapter, the CLI answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jupytext
import pytest
import yaml

from conftest import NOTEBOOKS, ROOT

PY_SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
IPYNBS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_there_are_chapters():
    assert PY_SOURCES, "no notebooks/NN_topic.py found"


@pytest.mark.parametrize("src", PY_SOURCES, ids=lambda p: p.stem)
def test_every_source_has_its_pair(src):
    assert src.with_suffix(".ipynb").exists(), f"{src.name} has no paired .ipynb: run jupytext --sync"


#: The header line naming the jupytext release that last wrote a file: it changes with every
#: jupytext release while the notebook stays the same, so the pair check leaves it out.
JUPYTEXT_VERSION_LINE = re.compile(r"^#\s+jupytext_version: .*$", re.MULTILINE)


def without_tool_version(text: str) -> str:
    return JUPYTEXT_VERSION_LINE.sub("#     jupytext_version: (any)", text).strip()


@pytest.mark.parametrize("nb", IPYNBS, ids=lambda p: p.stem)
def test_pair_in_sync(nb):
    """The .ipynb rendered back to percent format must equal the reviewed .py source, apart from
    the jupytext release named in the header."""
    src = nb.with_suffix(".py")
    assert src.exists(), f"{nb.name} has no paired .py source"
    regenerated = jupytext.writes(jupytext.read(nb), fmt="py:percent")
    assert without_tool_version(regenerated) == without_tool_version(src.read_text()), (
        f"{nb.name} and {src.name} differ: run `jupytext --sync {src}`"
    )


def test_pair_check_ignores_only_the_tool_version():
    """A new jupytext release must not fail the pair check; a changed cell must."""
    src = PY_SOURCES[0].read_text()
    other_release = JUPYTEXT_VERSION_LINE.sub("#       jupytext_version: 99.0.0", src)
    assert other_release != src
    assert without_tool_version(other_release) == without_tool_version(src)
    edited = src.replace("# %%", "# %%\nx = 1", 1)
    assert without_tool_version(edited) != without_tool_version(src)


@pytest.mark.parametrize("nb", IPYNBS, ids=lambda p: p.stem)
def test_no_outputs_committed(nb):
    cells = json.loads(nb.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{nb.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("nb", IPYNBS, ids=lambda p: p.stem)
def test_one_parameters_cell_with_preset(nb):
    cells = json.loads(nb.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{nb.name}: {len(tagged)} cells tagged 'parameters' (papermill needs exactly one)"
    first_code = next(c for c in cells if c["cell_type"] == "code")
    assert first_code is tagged[0], f"{nb.name}: the parameters cell must be the first code cell"
    assert "preset" in "".join(tagged[0]["source"]), f"{nb.name}: parameters cell lacks `preset`"


@pytest.mark.parametrize("nb", IPYNBS, ids=lambda p: p.stem)
def test_chapter_frame(nb):
    """A chapter opens with a title, what it teaches and what it needs, and ends with a summary
    and exercises."""
    cells = json.loads(nb.read_text())["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# "), f"{nb.name}: no title cell"
    for heading in ("## What this chapter teaches", "## What it needs"):
        assert heading in first, f"{nb.name}: the first cell has no '{heading}' section"
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "## Summary" in text and "## Exercises" in text, f"{nb.name}: missing Summary/Exercises"


def _toc_files(node) -> list[str]:
    files = []
    if isinstance(node, dict):
        if "file" in node:
            files.append(node["file"])
        for value in node.values():
            files.extend(_toc_files(value))
    elif isinstance(node, list):
        for item in node:
            files.extend(_toc_files(item))
    return files


def test_toc_lists_every_chapter():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    listed = {f.split("/")[-1] for f in _toc_files(toc) if f.startswith("chapters/")}
    on_disk = {p.stem for p in IPYNBS}
    assert listed == on_disk, f"toc and notebooks/ differ: only in toc {listed - on_disk}, only on disk {on_disk - listed}"


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "kdlib", "--help"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    for command in ("corpus", "scan", "extract", "convert", "train", "evaluate", "export",
                    "pseudo-label", "pseudo-filter", "compare"):
        assert command in out, f"`python -m kdlib --help` does not list {command}"


def test_package_version():
    import kdlib

    assert kdlib.__version__.count(".") == 2
