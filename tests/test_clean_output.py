"""What an executed chapter prints: kdlib's progress bars (`kdlib.progress`) are silent in
papermill runs and never a stream of redraws, and building a LoRA model prints no third-party
deprecation warning. The book-level check (no warning or progress box on a built page) is in
tests/test_book_browser.py."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from kdlib import progress


def test_bar_is_silent_when_kdlib_progress_is_off(monkeypatch):
    monkeypatch.setenv(progress.ENV, "0")
    out = io.StringIO()
    bar = progress.progress_bar(range(50), desc="stage 1", file=out)
    assert bar.disable
    assert list(bar) == list(range(50))
    assert out.getvalue() == ""


def test_bar_draws_when_enabled_and_redraws_rarely(monkeypatch):
    """A loop of 2,000 quick steps redraws a handful of times (mininterval 0.5 s), not per step."""
    monkeypatch.delenv(progress.ENV, raising=False)
    out = io.StringIO()
    bar = progress.progress_bar(range(2000), desc="stage 1", file=out)
    assert not bar.disable and bar.mininterval == 0.5
    for _ in bar:
        pass
    frames = out.getvalue().split("\r")
    assert "stage 1: 100%" in frames[-1]
    assert len(frames) < 20, f"{len(frames)} redraws"


def test_disable_argument_is_kept(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.progress_bar(range(3), disable=True).disable


def test_notebook_kernel_without_ipywidgets_gets_a_text_bar_and_no_warning(monkeypatch):
    """tqdm.auto would warn "IProgress not found" here; the helper quietly uses the text bar."""
    import warnings

    from tqdm.std import tqdm as text_bar

    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(progress, "_in_notebook_kernel", lambda: True)
    real_find_spec = progress.importlib.util.find_spec
    monkeypatch.setattr(progress.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ipywidgets" else real_find_spec(name, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = progress.progress_bar(range(3), file=io.StringIO())
    assert type(bar) is text_bar


def test_notebook_kernel_with_ipywidgets_gets_a_widget_bar(monkeypatch):
    pytest.importorskip("ipywidgets")
    from tqdm.notebook import tqdm as widget_bar

    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(progress, "_in_notebook_kernel", lambda: True)
    bar = progress.progress_bar(range(3))
    assert isinstance(bar, widget_bar)
    bar.close()


def test_build_book_turns_bars_off_for_the_chapter_kernels():
    sys.path.insert(0, str(__import__("conftest").ROOT / "scripts"))
    import build_book

    assert build_book.KERNEL_ENV[progress.ENV] in progress.OFF
    assert build_book.KERNEL_ENV["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_kdlib_loops_use_the_helper_not_tqdm_directly():
    from conftest import ROOT

    offenders = [f"{p.name}:{n}" for p in sorted((ROOT / "kdlib").glob("*.py")) if p.name != "progress.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if "import tqdm" in line or "from tqdm" in line]
    assert not offenders, offenders


LORA_SCRIPT = """
import torch
from transformers import WhisperForConditionalGeneration
from kdlib import models
torch.manual_seed(0)
model = WhisperForConditionalGeneration(models.tiny_config(d_model=32, layers=(1, 1), heads=2, ffn=48))
models.apply_lora(model, "qkv_all", r=2)
print("built")
"""


def test_lora_model_builds_without_a_future_warning():
    """peft reads transformers' deprecated `is_gradient_checkpointing` in every PeftModel; kdlib
    filters exactly that message. In a fresh interpreter (pytest resets filters per test, a
    notebook kernel does not), with Python's default filters, which show FutureWarning."""
    from conftest import ROOT

    done = subprocess.run([sys.executable, "-c", LORA_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "built" in done.stdout, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr[-2000:]


TRANSCRIBE_SCRIPT = """
import numpy as np
from kdlib import models
teacher, _ = models.tiny_random_pair()
print("greedy:", teacher.transcribe(np.zeros(16000, np.float32), max_new_tokens=3))
"""


def test_bundle_transcribe_logs_no_generate_advice():
    """Chapter 03's `WhisperBundle.transcribe(..., max_new_tokens=3)` printed transformers'
    "Both `max_new_tokens` and `max_length`" and "Passing `generation_config` together with"
    advice on stderr, which the book showed as warning boxes."""
    from conftest import ROOT

    done = subprocess.run([sys.executable, "-c", TRANSCRIBE_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "greedy:" in done.stdout, done.stderr[-2000:]
    assert "[transformers]" not in done.stderr and "max_new_tokens" not in done.stderr, done.stderr[-2000:]


# --- the browser check's verdicts on output boxes and math (pure functions; no browser needed)

def _checker():
    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    import check_book_browser

    return check_book_browser


def test_checker_counts_warning_and_progress_boxes():
    cbb = _checker()
    clean = [{"cls": "output stream", "text": "step 8: dev_loss 10.8489\n", "media": 0},
             {"cls": "output text_html", "text": "", "media": 1}]
    assert cbb.output_problems(clean) == []
    warning = {"cls": "output stderr", "text": "/x/.venv/lib/python3.11/site-packages/t.py:1: "
                                               "FutureWarning: old\n  warnings.warn(\n", "media": 0}
    assert any("warning" in p for p in cbb.output_problems(clean + [warning]))
    printed = {"cls": "output stream", "text": "TqdmWarning: IProgress not found\n", "media": 0}
    assert any("warning" in p for p in cbb.output_problems([printed]))
    stream = "".join(f"stage 1: {i:3d}%|{'#' * (i // 10):10s}| {i}/100 [00:0{i % 10}<00:10, 9.1it/s]\n"
                     for i in range(0, 100, 3))
    problems = cbb.output_problems([{"cls": "output stream", "text": stream, "media": 0}])
    assert any("lines of progress bars" in p for p in problems), problems
    bars = [{"cls": "output text_plain", "text": f"decode: 100%|##########| 3/3 [00:01<00:00, 2.1it/s]",
             "media": 0}] * (cbb.MAX_PROGRESS_OUTPUTS + 1)
    assert any("progress bar" in p for p in cbb.output_problems(bars))
    assert cbb.output_problems(bars[:cbb.MAX_PROGRESS_OUTPUTS]) == []
    assert any("empty output box" in p for p in cbb.output_problems([{"cls": "output stream", "text": "\n ", "media": 0}]))


def test_checker_math_verdicts():
    cbb = _checker()
    good = {"formulas": 2, "typeset": 2, "mathjax": True, "errors": [], "fonts": [
        {"family": "MJXZERO", "status": "loaded"}], "raw_tex": []}
    assert cbb.math_problems(good) == []
    offline = dict(good, typeset=0, mathjax=False, raw_tex=["ive $$\\mathcal{L}_I = w_{CE}"])
    problems = cbb.math_problems(offline)
    assert any("2 of 2 formulas not typeset (MathJax did not load)" in p for p in problems), problems
    assert any("raw TeX" in p for p in problems), problems
    assert any("fonts failed" in p for p in cbb.math_problems(dict(good, fonts=[{"family": "MJXTEX", "status": "error"}])))
    assert any("MathJax errors" in p for p in cbb.math_problems(dict(good, errors=["Undefined control sequence \\foo"])))


# --- the PDF text check (scripts/check_book_pdf.py): pure functions, and the LaTeX of a book

def _pdf_checker():
    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    import check_book_pdf

    return check_book_pdf


def test_pdf_text_check_finds_progress_warnings_and_machine_paths():
    cpc = _pdf_checker()
    clean = ["01 · Data\nstep 8: dev_loss 10.8489\nWarning: nothing on this page ran at thesis scale\n"
             "source .venv/bin/activate\n"]
    assert cpc.text_problems(clean) == []
    dirty = ["stage 1:  37%|███▋      | 111/300 [00:12<00:20,  9.1it/s]\n",
             "/home/u/kdlib/.venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3312: "
             "FutureWarning: `is_gradient_checkpointing` is deprecated\n  warnings.warn(\n"]
    problems = cpc.text_problems(dirty)
    assert any(p.startswith("page 1: progress line") for p in problems), problems
    assert any(p.startswith("page 2: warning") and "FutureWarning" in p for p in problems), problems
    assert any(p.startswith("page 2: build machine path") for p in problems), problems
    assert any("warnings.warn(" in p for p in problems), problems


def test_pdf_text_check_reads_latex_escapes():
    """In the LaTeX source an output line is Pygments-escaped; the check reads it as printed."""
    cpc = _pdf_checker()
    tex = (r"/x/.venv/lib/python3.11/site\PYGZhy{}packages/transformers/modeling\PYGZus{}utils.py:1: "
           r"FutureWarning: old" "\n" r"decode: 100\PYGZpc{}|\PYGZsh{}\PYGZsh{}| 3/3 [00:01\PYGZlt{}00:00, 2.1it/s]")
    text = cpc.tex_to_text(tex)
    assert "site-packages/transformers/modeling_utils.py" in text and "100%|##| 3/3 [00:01<00:00" in text
    problems = cpc.text_problems(text.splitlines())
    assert [p.split(":")[1].strip().split(" ")[0] for p in problems] == ["warning", "build", "progress"], problems
