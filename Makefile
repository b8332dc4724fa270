# Two entry points for a fresh machine (see README.md):
#   make book   venv + install + every chapter executed by papermill + Jupyter Book HTML
#   make test   venv + install + the whole test suite
# Both are idempotent: the install step reruns only when pyproject.toml or constraints.txt (the lock)
# change. `make lock` re-resolves the lock at the newest versions and runs the tests (scripts/lock.py).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdlib-installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MPLBACKEND := Agg

.PHONY: install lock book chapters html pdf test lab clean

# constraints.txt is the lock: every distribution the install needs, pinned (scripts/lock.py).
# --no-deps installs exactly those; lock.py check --fix removes what the lock no longer names and
# fails unless `pip freeze` equals the lock; pip check fails on a lock that misses a requirement.
PIP_VERSION := 26.3

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q --no-deps -r constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) scripts/lock.py check --fix
	$(PY) -m pip check
	$(PY) -c "import torch, torchaudio, transformers, kdlib; print('kdlib', kdlib.__version__, 'torch', torch.__version__, 'torchaudio', torchaudio.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

install: $(STAMP)

# Update the lock on purpose: newest versions allowed by pyproject.toml and constraints.in, the
# changes listed, then make test on them. Commit constraints.txt only when it passes.
lock:
	$(PYTHON) scripts/lock.py update

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
