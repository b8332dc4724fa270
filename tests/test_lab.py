"""JupyterLab opens the paired `notebooks/NN_topic.py` files as notebooks.

Starts `jupyter lab` from the venv on a free 127.0.0.1 port, asks its contents API for the
notebooks folder, and checks that jupytext's contents manager (enabled by jupytext's server
extension, `jupytext.json` in the venv's `etc/jupyter/jupyter_server_config.d/`) serves every
chapter's `.py` as a notebook. The server is stopped whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TOKEN = "kdlibtest"
JUPYTER = Path(sys.executable).parent / "jupyter"
CHAPTER = re.compile(r"^\d\d_[a-z0-9_]+\.py$")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read().decode("utf-8"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not JUPYTER.exists():
        pytest.skip(f"{JUPYTER} not found (install the venv first: make test)")
    port = _free_port()
    log = tmp_path_factory.mktemp("lab") / "server.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(JUPYTER), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
             "--ServerApp.port_retries=0", f"--ServerApp.token={TOKEN}",
             f"--ServerApp.root_dir={NOTEBOOKS}"]
            + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 180  # a loaded CI machine starts it slowly
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    _get(f"{base}/api/contents?token={TOKEN}")
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    if time.monotonic() > deadline:
                        pytest.fail(f"jupyter lab did not answer on {base} within 180 s:\n"
                                    f"{log.read_text()[-3000:]}")
                    time.sleep(0.5)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def test_lab_lists_every_chapter(lab):
    listing = _get(f"{lab}/api/contents?token={TOKEN}")
    listed = {item["name"] for item in listing["content"]}
    assert CHAPTERS, f"no NN_topic.py files in {NOTEBOOKS}"
    missing = [name for name in CHAPTERS if name not in listed]
    assert not missing, f"jupyter lab does not list {missing}; it lists {sorted(listed)}"


CHAPTERS = sorted(p.name for p in NOTEBOOKS.glob("*.py") if CHAPTER.match(p.name))


@pytest.mark.parametrize("name", CHAPTERS)
def test_lab_opens_py_as_notebook(lab, name):
    model = _get(f"{lab}/api/contents/{name}?token={TOKEN}")
    assert model["type"] == "notebook", (
        f"{name} served as {model['type']!r}: jupytext's contents manager is not active "
        "(check `jupyter server extension list` shows jupytext enabled)")
    cells = model["content"]["cells"]
    assert cells[0]["cell_type"] == "markdown" and cells[0]["source"].startswith(f"# {name[:2]}"), (
        f"{name}: the first cell is not the chapter's title: {cells[0]['source'][:80]!r}")
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells), (
        f"{name}: no cell tagged parameters (papermill could not override its settings)")
    # the notebook served is the .py's content: every code cell of the source is there
    source = (NOTEBOOKS / name).read_text()
    code = [c["source"] for c in cells if c["cell_type"] == "code"]
    assert code and all(c.splitlines()[0] in source for c in code if c.strip()), name
