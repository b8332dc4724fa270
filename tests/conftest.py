"""Shared pytest set-up: a headless matplotlib and paths of the repository."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def pytest_collection_modifyitems(config, items):
    """A chapter collected by nbval (`make test`: ``pytest --nbval-lax tests build/nbval``) runs
    there, once; its papermill test (tests/test_notebooks.py) is skipped instead of running it twice."""
    import pytest

    by_nbval = {Path(str(item.fspath)).name for item in items if str(item.fspath).endswith(".ipynb")}
    if not by_nbval:
        return
    for item in items:
        nb = getattr(item, "callspec", None) and item.callspec.params.get("nb")
        if item.get_closest_marker("notebook") and nb is not None and Path(nb).name in by_nbval:
            item.add_marker(pytest.mark.skip(reason=f"{Path(nb).name} runs as nbval items (pytest --nbval-lax)"))
