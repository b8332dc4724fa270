"""The built book as a browser shows it: a small book (chapters 00 and 05 executed at smoke
size, the landing page, the thesis page) is built into a temporary folder with
scripts/build_book.py and opened in headless, offline Chromium by scripts/check_book_browser.py.
Every page must have its title and heading and no broken image, its math typeset by the MathJax
that ships with the book (chapter 05 opens with the stage-I loss), and no warning, progress
residue or empty box in its outputs; the landing page's screenshot must not be blank. A second
test breaks an image, a heading, the MathJax files and an output box on purpose and checks that
the checker notices.

Needs Chromium (Debian: ``apt-get install -y --no-install-recommends chromium``). Without it the
tests are skipped, unless ``KDLIB_REQUIRE_BROWSER=1`` (set by .ci/run), where they fail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import check_book_browser as cbb  # noqa: E402

# executed at smoke size; chapter 00 has a figure, an audio player and tables, chapter 05 math
# and a training run (the progress bar that used to fill the page with lines)
CHAPTERS = ["00", "05"]

pytestmark = pytest.mark.browser


def _chromium() -> str:
    try:
        return cbb.find_chromium()
    except cbb.BrowserError as err:
        if os.environ.get("KDLIB_REQUIRE_BROWSER") == "1":
            pytest.fail(str(err))
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def small_book(tmp_path_factory):
    """``(book folder, html folder)`` of a smoke-size book built by scripts/build_book.py."""
    _chromium()
    book = tmp_path_factory.mktemp("book")
    cmd = [sys.executable, str(ROOT / "scripts" / "build_book.py"), "--preset", "smoke",
           "--only", *CHAPTERS, "--out", str(book)]
    # MPLBACKEND=Agg (conftest) is inherited on purpose: build_book.py must still get figures
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"build_book.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    html = book / "_build" / "html"
    assert (html / "index.html").is_file(), f"no index.html in {html}"
    return book, html


def test_every_page_has_its_title_and_no_broken_image(small_book):
    book, html = small_book
    screenshot = book / "_build" / "screenshots" / "index.png"
    results = cbb.check_book(html, screenshot, chromium=_chromium())
    pages = [r.page for r in results]
    assert pages[0] == "index.html" and "reproduce.html" in pages, pages
    chapter_pages = [p for p in pages if p.startswith("chapters/")]
    assert chapter_pages == ["chapters/00_tour.html", "chapters/05_stage1_kd.html"], chapter_pages
    problems = [f"{r.page}: {p}" for r in results for p in r.problems]
    assert not problems, "\n".join(problems)
    by_page = {r.page: r for r in results}
    tour = by_page["chapters/00_tour.html"]
    assert tour.h1 == "00 · A tour: teacher, student, a few distillation steps"
    assert "00 · A tour" in tour.title
    assert by_page["index.html"].h1 == "Distilling Whisper: a runnable book"
    # the loss plot is rendered, and the browser decoded it at its real size
    figures = [i for i in tour.images if i["width"] >= 200 and i["height"] >= 100]
    assert figures, f"no figure on the tour page: {tour.images}"
    # math: typeset offline by the vendored MathJax (the problems above would name raw TeX)
    stage1 = by_page["chapters/05_stage1_kd.html"]
    assert stage1.formulas >= 1 and stage1.typeset == stage1.formulas, (stage1.formulas, stage1.typeset)
    # outputs: the training cells printed, and none of it is a warning or a progress bar
    assert len(stage1.outputs) >= 5, stage1.outputs
    assert not cbb.output_problems(stage1.outputs + tour.outputs)
    assert cbb.screenshot_problem(screenshot) is None
    assert screenshot.stat().st_size > 10_000, "the landing page's screenshot is suspiciously small"


def test_checker_reports_broken_images_and_headings(small_book, tmp_path):
    """The same book with one figure file corrupted and the thesis page's heading removed."""
    _, html = small_book
    broken = tmp_path / "book" / "_build" / "html"
    shutil.copytree(html, broken)
    for name in ("_toc.yml",):
        shutil.copy2(html.parent.parent / name, broken.parent.parent / name)
    shutil.copytree(html.parent.parent / "chapters", broken.parent.parent / "chapters")

    tour = cbb.check_book(broken, tmp_path / "shot.png", chromium=_chromium(),
                          pages=["chapters/00_tour.html"])[0]
    figure = next(i for i in tour.images if i["width"] >= 200 and not i["src"].startswith("data:"))
    target = cbb._local_image(broken, "chapters/00_tour.html", figure["url"])
    assert target is not None and target.is_relative_to(broken), target
    target.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png any more")
    thesis_page = broken / "reproduce.html"
    thesis_page.write_text(re.sub(r"<h1>.*?</h1>", "", thesis_page.read_text(), flags=re.S))
    # no MathJax files: as the page was offline with the CDN MathJax
    shutil.rmtree(broken / "_static" / "mathjax")
    # a warning box and a stream of progress lines in the tour's first output box
    tour_page = broken / "chapters" / "00_tour.html"
    noise = ('<div class="output stderr"><pre>/x/.venv/lib/python3.11/site-packages/y.py:1: '
             'FutureWarning: deprecated</pre></div><div class="output stream"><pre>'
             + "".join(f"stage 1: {i}%|#  | {i}/100 [00:01<00:09, 9.1it/s]\n" for i in range(0, 100, 4))
             + "</pre></div>")
    html_text = tour_page.read_text()
    assert '<div class="cell_output docutils container">' in html_text
    tour_page.write_text(html_text.replace('<div class="cell_output docutils container">',
                                           '<div class="cell_output docutils container">' + noise, 1))

    results = {r.page: r for r in cbb.check_book(broken, tmp_path / "shot.png", chromium=_chromium())}
    assert any("broken image" in p for p in results["chapters/00_tour.html"].problems), \
        results["chapters/00_tour.html"].problems
    assert "no <h1> heading" in results["reproduce.html"].problems, results["reproduce.html"].problems
    stage1 = results["chapters/05_stage1_kd.html"].problems
    assert any("formulas not typeset (MathJax did not load)" in p for p in stage1), stage1
    assert any("raw TeX" in p and "mathcal" in p for p in stage1), stage1
    tour_problems = results["chapters/00_tour.html"].problems
    assert any("hold a warning" in p and "FutureWarning" in p for p in tour_problems), tour_problems
    assert any("lines of progress bars" in p for p in tour_problems), tour_problems
    assert not results["index.html"].problems

    # the command-line entry point fails on it too
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_book_browser.py"),
                           "--html", str(broken), "--screenshot", str(tmp_path / "cli.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "broken image" in done.stdout


def _latex_of(book, builder: str):
    """Build ``book`` (already executed) with ``builder`` (latex or pdflatex); the .tex or .pdf."""
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(book), "--builder", builder]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{builder} build failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    suffix = "pdf" if builder == "pdflatex" else "tex"
    found = sorted((book / "_build" / "latex").glob(f"*.{suffix}"))
    assert found, f"no .{suffix} in {book / '_build' / 'latex'}"
    return found[0]


def _check_text(document):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_book_pdf.py"), str(document)],
                          capture_output=True, text=True, timeout=300)


def test_latex_of_the_small_book_has_no_progress_warning_or_machine_path(small_book):
    """The PDF appendix's text, checked on its LaTeX source (no TeX needed): the same executed
    chapters as the HTML above."""
    book, _ = small_book
    done = _check_text(_latex_of(book, "latex"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.skipif(shutil.which("latexmk") is None or shutil.which("pdftotext") is None,
                    reason="needs the TeX packages and poppler-utils of README's PDF section")
def test_pdf_of_the_small_book_reads_cleanly(small_book):
    book, _ = small_book
    done = _check_text(_latex_of(book, "pdflatex"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
