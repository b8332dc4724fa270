"""Execute every chapter at `smoke` size (the README's main job runs them at `demo` size), each
in isolation: `prepare_chapters.prepare` points every run path parameter into the test's
temporary folder and adds last cells that fail if the chapter touched the repository's
``runs/`` or if its ``results.json`` lacks a number its prose states, or holds one out of range
(tests/chapter_results.py). A failing chapter names its cell.

`make test` executes the chapters once, as nbval items (``pytest --nbval-lax`` over the copies
that ``tests/prepare_chapters.py`` writes); this papermill route then steps aside for every
chapter that nbval collected (see conftest.py) and runs them when pytest is called without them."""

from __future__ import annotations

import pytest

from prepare_chapters import CHAPTERS, prepare, run_path_parameters

import papermill


@pytest.mark.notebook
@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_at_smoke_size(nb, tmp_path):
    (prepared,) = prepare(tmp_path, "smoke", [nb])
    out = tmp_path / f"executed_{nb.name}"
    try:
        papermill.execute_notebook(
            str(prepared),
            str(out),
            kernel_name="python3",
            language="python",
            cwd=str(tmp_path),
            progress_bar=False,
            execution_timeout=900,
        )
    except papermill.PapermillExecutionError as err:
        pytest.fail(f"{nb.stem} failed in cell {err.exec_count}: {err.ename}: {err.evalue}")
    assert out.exists()


def test_every_run_path_parameter_is_redirected(tmp_path):
    """The isolation covers every chapter's ``../runs`` parameters: none survives preparation."""
    import nbformat

    for path in prepare(tmp_path, "smoke"):
        source = "\n".join(c.source for c in nbformat.read(str(path), as_version=4).cells
                           if "injected-parameters" in c.metadata.get("tags", []))
        names = run_path_parameters(CHAPTERS[[c.name for c in CHAPTERS].index(path.name)])
        assert "out_dir" in names, path.name
        for name in names:
            assert f"{name} = \"{tmp_path / 'runs'}" in source, (path.name, name, source)
        assert "preset = \"smoke\"" in source
