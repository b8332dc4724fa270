"""Open the built book in headless Chromium and check what a reader would see.

    python scripts/check_book_browser.py                      # book/_build/html
    python scripts/check_book_browser.py --html /tmp/b/_build/html --screenshot /tmp/b/index.png

For the landing page and every page of the table of contents (``_toc.yml`` next to ``_build``):

- the page exists and the browser loads it;
- its ``<title>`` and its first ``<h1>`` are not empty, and for a chapter the ``<h1>`` is the
  chapter's title (the first ``# `` line of its notebook);
- every ``<img>`` is loaded and decoded **by the browser** (``complete`` and ``naturalWidth > 0``
  after ``img.decode()``, lazy images forced to load), and a local ``src`` is a file inside the
  build that Pillow can decode;
- the landing page's screenshot is a PNG that is not blank (more than one colour);
- math is typeset offline: every formula (Sphinx's ``.math`` elements) holds MathJax's output
  (``mjx-container``), no MathJax error, no MathJax font that failed to load, and no raw TeX
  (``\\[``, ``$$``, ``\\mathcal``...) in the page's text outside code; the browser runs without
  network (every host name resolves to nothing), as for a reader offline, and a page that
  loads a script or style sheet from the network (a CDN MathJax, Jupyter widgets) fails;
- executed output is for reading: no output box holds a warning (a stderr stream, or text like
  ``FutureWarning``), at most `MAX_PROGRESS_OUTPUTS` boxes per page hold a progress bar and at
  most `MAX_PROGRESS_LINES` lines of one, and no output box is empty.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON
messages on file descriptors 3 and 4), so nothing listens on a port and no Python package beyond
Pillow is needed. Install the browser with ``apt-get install -y --no-install-recommends chromium``
(Debian) or point ``--chromium`` / ``$CHROMIUM`` at any Chromium or Chrome binary.

Exit status 0 when every check passes, 1 otherwise (each problem printed as ``page: what``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HTML = ROOT / "book" / "_build" / "html"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# Per page. A book page shows no warning (stderr output or "...Warning" text); a progress bar
# is at most a final line in a couple of boxes, never a stream of redraws (issue 17: chapter 05
# had hundreds of "stage 1: 37%" lines).
MAX_WARNING_OUTPUTS = 0
MAX_PROGRESS_OUTPUTS = 2
MAX_PROGRESS_LINES = 20

# Runs in the page: force lazy images to load, wait until each one is decoded (or has failed),
# and report the title, the first h1 without its permalink sign, and every image.
PAGE_REPORT_JS = """
(async () => {
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = 'eager'; });
  const report = await Promise.all(images.map(async img => {
    try { await img.decode(); } catch (err) {}
    return {src: img.getAttribute('src') || '', url: img.currentSrc || img.src || '',
            complete: img.complete, width: img.naturalWidth, height: img.naturalHeight};
  }));
  const h1 = document.querySelector('main h1') || document.querySelector('article h1') ||
             document.querySelector('h1');
  let heading = '';
  if (h1) {
    const copy = h1.cloneNode(true);
    copy.querySelectorAll('.headerlink').forEach(a => a.remove());
    heading = copy.textContent.replace(/\\s+/g, ' ').trim();
  }
  return {title: document.title.trim(), h1: heading, images: report,
          url: location.href, ready: document.readyState};
})()
"""


# Runs in the page after PAGE_REPORT_JS: waits for MathJax (if the page loads it) to finish
# typesetting and for the fonts, then reports the formulas, the TeX left in the text outside
# code, and every output box of the executed cells (its classes, text and media elements).
CONTENT_REPORT_JS = r"""
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; } catch (err) {}
  }
  try { await document.fonts.ready; } catch (err) {}
  const formulas = Array.from(document.querySelectorAll('.math'));
  const fonts = Array.from(document.fonts || []).filter(f => /^MJX/.test(f.family))
    .map(f => ({family: f.family, status: f.status}));
  const root = (document.querySelector('main') || document.body).cloneNode(true);
  root.querySelectorAll('pre, code, script, style, mjx-container, .cell_output').forEach(e => e.remove());
  const text = root.textContent;
  const raw = [];
  const tex = /\$\$|\\[\[\]()]|\\(mathcal|mathrm|mathbf|frac|sum|text|big|hat|bar|langle|rangle|cdot|alpha|beta)\b/g;
  let m;
  while ((m = tex.exec(text)) !== null && raw.length < 5) {
    raw.push(text.slice(Math.max(0, m.index - 20), m.index + 40).replace(/\s+/g, ' '));
    tex.lastIndex = m.index + 40;  // one snippet per formula, not one per command
  }
  const media = 'img, svg, audio, video, iframe, canvas, table';
  const outputs = [];
  document.querySelectorAll('.cell_output').forEach(box => {
    Array.from(box.children).forEach(el => {
      if (el.matches('script, style') && !/widget-view/.test(el.type || '')) return;
      // a Jupyter widget (a tqdm.auto bar run in a kernel with ipywidgets) is only a script
      // here: a box with nothing to read offline
      if (el.matches('script')) { outputs.push({cls: 'widget', text: '', media: 0}); return; }
      const shown = el.cloneNode(true);  // the text a reader sees: not a widget's JSON script
      shown.querySelectorAll('script, style').forEach(e => e.remove());
      outputs.push({cls: el.className || el.tagName.toLowerCase(), text: shown.textContent || '',
                    media: el.querySelectorAll(media).length + (el.matches(media) ? 1 : 0)});
    });
  });
  const remote = Array.from(document.querySelectorAll('script[src], link[rel=stylesheet][href]'))
    .map(e => e.getAttribute('src') || e.getAttribute('href')).filter(u => /^(https?:)?\/\//.test(u));
  return {remote: remote, formulas: formulas.length,
          typeset: formulas.filter(f => f.querySelector('mjx-container')).length,
          mathjax: !!(window.MathJax && MathJax.startup),
          errors: Array.from(document.querySelectorAll('mjx-merror')).map(e => e.textContent.slice(0, 80)),
          fonts: fonts, raw_tex: raw, outputs: outputs};
})()
"""

# A tqdm line: " 37%|███▋  | 111/300 [00:12<00:20,  9.1it/s]" (or its notebook text form).
PROGRESS_LINE = re.compile(r"\d+%\|.*\||\|\s*\d+/\d+\s*\[|\d+(\.\d+)?\s*(it|s)/(s|it)\]")
WARNING_TEXT = re.compile(r"\w*Warning\b|^WARNING\b", re.M)


def output_problems(outputs: list[dict]) -> list[str]:
    """What is wrong with a page's output boxes (``CONTENT_REPORT_JS``'s ``outputs``): a box with
    a warning, too many boxes with a progress bar or too many progress lines, empty boxes."""
    warnings, progress, progress_lines, empty = [], [], 0, 0
    for box in outputs:
        text = box.get("text", "")
        lines = [line for line in re.split(r"[\r\n]+", text) if PROGRESS_LINE.search(line)]
        progress_lines += len(lines)
        if "stderr" in box.get("cls", "") or WARNING_TEXT.search(text):
            warnings.append(repr(text.strip().splitlines()[0][:100]) if text.strip() else "(stderr)")
        elif lines:
            progress.append(repr(lines[0].strip()[:100]))
        if not text.strip() and not box.get("media"):
            empty += 1
    problems = []
    if len(warnings) > MAX_WARNING_OUTPUTS:
        problems.append(f"{len(warnings)} output boxes hold a warning or stderr: " + "; ".join(warnings[:3]))
    if len(progress) > MAX_PROGRESS_OUTPUTS:
        problems.append(f"{len(progress)} output boxes hold a progress bar (at most "
                        f"{MAX_PROGRESS_OUTPUTS}): " + "; ".join(progress[:3]))
    if progress_lines > MAX_PROGRESS_LINES:
        problems.append(f"{progress_lines} lines of progress bars in the outputs (at most {MAX_PROGRESS_LINES})")
    if empty:
        problems.append(f"{empty} empty output box(es)")
    return problems


def math_problems(report: dict) -> list[str]:
    """What is wrong with a page's math (``CONTENT_REPORT_JS``'s report)."""
    problems = []
    if report["formulas"] and report["typeset"] < report["formulas"]:
        how = "MathJax ran" if report["mathjax"] else "MathJax did not load"
        problems.append(f"{report['formulas'] - report['typeset']} of {report['formulas']} formulas "
                        f"not typeset ({how})")
    if report["raw_tex"]:
        problems.append("raw TeX in the text: " + "; ".join(repr(s) for s in report["raw_tex"]))
    if report["errors"]:
        problems.append("MathJax errors: " + "; ".join(report["errors"][:3]))
    failed = sorted({f["family"] for f in report["fonts"] if f["status"] == "error"})
    if failed:
        problems.append("MathJax fonts failed to load: " + ", ".join(failed))
    return problems


class BrowserError(RuntimeError):
    """Chromium could not be started or stopped answering."""


def find_chromium(explicit: str | None = None) -> str:
    """Path of a Chromium binary: ``explicit``, ``$CHROMIUM``, or the first known name on PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM"), *CHROMIUM_NAMES):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    raise BrowserError(
        "no Chromium found (tried $CHROMIUM and " + ", ".join(CHROMIUM_NAMES) + "); install it with "
        "`apt-get install -y --no-install-recommends chromium` or pass --chromium PATH"
    )


