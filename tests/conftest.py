"""Shared pytest set-up: a headless matplotlib and paths of the repository."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


# The longest test files, longest first (measured on a 2-core CPU: the thesis-tiny chain, the
# chapters that train at smoke size, the browser check that builds a book). `make test` runs two
# pytest workers that take whole files in collection order (``--dist loadfile``): starting the
# long ones first keeps one worker from finishing alone with a long file at the end.
LONG_FIRST = ("test_notebooks_thesis.py", "11_distil_whisper_recipe.ipynb", "09_search_and_ablations.ipynb",
              "07_stage3_decoder.ipynb", "test_book_browser.py", "test_evaluate.py", "test_models.py",
              "08_evaluation.ipynb", "05_stage1_kd.ipynb", "test_train.py", "10_latent_space.ipynb",
              "06_stage2_alignment.ipynb", "test_reproduce_page.py", "test_benchmarks.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    """Long test files first (`LONG_FIRST`; the order inside a file is kept, so a chapter's nbval
    cells stay in order). A chapter collected by nbval (`make test`: ``pytest --nbval-lax tests
    build/nbval``) runs there, once; its papermill test (tests/test_notebooks.py) is skipped
    instead of running it twice."""
    import pytest

    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))

    by_nbval = {Path(str(item.fspath)).name for item in items if str(item.fspath).endswith(".ipynb")}
    if not by_nbval:
        return
    for item in items:
        nb = getattr(item, "callspec", None) and item.callspec.params.get("nb")
        if item.get_closest_marker("notebook") and nb is not None and Path(nb).name in by_nbval:
            item.add_marker(pytest.mark.skip(reason=f"{Path(nb).name} runs as nbval items (pytest --nbval-lax)"))
