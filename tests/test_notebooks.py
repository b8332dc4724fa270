"""Execute every chapter through papermill at `smoke` size (the README's main job runs them at
`demo` size). A failing chapter names its cell."""

from __future__ import annotations

import pytest

from conftest import NOTEBOOKS

import papermill

CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.notebook
@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_at_smoke_size(nb, tmp_path):
    out = tmp_path / nb.name
    try:
        papermill.execute_notebook(
            str(nb),
            str(out),
            parameters={"preset": "smoke", "out_dir": str(tmp_path / "out")},
            kernel_name="python3",
            language="python",
            cwd=str(NOTEBOOKS),
            progress_bar=False,
            execution_timeout=900,
        )
    except papermill.PapermillExecutionError as err:
        pytest.fail(f"{nb.stem} failed in cell {err.exec_count}: {err.ename}: {err.evalue}")
    assert out.exists()