class Chromium:
    """A headless Chromium driven over ``--remote-debugging-pipe`` (DevTools protocol)."""

    def __init__(self, binary: str, *, width: int = 1280, height: int = 900, timeout: float = 30.0):
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict] = []
        self._profile = tempfile.mkdtemp(prefix="kdlib-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes():  # in the child: the protocol reads fd 3 and writes fd 4
            import fcntl

            # via fds >= 10 first, so that neither dup2 clobbers the other pipe's end
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--allow-file-access-from-files", "--hide-scrollbars", "--mute-audio",
                # offline, as a reader without network: a page that needs a CDN fails the check
                "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--window-size={width},{height}", f"--user-data-dir={self._profile}",
                "--remote-debugging-pipe", "about:blank"]
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self._stderr, preexec_fn=wire_pipes,
                                        pass_fds=(3, 4))  # kept open across exec
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.width, self.height = width, height

    # -- protocol -----------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait for its answer; raise `BrowserError` on an error answer."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline, f"{method} (no answer)")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message', reply['error'])}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_event(self, method: str, session: str | None = None) -> dict:
        """Wait for an event (one already received counts); returns its params."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self._events):
                if event.get("method") == method and (session is None or event.get("sessionId") == session):
                    return self._events.pop(i).get("params", {})
            self._events.append(self._read_message(deadline, f"waiting for {method}"))

    def _read_message(self, deadline: float, doing: str) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                raise BrowserError(f"Chromium: {doing} after {self.timeout:.0f} s"
                                   + (f"; it exited with {self.process.returncode}: {self._stderr_tail()}"
                                      if self.process.poll() is not None else ""))
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"Chromium closed the pipe while {doing}: {self._stderr_tail()}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-800:]

    # -- pages --------------------------------------------------------------------------------
    def open(self, url: str) -> str:
        """A new tab on ``url``, loaded (meta-refresh redirects followed); returns its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                          "deviceScaleFactor": 1, "mobile": False},
                  session=session)
        answer = self.send("Page.navigate", {"url": url}, session=session)
        if answer.get("errorText"):
            raise BrowserError(f"{url}: {answer['errorText']}")
        self.wait_event("Page.loadEventFired", session)
        # Jupyter Book's index.html is a <meta http-equiv="Refresh"> to the root page: wait until
        # the page the browser ends on has finished loading (asking may fail mid-navigation)
        deadline = time.monotonic() + self.timeout
        probe = ("JSON.stringify({ready: document.readyState, "
                 "refresh: !!document.querySelector('meta[http-equiv=\"refresh\" i]')})")
        while True:
            try:
                state = json.loads(self.evaluate(session, probe))
                if state["ready"] == "complete" and not state["refresh"]:
                    break
            except BrowserError:
                pass
            if time.monotonic() > deadline:
                raise BrowserError(f"{url}: not loaded after {self.timeout:.0f} s")
            time.sleep(0.1)
        return session

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed in the page: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def close_page(self, session: str) -> None:
        """Close the tab of ``session`` (its target)."""
        info = self.send("Target.getTargetInfo", session=session)["targetInfo"]
        self.send("Target.closeTarget", {"targetId": info["targetId"]})

    def screenshot(self, session: str) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"])

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.send("Browser.close")
                except BrowserError:
                    pass
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# What to check


