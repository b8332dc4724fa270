"""Each chapter stands alone (issue 17): a chapter never opens a path another chapter wrote by
convention. Earlier runs come in as parameters (its ``parameters`` cell); outside that cell no
code names another chapter's run folder (``05_stage1_kd``, ``07_stage3_decoder``...), and no
chapter reads another chapter's result files by name."""

from __future__ import annotations

import re

import pytest

from conftest import NOTEBOOKS

CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
STEMS = [p.stem for p in CHAPTERS]


def code_cells(text: str) -> list[tuple[str, str]]:
    """(header, source) of the percent-format code cells, markdown cells left out."""
    cells = re.split(r"^(# %%.*)$", text, flags=re.M)
    return [(header, body) for header, body in zip(cells[1::2], cells[2::2]) if "[markdown]" not in header]


# Files every run folder holds (kdlib.train writes them), not a chapter's own results.
RUN_FILES = {"summary.json", "training_config.json", "training_history.json", "trainable.json"}


def written_files(path) -> set[str]:
    """File names a chapter writes into its own folder: ``out / "name.ext"``."""
    names = re.findall(r'out\s*/\s*"([\w.-]+\.(?:json|csv|md|png|jsonl))"', path.read_text())
    return set(names) - RUN_FILES


def foreign_paths(path, chapters=CHAPTERS) -> list[str]:
    """Lines of code outside the parameters cell that name another chapter's folder, or a file
    that only another chapter writes (its table, its results)."""
    own = written_files(path) if path.exists() else set()
    others = {name for other in chapters if other.stem != path.stem for name in written_files(other)} - own
    found = []
    for header, body in code_cells(path.read_text()):
        if 'tags=["parameters"]' in header:
            continue
        for line in body.splitlines():
            code = line.split("#", 1)[0]  # a comment may name another chapter
            for stem in STEMS:
                if stem != path.stem and (stem in code or f"/{stem[:2]}_" in code):
                    found.append(f"{path.name}: {line.strip()}")
            found += [f"{path.name}: {line.strip()}" for name in others if f'"{name}"' in code]
    return found


def test_chapters_list_is_complete():
    assert len(CHAPTERS) >= 12 and "05_stage1_kd" in STEMS and "08_evaluation" in STEMS


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_chapter_opens_another_chapters_runs_outside_its_parameters(chapter):
    assert foreign_paths(chapter) == []


def test_the_check_finds_a_hard_coded_run_folder(tmp_path):
    fake = tmp_path / "08_evaluation.py"
    fake.write_text('# %% tags=["parameters"]\nstage1_run = "../runs/05_stage1_kd/stage1"\n\n'
                    '# %%\nrun = runs / "05_stage1_kd" / "stage0"\n')
    assert foreign_paths(fake) == ['08_evaluation.py: run = runs / "05_stage1_kd" / "stage0"']


def test_the_check_finds_another_chapters_table(tmp_path):
    fake = tmp_path / "07_stage3_decoder.py"
    fake.write_text('# %%\nearlier = Path(stage1_root) / "stage1_table.json"\n')
    assert "stage1_table.json" in written_files(NOTEBOOKS / "05_stage1_kd.py")
    assert foreign_paths(fake) == ['07_stage3_decoder.py: earlier = Path(stage1_root) / "stage1_table.json"']


def test_the_book_passes_runs_the_chapters_take_as_parameters():
    """scripts/build_book.py wires earlier chapters' runs into later ones (UPSTREAM): every
    name it passes is a parameter of that chapter, defaulting to None or a path."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    assert build_book.UPSTREAM
    for prefix, wiring in build_book.UPSTREAM.items():
        (chapter,) = [p for p in CHAPTERS if p.stem.startswith(prefix)]
        (params,) = [body for header, body in code_cells(chapter.read_text()) if 'tags=["parameters"]' in header]
        for name, (upstream, _) in wiring.items():
            assert re.search(rf"^{name} = ", params, flags=re.M), f"{chapter.name} has no parameter {name}"
            assert any(p.stem.startswith(upstream) for p in CHAPTERS)
