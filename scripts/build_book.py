"""Execute every chapter headless with papermill, then build the Jupyter Book HTML.

    python scripts/build_book.py                 # all chapters at their defaults, then HTML
    python scripts/build_book.py -p preset smoke # pass papermill parameters to every chapter
    python scripts/build_book.py --only 01 02    # a subset (by number prefix)
    python scripts/build_book.py --html-only     # render what is already executed
    python scripts/build_book.py --preset smoke --only 00 01 --out /tmp/book   # a small book elsewhere
    python scripts/build_book.py --html-only --only 05 06 07 --out build/appendix --builder pdflatex

Executed copies go to book/chapters/NN_topic.ipynb (git-ignored), never over the paired notebook.
A chapter that fails stops the build with the chapter's name and the failing cell.

After the chapters ran, every number their prose states (marked ``<!-- results: KEY -->``) is
compared with the chapter's ``<out_dir>/results.json`` (scripts/check_claims.py) before any HTML
is built: a disagreement stops the build naming the chapter, the prose and the result. The
prose states demo-size numbers: at another preset (smoke, thesis) only the keys are checked.

With ``--out DIR`` the book is built in DIR instead of book/: the book's sources (config, landing
page, other pages) are copied there, the selected chapters are executed into DIR/chapters (each
with ``out_dir`` = DIR/runs/NN_topic unless ``-p out_dir`` is given) or, with ``--html-only``,
copied from book/chapters, and DIR/_toc.yml lists only those chapters. The HTML lands in
DIR/_build/html, a PDF (``--builder pdflatex``) in DIR/_build/latex/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BOOK = ROOT / "book"
EXECUTED = BOOK / "chapters"
# Set for the chapter kernels: an executed notebook keeps every redraw of a text progress bar as
# a line of output, so kdlib's bars (kdlib.progress) and Hugging Face's are off in papermill runs.
KERNEL_ENV = {"KDLIB_PROGRESS": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# A chapter never opens another chapter's folder by itself: the runs it builds on are parameters
# (None: it trains them itself). The book passes the runs of its own earlier chapters:
# parameter → (chapter prefix, run folder inside that chapter's out_dir).
UPSTREAM = {
    "06": {"prev_run": ("05", "stage1")},
    "07": {"stage1_run": ("05", "stage1"), "ce_only_run": ("05", "ce_only"), "stage2_run": ("06", "stage2")},
    "08": {"stage0_run": ("05", "stage0"), "ce_only_run": ("05", "ce_only"), "stage1_run": ("05", "stage1"),
           "stage3_run": ("07", "stage3")},
    "10": {"run_dir": ("07", "stage3")},
    "11": {"reference_run": ("07", "stage3")},
}


def chapters(only: list[str] | None = None) -> list[Path]:
    """The paired notebooks in chapter order (``notebooks/NN_topic.ipynb``)."""
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.name.startswith(o) for o in only)]
    return found


def upstream_parameters(notebook: Path, runs_root: Path, params: dict) -> dict:
    """The earlier chapters' run folders under ``runs_root`` (``runs_root/NN_topic/<run>``) as
    this chapter's parameters (`UPSTREAM`), unless ``params`` already sets them. A folder that
    does not exist is passed too: the chapter then trains that run itself."""
    stems = {p.stem[:2]: p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
    wired = {}
    for name, (chapter, run) in UPSTREAM.get(notebook.stem[:2], {}).items():
        if name not in params and chapter in stems:
            # relative to notebooks/ (papermill's working directory) when inside the repository: the
            # injected-parameters cell of the book then shows no path of the build machine
            folder = runs_root / stems[chapter] / run
            wired[name] = (os.path.relpath(folder, NOTEBOOKS) if folder.resolve().is_relative_to(ROOT)
                           else str(folder))
    return wired


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
    # The kernel inherits our environment. MPLBACKEND=Agg (exported by the Makefile and the
    # tests for headless scripts) would make plt.show() draw nothing in the kernel, and the
    # book would have no figures: let the kernel use its inline backend instead.
    saved_backend = os.environ.pop("MPLBACKEND", None)
    saved_env = {name: os.environ.get(name) for name in KERNEL_ENV}
    os.environ.update(KERNEL_ENV)
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
    finally:
        if saved_backend is not None:
            os.environ["MPLBACKEND"] = saved_backend
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    print(f"== {notebook.stem}: done in {time.perf_counter() - start:.0f} s", flush=True)
    return target


def chapter_out_dir(notebook: Path, parameters: dict) -> Path:
    """Where the chapter wrote its results: the ``out_dir`` passed, else its parameters cell's
    default (relative to notebooks/, papermill's working directory)."""
    import ast
    import json

    if "out_dir" in parameters:
        return (notebook.parent / str(parameters["out_dir"])).resolve()
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "out_dir":
            return (notebook.parent / node.value.value).resolve()
    raise SystemExit(f"{notebook}: no out_dir in the parameters cell")


def check_stated_numbers(done: list[tuple[Path, Path]], preset: str | None, warn_only: bool = False) -> None:
    """Compare every executed chapter's marked prose numbers with its results.json; stop the
    build naming both when they disagree (``warn_only``: print them and go on). ``done``:
    (paired notebook, its out_dir)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import check_claims

    keys_only = preset not in (None, "demo")  # the prose states demo-size numbers
    problems = []
    for notebook, out_dir in done:
        found = check_claims.check(notebook, out_dir / "results.json", keys_only=keys_only)
        problems += found
        if not found:
            print(f"== {notebook.stem}: {len(check_claims.chapter_claims(notebook))} stated numbers "
                  f"{'have their results keys' if keys_only else 'agree with'} {out_dir / 'results.json'}")
    if not problems:
        return
    report = ("the prose and the results disagree (fix the prose or the chapter; "
              "scripts/check_claims.py explains the markers):\n  " + "\n  ".join(problems))
    if warn_only:
        print(f"== WARNING (--claims warn, the book is built anyway): {report}", flush=True)
        return
    raise SystemExit(report + "\nThe executed chapters are kept in book/chapters. On another CPU or torch "
                     "build a measured number can differ in its last digit: `python scripts/build_book.py "
                     "--html-only` renders them as they are, `--claims warn` reports instead of stopping.")


def prepare_book(out: Path, selected: list[Path]) -> Path:
    """Copy book/'s sources to ``out`` with a _toc.yml that lists only the ``selected`` chapters."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    for item in BOOK.iterdir():
        if item.name in ("_build", "chapters", "_toc.yml") or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
    keep = {f"chapters/{p.stem}" for p in selected}
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    for part in toc.get("parts", []):
        part["chapters"] = [c for c in part.get("chapters", [])
                            if not str(c.get("file", "")).startswith("chapters/") or c["file"] in keep]
    toc["parts"] = [part for part in toc.get("parts", []) if part["chapters"]]
    (out / "_toc.yml").write_text("# Written by scripts/build_book.py --out: book/_toc.yml, selected chapters only.\n"
                                  + yaml.safe_dump(toc, sort_keys=False))
    return out


def build(book: Path = BOOK, builder: str = "html") -> Path:
    """Render ``book`` with Jupyter Book 1.x (execution off): HTML into ``book/_build/html``, or
    a PDF with ``builder="pdflatex"`` (its LaTeX source only with ``"latex"``) into
    ``book/_build/latex``."""
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(book), "--keep-going"]
    if builder != "html":
        cmd += ["--builder", builder]
    print("== jupyter-book:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    if builder == "html":
        result = book / "_build" / "html" / "index.html"
    else:
        suffix = "pdf" if builder == "pdflatex" else "tex"
        found = sorted((book / "_build" / "latex").glob(f"*.{suffix}"))
        result = found[0] if found else book / "_build" / "latex" / f"(no {suffix})"
    if not result.exists():
        raise SystemExit(f"jupyter-book finished but {result} is missing")
    print(f"== book: {result}")
    return result


def build_html(book: Path = BOOK) -> Path:
    """Render ``book`` (default book/) into ``book/_build/html``; returns its index.html."""
    return build(book, "html")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--only", nargs="*", help="chapter number prefixes, e.g. 01 02")
    parser.add_argument("--no-html", action="store_true", help="execute chapters, skip the HTML")
    parser.add_argument("--html-only", action="store_true",
                        help="render already executed chapters (from book/chapters), execute nothing")
    parser.add_argument("--preset", help="shorthand for -p preset NAME (smoke, demo, thesis)")
    parser.add_argument("--out", type=Path, help="build the book in this folder instead of book/")
    parser.add_argument("--builder", default="html", choices=["html", "pdflatex", "latex"],
                        help="html (default), pdflatex (needs the TeX packages, see README) or latex "
                             "(the .tex only, no TeX needed; scripts/check_book_pdf.py checks its text)")
    parser.add_argument("--claims", default="fail", choices=["fail", "warn"],
                        help="when the prose's marked numbers disagree with results.json: stop before "
                             "the HTML (fail, default) or print the disagreements and build anyway (warn)")
    args = parser.parse_args(argv)
    params = {name: _parse_value(value) for name, value in args.parameter}
    if args.preset:
        params["preset"] = args.preset
    selected = chapters(args.only)
    if args.only and not selected:
        raise SystemExit(f"no chapter in {NOTEBOOKS} starts with {' or '.join(args.only)}")
    book, executed = BOOK, EXECUTED
    if args.out:
        book = prepare_book(args.out.resolve(), selected)
        executed = book / "chapters"
    if args.html_only:
        if args.out:
            executed.mkdir(parents=True, exist_ok=True)
            for notebook in selected:
                done = EXECUTED / notebook.name
                if not done.exists():
                    raise SystemExit(f"{done} does not exist: execute the chapter first "
                                     f"(python scripts/build_book.py --no-html --only {notebook.stem[:2]})")
                shutil.copy2(done, executed / notebook.name)
    else:
        done = []
        for notebook in selected:
            chapter_params = dict(params)
            if args.out and "out_dir" not in params:
                chapter_params["out_dir"] = str(book / "runs" / notebook.stem)
            if "out_dir" not in params:  # every chapter in its own folder under one runs root
                runs_root = book / "runs" if args.out else ROOT / "runs"
                chapter_params.update(upstream_parameters(notebook, runs_root, params))
            execute(notebook, chapter_params, executed)
            done.append((notebook, chapter_out_dir(notebook, chapter_params)))
        check_stated_numbers(done, params.get("preset"), warn_only=args.claims == "warn")
    if not args.no_html:
        build(book, args.builder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