@dataclass
class PageResult:
    page: str  # path relative to the html folder
    page_shown: str = ""  # the page the browser ended on (index.html redirects to the root page)
    title: str = ""
    h1: str = ""
    images: list[dict] = field(default_factory=list)
    formulas: int = 0  # Sphinx math elements on the page
    typeset: int = 0  # of those, how many hold MathJax's output
    outputs: list[dict] = field(default_factory=list)  # output boxes of executed cells
    problems: list[str] = field(default_factory=list)


def _toc_files(node) -> list[str]:
    files: list[str] = []
    if isinstance(node, dict):
        if "file" in node:
            files.append(str(node["file"]))
        if "root" in node:
            files.append(str(node["root"]))
        for key, value in node.items():
            if key not in ("file", "root"):
                files.extend(_toc_files(value))
    elif isinstance(node, list):
        for item in node:
            files.extend(_toc_files(item))
    return files


def book_pages(html_dir: Path) -> list[str]:
    """``index.html`` and one page per entry of the book's ``_toc.yml`` (``book/_build/html`` →
    ``book/_toc.yml``), in table-of-contents order."""
    import yaml

    toc_file = html_dir.parent.parent / "_toc.yml"
    pages = ["index.html"]
    if toc_file.exists():
        for entry in _toc_files(yaml.safe_load(toc_file.read_text())):
            page = str(Path(entry).with_suffix("")) + ".html"
            if page not in pages:
                pages.append(page)
    else:  # no toc next to the build: every html page the build wrote, except Sphinx's own
        skip = {"genindex.html", "search.html", "py-modindex.html"}
        pages += sorted(str(p.relative_to(html_dir)) for p in html_dir.rglob("*.html")
                        if not p.name.startswith("_") and p.name not in skip and str(p.relative_to(html_dir)) != "index.html"
                        and "_static" not in p.parts and "_sources" not in p.parts)
    return pages


