"""One way to show progress: `progress_bar`, the tqdm bar every kdlib loop uses.

- In JupyterLab (an IPython kernel with ipywidgets installed) it is a widget bar that updates in
  place; in a terminal, tqdm's text bar.
- With ``KDLIB_PROGRESS=0`` in the environment it draws nothing. scripts/build_book.py and the
  notebook tests set it for papermill: an executed notebook stores every redraw of a text bar as
  its own line, and the book would show hundreds of "stage 1: 37%" lines instead of one bar.
- It never imports ``tqdm.auto`` (which warns "IProgress not found" in a kernel without
  ipywidgets); without ipywidgets it falls back to the text bar, quietly.

The bar redraws at most every ``mininterval`` = 0.5 s (tqdm's default is 0.1 s), so a fast loop
does not flood a log file either. `bar.write(text)` prints a line without breaking the bar.
Lowest layer: imports nothing from kdlib.
"""

from __future__ import annotations

import importlib.util
import os

ENV = "KDLIB_PROGRESS"
OFF = ("0", "off", "false", "no")


def enabled() -> bool:
    """False when ``$KDLIB_PROGRESS`` says off (0, off, false, no): papermill runs of the book."""
    return os.environ.get(ENV, "").strip().lower() not in OFF


def _in_notebook_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar over ``iterable`` (same arguments as ``tqdm``); a widget bar in a notebook
    kernel with ipywidgets, a text bar elsewhere, a silent one when `enabled` is false or
    ``disable=True`` is passed."""
    kwargs.setdefault("mininterval", 0.5)
    if not enabled():
        kwargs["disable"] = True
    if not kwargs.get("disable") and _in_notebook_kernel() and importlib.util.find_spec("ipywidgets"):
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(iterable, **kwargs)
