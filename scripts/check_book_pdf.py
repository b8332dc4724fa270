"""Check the text of the book's PDF (or its LaTeX source) for what a reader should not see.

    python scripts/check_book_pdf.py book/_build/latex/kdlib-book.pdf     # after `make pdf`
    python scripts/check_book_pdf.py book/_build/latex/kdlib-book.tex     # LaTeX only, no TeX needed

Fails (exit status 1, each problem printed with its page or line) on:

- progress-bar lines (tqdm's ``37%|███▋ | 111/300 [00:12<00:20, 9.1it/s]``), the same pattern
  the browser check counts in HTML outputs (scripts/check_book_browser.py);
- warnings: ``FutureWarning``, ``UserWarning``, ``TqdmWarning``... and ``warnings.warn(``;
- absolute paths of the build machine: ``.../.venv/lib/...``, ``site-packages/``, and this
  repository's own absolute path.

The PDF's text comes from ``pdftotext -layout`` (poppler-utils) when it is on PATH, else from
pypdf when it is installed. The thesis appendix is handed in as it is built, so it must read as
cleanly as the HTML book.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_book_browser import PROGRESS_LINE  # noqa: E402

# A Python warning as printed ("FutureWarning: ...", "  warnings.warn("); not the book's own
# "Warning:" admonition titles.
WARNING = re.compile(r"\b\w+Warning\b|warnings\.warn\(")

# the build machine's paths: a virtual environment, installed packages, this checkout
MACHINE_PATH = re.compile(r"/\.venv/|\bsite-packages/|\bdist-packages/|" + re.escape(ROOT.as_posix() + "/"))


# Pygments' escapes in the LaTeX of code and outputs (sphinx/highlighting.py), and Sphinx's own
TEX_ESCAPES = {"bs": "\\", "us": "_", "ob": "{", "cb": "}", "ca": "^", "am": "&", "lt": "<", "gt": ">",
               "sh": "#", "pc": "%", "dl": "$", "hy": "-", "sq": "'", "dq": '"', "ti": "~", "lb": "[",
               "rb": "]", "at": "@"}


def tex_to_text(tex: str) -> str:
    """LaTeX source with the escapes of verbatim blocks undone (``\\PYGZhy{}`` → ``-``), so that
    a line of output reads as it does in the PDF."""
    tex = re.sub(r"\\PYGZ([a-z]{2})\{\}", lambda m: TEX_ESCAPES.get(m[1], m[0]), tex)
    tex = tex.replace("\\sphinxhyphen{}", "-")
    return re.sub(r"\\([_%$#&{}])", r"\1", tex)


def text_problems(pages: list[str]) -> list[str]:
    """``page N: what`` for every progress line, warning and machine path in ``pages`` (the
    text of each page, or of the whole document as one page)."""
    problems = []
    for number, text in enumerate(pages, 1):
        for line in re.split(r"[\r\n]+", text):
            shown = line.strip()[:100]
            if PROGRESS_LINE.search(line):
                problems.append(f"page {number}: progress line {shown!r}")
            elif WARNING.search(line):
                problems.append(f"page {number}: warning {shown!r}")
            if MACHINE_PATH.search(line):
                problems.append(f"page {number}: build machine path {shown!r}")
    return problems


def pdf_pages(pdf: Path) -> list[str]:
    """The text of each page of ``pdf``: pdftotext if available, else pypdf."""
    if shutil.which("pdftotext"):
        done = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                              check=True)
        return done.stdout.split("\f")
    try:
        import pypdf
    except ImportError:
        raise SystemExit("no PDF text extractor: install poppler-utils (pdftotext) or pypdf") from None
    return [page.extract_text() or "" for page in pypdf.PdfReader(str(pdf)).pages]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("document", type=Path, help="the built PDF, or the .tex the latex builder wrote")
    args = parser.parse_args(argv)
    if not args.document.is_file():
        raise SystemExit(f"{args.document} does not exist: build it first (make pdf)")
    if args.document.suffix == ".pdf":
        pages = pdf_pages(args.document)
    else:  # LaTeX: one "page" per line, so that the line number is the page number printed
        pages = tex_to_text(args.document.read_text(errors="replace")).splitlines()
    problems = text_problems(pages)
    unit = "page" if args.document.suffix == ".pdf" else "line"
    for problem in problems[:50]:
        print(problem.replace("page ", f"{unit} ", 1))
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more")
    print(f"{args.document}: {len(pages)} {unit}s, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