# Sphinx "smartquotes" typesets the notebook's ' and " as curly quotes in the rendered <h1>.
_CURLY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def _plain_quotes(text: str) -> str:
    return (text or "").translate(_CURLY)


def chapter_title(html_dir: Path, page: str) -> str | None:
    """The ``# `` title of the notebook a chapter page was rendered from, if it can be found."""
    source = html_dir.parent.parent / Path(page).with_suffix(".ipynb")
    if not source.exists():
        return None
    for cell in json.loads(source.read_text()).get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", [])).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
            return None
    return None


def _local_image(html_dir: Path, page: str, src: str) -> Path | None:
    """The file a ``src`` (relative to ``page``, or a file:// URL) points at, or None for data:
    and remote URLs."""
    parsed = urlparse(src)
    if parsed.scheme in ("data", "http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return (html_dir / page).parent / unquote(parsed.path)


def check_image_file(path: Path) -> str | None:
    """None if Pillow decodes ``path`` (SVG: parses as XML with an <svg> root), else the problem."""
    if not path.is_file():
        return f"missing file {path}"
    if path.suffix.lower() == ".svg":
        import xml.etree.ElementTree as ET

        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as err:
            return f"{path.name}: not valid SVG ({err})"
        return None if root.tag.endswith("svg") else f"{path.name}: root element is {root.tag}, not svg"
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - any decoding failure is the finding
        return f"{path.name}: Pillow cannot decode it ({type(err).__name__}: {err})"
    return None


def check_page(browser: Chromium, html_dir: Path, page: str) -> tuple[PageResult, str]:
    """Load one page and check title, heading and images; returns the result and the session."""
    result = PageResult(page)
    path = html_dir / page
    if not path.is_file():
        result.problems.append(f"page missing: {path}")
        return result, ""
    session = browser.open(path.resolve().as_uri())
    report = browser.evaluate(session, PAGE_REPORT_JS)
    result.title, result.h1, result.images = report["title"], report["h1"], report["images"]
    shown = Path(unquote(urlparse(report["url"]).path))
    try:
        result.page_shown = str(shown.relative_to(html_dir.resolve()))
    except ValueError:
        result.page_shown = page
    expected = chapter_title(html_dir, result.page_shown)
    if not result.title:
        result.problems.append("empty <title>")
    if not result.h1:
        result.problems.append("no <h1> heading")
    if expected and _plain_quotes(result.h1) != _plain_quotes(expected):
        result.problems.append(f"<h1> is {result.h1!r}, the chapter's title is {expected!r}")
    for image in result.images:
        shown = image["src"] if len(image["src"]) < 80 else image["src"][:60] + "…"
        if not (image["complete"] and image["width"] > 0):
            result.problems.append(f"broken image {shown!r}: the browser could not load or decode it")
            continue
        local = _local_image(html_dir, result.page_shown, image["url"] or image["src"])
        if local is not None:
            problem = check_image_file(local)
            if problem:
                result.problems.append(f"image {shown!r}: {problem}")
    content = browser.evaluate(session, CONTENT_REPORT_JS)
    result.formulas, result.typeset, result.outputs = content["formulas"], content["typeset"], content["outputs"]
    result.problems += math_problems(content) + output_problems(content["outputs"])
    if content["remote"]:
        result.problems.append("needs the network (blank offline): " + ", ".join(content["remote"][:3]))
    return result, session


def screenshot_problem(png: Path) -> str | None:
    """None if ``png`` is a decodable PNG with more than one colour, else the problem."""
    from PIL import Image

    if not png.is_file() or png.stat().st_size == 0:
        return f"screenshot {png} missing or empty"
    try:
        with Image.open(png) as image:
            if image.format != "PNG":
                return f"screenshot {png} is {image.format}, not PNG"
            low, high = image.convert("L").getextrema()
    except Exception as err:  # noqa: BLE001
        return f"screenshot {png}: Pillow cannot decode it ({err})"
    return None if high > low else f"screenshot {png} is blank (one colour)"


def check_book(html_dir: Path = DEFAULT_HTML, screenshot: Path | None = None, *,
               chromium: str | None = None, pages: list[str] | None = None) -> list[PageResult]:
    """Check every page (default: `book_pages`) and save the landing page's screenshot
    (default ``<html_dir>/../screenshots/index.png``). Problems are in each result's ``problems``;
    a bad screenshot is reported on ``index.html``."""
    html_dir = Path(html_dir)
    if not (html_dir / "index.html").is_file():
        raise FileNotFoundError(f"{html_dir / 'index.html'} does not exist: build the book first "
                                "(python scripts/build_book.py)")
    screenshot = Path(screenshot) if screenshot else html_dir.parent / "screenshots" / "index.png"
    results = []
    with Chromium(find_chromium(chromium)) as browser:
        for page in pages or book_pages(html_dir):
            result, session = check_page(browser, html_dir, page)
            if page == "index.html" and session:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(browser.screenshot(session))
                problem = screenshot_problem(screenshot)
                if problem:
                    result.problems.append(problem)
            if session:
                browser.close_page(session)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", type=Path, default=DEFAULT_HTML, help="the built html folder")
    parser.add_argument("--screenshot", type=Path, help="PNG of the landing page "
                        "(default: <html>/../screenshots/index.png)")
    parser.add_argument("--chromium", help="Chromium binary (default: $CHROMIUM, then chromium on PATH)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = check_book(args.html, args.screenshot, chromium=args.chromium)
    failed = 0
    for result in results:
        status = "ok  " if not result.problems else "FAIL"
        shown = f" (→ {result.page_shown})" if result.page_shown and result.page_shown != result.page else ""
        print(f"{status} {result.page}{shown}: {result.h1!r}, {len(result.images)} images, "
              f"{result.typeset}/{result.formulas} formulas typeset, {len(result.outputs)} output boxes")
        for problem in result.problems:
            print(f"     {result.page}: {problem}")
        failed += bool(result.problems)
    print(f"{len(results)} pages checked in {time.perf_counter() - start:.1f} s, {failed} with problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
