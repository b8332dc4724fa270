"""Execute every chapter headless with papermill, then build the Jupyter Book HTML.

    python scripts/build_book.py                 # all chapters at their defaults, then HTML
    python scripts/build_book.py -p preset smoke # pass papermill parameters to every chapter
    python scripts/build_book.py --only 01 02    # a subset (by number prefix)
    python scripts/build_book.py --html-only     # render what is already executed

Executed copies go to book/chapters/NN_topic.ipynb (git-ignored), never over the paired notebook.
A chapter that fails stops the build with the chapter's name and the failing cell.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BOOK = ROOT / "book"
EXECUTED = BOOK / "chapters"


def chapters(only: list[str] | None = None) -> list[Path]:
    """The paired notebooks in chapter order (``notebooks/NN_topic.ipynb``)."""
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.name.startswith(o) for o in only)]
    return found


def _parse_value(text: str):
    """Papermill-style value parsing for ``-p name value``: int, float, bool, None, else str."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def execute(notebook: Path, parameters: dict, out_dir: Path = EXECUTED) -> Path:
    """Run one chapter with papermill; raise SystemExit naming the chapter and cell on failure."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / notebook.name
    start = time.perf_counter()
    print(f"== {notebook.stem}: executing", flush=True)
    try:
        pm.execute_notebook(
            str(notebook),
            str(target),
            parameters=parameters,
            kernel_name="python3",
            language="python",
            cwd=str(notebook.parent),
            progress_bar=False,
        )
    except pm.PapermillExecutionError as err:
        raise SystemExit(
            f"chapter {notebook.stem} failed in cell {err.exec_count} ({err.ename}: {err.evalue}).\n"
            f"The executed copy with the traceback is {target}"
        ) from None
    print(f"== {notebook.stem}: done in {time.perf_counter() - start:.0f} s", flush=True)
    return target


def build_html() -> Path:
    """Render book/ with Jupyter Book 1.x into book/_build/html (execution off)."""
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(BOOK), "--keep-going"]
    print("== jupyter-book:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    index = BOOK / "_build" / "html" / "index.html"
    if not index.exists():
        raise SystemExit(f"jupyter-book finished but {index} is missing")
    print(f"== book: {index}")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--only", nargs="*", help="chapter number prefixes, e.g. 01 02")
    parser.add_argument("--no-html", action="store_true", help="execute chapters, skip the HTML")
    parser.add_argument("--html-only", action="store_true", help="render already executed chapters")
    args = parser.parse_args(argv)
    params = {name: _parse_value(value) for name, value in args.parameter}
    if not args.html_only:
        for notebook in chapters(args.only):
            execute(notebook, params)
    if not args.no_html:
        build_html()
    return 0


if __name__ == "__main__":
    sys.exit(main())
