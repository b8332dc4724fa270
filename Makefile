# Two entry points for a fresh machine (see README.md):
#   make book   venv + install + every chapter executed by papermill + Jupyter Book HTML
#   make test   venv + install + the whole test suite
# Both are idempotent: the install step reruns only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdlib-installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MPLBACKEND := Agg

.PHONY: install book chapters html pdf test lab clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchaudio
	$(PY) -m pip install -q -c constraints.txt -e '.[all]'
	$(PY) -c "import torch, torchaudio, transformers, kdlib; print('kdlib', kdlib.__version__, 'torch', torch.__version__, 'torchaudio', torchaudio.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

install: $(STAMP)

book: install
	$(PY) scripts/build_book.py

chapters: install
	$(PY) scripts/build_book.py --no-html

html: install
	$(PY) scripts/build_book.py --html-only

pdf: install
	$(PY) scripts/build_book.py --html-only --builder pdflatex
	$(PY) scripts/check_book_pdf.py book/_build/latex/kdlib-book.pdf

# The chapters run once, as nbval items: tests/prepare_chapters.py writes copies prepared at smoke
# size (papermill --prepare-only, every runs path inside build/nbval/) and pytest collects them
# next to tests/; tests/test_notebooks.py then skips its own papermill run of those chapters.
NBVAL_DIR := build/nbval
# Two pytest workers: much of the suite waits on kernels and subprocesses, so two overlap well on a
# 2-core machine; each test file (and each chapter's cells) stays on one worker.
TEST_WORKERS ?= 2

test: install
	rm -rf $(NBVAL_DIR)
	$(PY) tests/prepare_chapters.py $(NBVAL_DIR) --preset smoke
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -v --nbval-lax tests $(NBVAL_DIR)

lab: install
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf book/_build book/chapters runs
