"""Prepare the chapters for a test run: ``python tests/prepare_chapters.py OUT [--preset smoke]``.

Each ``notebooks/NN_*.ipynb`` is written to ``OUT/NN_*.ipynb`` by ``papermill --prepare-only``
(parameters injected, nothing executed), ready for ``pytest --nbval-lax OUT`` (what `make test`
runs) or for papermill (tests/test_notebooks.py). Parameters:

- ``preset`` (default ``smoke``);
- every path parameter whose default lies under the repository's ``runs/`` (``out_dir``,
  ``prev_run``, ``stage1_root``, ``runs_root``, ``run_dir``, ...) is pointed at the same place under
  ``OUT/runs/``, so a chapter builds the earlier runs it needs there instead of reusing the repo's;
- three cells are added: a first one that puts this checkout's ``kdlib`` first on ``sys.path`` and
  takes a snapshot (names and mtimes) of the repository's ``runs/``; one at the end that fails,
  naming the paths, if the chapter created, changed or removed anything there; and a last one
  that checks the chapter's ``<out_dir>/results.json`` (``tests/chapter_results.py``: every key
  its prose's markers name exists, ranges, exact values where the chapter is deterministic).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RUNS = ROOT / "runs"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))

GUARD_FIRST = f'''# test harness (tests/prepare_chapters.py): this checkout's kdlib; a snapshot of the repo's runs/
import sys as _sys
from pathlib import Path as _Path
_sys.path.insert(0, {str(ROOT)!r})
_REPO_RUNS = _Path({str(RUNS)!r})


def _runs_snapshot():
    if not _REPO_RUNS.exists():
        return {{}}
    return {{str(p.relative_to(_REPO_RUNS)): p.stat().st_mtime_ns for p in _REPO_RUNS.rglob("*")}}


_runs_before = _runs_snapshot()'''

GUARD_LAST = '''# test harness (tests/prepare_chapters.py): the chapter must not have touched the repo's runs/
_runs_after = _runs_snapshot()
_touched = sorted(k for k in set(_runs_before) | set(_runs_after) if _runs_before.get(k) != _runs_after.get(k))
assert not _touched, f"the chapter touched the repository's runs/ ({_REPO_RUNS}): {_touched[:10]}"'''


RESULTS_CHECK = '''# test harness (tests/prepare_chapters.py): the numbers the prose states exist in results.json
_sys.path.insert(0, {tests!r})
import chapter_results as _chapter_results
_chapter_results.assert_results({notebook!r}, _Path(out_dir) / "results.json")'''


def run_path_parameters(notebook: Path) -> dict[str, str]:
    """``name -> default`` for the parameters-cell assignments whose value is a string under ../runs."""
    nb = nbformat.read(str(notebook), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"{notebook}: no cell tagged parameters")
    found = {}
    for node in ast.parse(cells[0].source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                and node.value.value.replace("\\", "/").startswith("../runs")):
            found[node.targets[0].id] = node.value.value
    return found


def prepare(out: Path, preset: str = "smoke", chapters=None, parameters: dict | None = None,
            check_results: bool = True) -> list[Path]:
    """Write the prepared copies of ``chapters`` (default: all) into ``out``; returns their paths.
    ``parameters``: more values to inject (they win over the redirected run paths), e.g. the
    earlier chapters' runs a chapter takes as parameters. ``check_results=False`` leaves out the
    results check (for a chapter cut below its preset's size, whose results lack some parts)."""
    import papermill

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for notebook in chapters or CHAPTERS:
        params = {"preset": preset}
        for name, default in run_path_parameters(notebook).items():
            relative = Path(default.replace("\\", "/")).relative_to("../runs")
            params[name] = str(out / "runs" / relative)
        params.update(parameters or {})
        target = out / notebook.name
        papermill.execute_notebook(str(notebook), str(target), parameters=params, prepare_only=True,
                                   kernel_name="python3", language="python", progress_bar=False)
        nb = nbformat.read(str(target), as_version=4)
        nb.cells.insert(0, nbformat.v4.new_code_cell(GUARD_FIRST))
        nb.cells.append(nbformat.v4.new_code_cell(GUARD_LAST))
        if check_results:
            nb.cells.append(nbformat.v4.new_code_cell(RESULTS_CHECK.format(tests=str(ROOT / "tests"),
                                                                           notebook=str(notebook))))
        nbformat.write(nb, str(target))
        written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="smoke")
    args = parser.parse_args(argv)
    paths = prepare(args.out, args.preset)
    print(f"prepared {len(paths)} chapters at preset {args.preset} in {args.out} (nbval: pytest --nbval-lax {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
