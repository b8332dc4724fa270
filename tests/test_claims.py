"""The numbers the book's prose states: scripts/check_claims.py on fixtures, and on every chapter.

The chapters' own results are checked where they run (tests/prepare_chapters.py adds a last cell
that calls tests/chapter_results.py); here the checker itself, and what can be read from the
chapter sources without running them."""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import NOTEBOOKS, ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import check_claims  # noqa: E402

CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))

FIXTURE_PY = '''# %% [markdown]
# # 99 · A fixture chapter
#
# After stage I the dev WER fell to 0.39<!-- results: rows.stage1.wer --> on 20<!-- results: dev_clips --> clips
# (CER 14.5<!-- results: rows.stage1.cer *100 --> %), about 2<!-- results: ratio *100 ~1 --> % of the rest, t-SNE keeps
# 0.5–0.6<!-- results: knn.tsne --><!-- results: knn.umap --> of the neighbours; the teacher trains 98 304<!-- results: trainable --> parameters.

# %%
print("code cells are not prose: 0.123 WER")
'''

RESULTS = {"rows": {"stage1": {"wer": 0.3926, "cer": 0.1450}}, "dev_clips": 20, "ratio": 0.024,
           "knn": {"tsne": 0.55, "umap": 0.6}, "trainable": 98304}


@pytest.fixture
def chapter(tmp_path):
    path = tmp_path / "99_fixture.py"
    path.write_text(FIXTURE_PY, encoding="utf-8")
    return path


def test_fixture_prose_agrees_with_its_results(chapter, tmp_path):
    claims = check_claims.chapter_claims(chapter)
    assert [(c.printed, c.key) for c in claims] == [
        ("0.39", "rows.stage1.wer"), ("20", "dev_clips"), ("14.5", "rows.stage1.cer"), ("2", "ratio"),
        ("0.5–0.6", "knn.tsne"), ("0.5–0.6", "knn.umap"), ("98 304", "trainable")]
    assert check_claims.mismatches(chapter, RESULTS) == []
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    assert check_claims.check(chapter, tmp_path / "results.json") == []
    assert check_claims.main([str(chapter), str(tmp_path / "results.json")]) == 0


@pytest.mark.parametrize("old, new", [("0.39<", "0.41<"), ("14.5<", "14.1<"), ("98 304<", "98 305<"),
                                      ("0.5–0.6<", "0.4–0.5<"), ("about 2<", "about 4<")])
def test_a_changed_prose_number_fails_naming_prose_and_result(chapter, old, new):
    chapter.write_text(chapter.read_text().replace(old, new, 1))
    problems = check_claims.mismatches(chapter, RESULTS)
    assert problems, (old, new)
    stated = new.rstrip("<").split()[-1]
    assert any(stated in p and "results.json has" in p and "99_fixture" in p for p in problems), problems


def test_a_changed_result_fails(chapter):
    results = json.loads(json.dumps(RESULTS))
    results["rows"]["stage1"]["wer"] = 0.3851  # rounds to the 0.39 the prose prints
    assert check_claims.mismatches(chapter, results) == []
    results["rows"]["stage1"]["wer"] = 0.3849
    assert any("0.39" in p and "0.3849" in p for p in check_claims.mismatches(chapter, results))


@pytest.mark.parametrize("key", ["rows.stage1.wer", "dev_clips", "knn.umap", "trainable"])
def test_a_deleted_results_key_fails(chapter, tmp_path, key):
    results = json.loads(json.dumps(RESULTS))
    *parents, last = key.split(".")
    node = results
    for part in parents:
        node = node[part]
    del node[last]
    for problems in (check_claims.mismatches(chapter, results), check_claims.missing_keys(chapter, results)):
        assert any(repr(key) in p and "does not have" in p for p in problems), problems
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert check_claims.main([str(chapter), str(tmp_path / "results.json"), "--keys-only"]) == 1


def test_null_passes_only_where_the_run_skipped_it(chapter):
    results = json.loads(json.dumps(RESULTS))
    results["trainable"] = None
    assert check_claims.missing_keys(chapter, results, allow_null=True) == []
    assert any("'trainable' is None" in p for p in check_claims.mismatches(chapter, results))


def test_missing_results_file_fails(chapter, tmp_path):
    assert "no " in check_claims.check(chapter, tmp_path / "nothing.json")[0]


def test_a_marker_without_a_number_is_an_error(chapter):
    chapter.write_text(chapter.read_text().replace("fell to 0.39<!--", "fell to about<!--"))
    with pytest.raises(ValueError, match="does not follow a number"):
        check_claims.chapter_claims(chapter)


def test_unmarked_measured_numbers_are_flagged(chapter):
    assert check_claims.unmarked(chapter) == []
    text = chapter.read_text()
    chapter.write_text(text.replace("0.39<!-- results: rows.stage1.wer -->", "0.39"))
    flagged = check_claims.unmarked(chapter)
    assert len(flagged) == 1 and "'0.39'" in flagged[0], flagged
    # a number from elsewhere says so; a setting (λ = 0.1, weight 0.5) and a coefficient are not measurements
    chapter.write_text(text + "\n# %% [markdown]\n# The facts page measured a WER of 0.65<!-- cited --> at "
                       "λ = 0.1, weight 0.5, 0.8·CE.\n")
    assert check_claims.unmarked(chapter) == []
    chapter.write_text(text + "\n# %% [markdown]\n# A new sentence states a dev WER of 0.42 and a CER of 12 %.\n")
    assert [re.search(r"'([^']+)'", p)[1] for p in check_claims.unmarked(chapter)] == ["0.42", "12 %"]


@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_markers_parse_and_no_measured_number_is_unmarked(nb):
    """Every chapter: its markers parse (the paired .py gives the same), and no WER/CER-looking
    number in its prose lacks a marker."""
    claims = check_claims.chapter_claims(nb)
    assert [(c.printed, c.key) for c in claims] == [(c.printed, c.key) for c in
                                                   check_claims.chapter_claims(nb.with_suffix(".py"))]
    assert check_claims.unmarked(nb) == []


@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_writes_results_json(nb):
    source = nb.with_suffix(".py").read_text(encoding="utf-8")
    assert re.search(r'["\']results\.json["\']', source), f"{nb.stem} does not write <out_dir>/results.json"


def test_the_chapters_state_numbers_in_the_issue_s_places():
    """Issue 19's list: frame counts (02), loss values (03), trainable counts (04), stage rows with
    WER and clips (05, 06, 11; 07's table is in results.json, its prose states none), ablation
    rows (09)."""
    keys = {nb.stem[:2]: {c.key for c in check_claims.chapter_claims(nb)} for nb in CHAPTERS}
    assert "padding_percent" in keys["02"]
    assert any(k.startswith("hard_vs_soft") for k in keys["03"])
    assert any(k.startswith("trainable_counts") for k in keys["04"])
    assert {"rows.teacher.wer", "payoff.dev.stage1.wer", "payoff.dev.ce_only.wer"} <= keys["05"]
    assert any(k.startswith("ablations.") for k in keys["09"])
    assert {"rows.thesis_stage1.wer", "rows.distil_unfiltered.wer", "pseudo.clips"} <= keys["11"]


def test_the_smoke_expectations_name_real_chapters():
    import chapter_results

    stems = {nb.stem for nb in CHAPTERS}
    assert set(chapter_results.RANGES) <= stems and set(chapter_results.EXACT) <= stems
    assert stems <= set(chapter_results.RANGES), "every chapter has smoke-size ranges"


def test_chapter_results_catches_a_deleted_key_and_a_range(tmp_path):
    """The harness's check on a chapter's smoke results: a marker's key deleted, a value out of
    range, a deterministic value changed: each is named."""
    import chapter_results

    nb = NOTEBOOKS / "09_search_and_ablations.ipynb"
    keys = [c.key for c in check_claims.chapter_claims(nb)] + list(chapter_results.RANGES[nb.stem])
    results: dict = {}
    for key in keys + list(chapter_results.EXACT[nb.stem]):
        node = results
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = chapter_results.EXACT[nb.stem].get(key, 1.0)
    # lists in the real results: flags/factors are lists; a dict with "0" keys reads the same
    assert chapter_results.problems(nb, results) == []
    broken = json.loads(json.dumps(results))
    del broken["trials"]["1"]["first_eval"]
    assert any("trials.1.first_eval" in p for p in chapter_results.problems(nb, broken))
    broken = json.loads(json.dumps(results))
    broken["ablations"]["main"]["dev_wer"] = -0.5
    assert any("ablations.main.dev_wer" in p and "outside" in p for p in chapter_results.problems(nb, broken))
    broken = json.loads(json.dumps(results))
    broken["monitor"]["factors"]["1"] = 0.3
    assert any("monitor.factors.1" in p and "exactly" in p for p in chapter_results.problems(nb, broken))
    path = tmp_path / "results.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(AssertionError, match="monitor.factors.1"):
        chapter_results.assert_results(nb, path)


def test_build_book_checks_the_stated_numbers_after_the_chapters_ran(tmp_path, capsys):
    """scripts/build_book.py: after executing, every chapter's marked numbers are compared with
    its out_dir's results.json; a disagreement stops the build (SystemExit) naming both. At a
    preset other than demo only the keys are checked."""
    import nbformat

    import build_book

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('out_dir = "runs/99_fixture"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_markdown_cell("The dev WER fell to 0.39<!-- results: rows.stage1.wer -->.")]
    path = tmp_path / "notebooks" / "99_fixture.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, str(path))
    out = build_book.chapter_out_dir(path, {})
    assert out == tmp_path / "notebooks" / "runs" / "99_fixture"
    assert build_book.chapter_out_dir(path, {"out_dir": str(tmp_path / "elsewhere")}) == tmp_path / "elsewhere"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"rows": {"stage1": {"wer": 0.392}}}))
    build_book.check_stated_numbers([(path, out)], None)
    assert "1 stated numbers agree" in capsys.readouterr().out
    (out / "results.json").write_text(json.dumps({"rows": {"stage1": {"wer": 0.45}}}))
    with pytest.raises(SystemExit, match=r"99_fixture: the prose says 0.39 but results.json has rows.stage1.wer = 0.45"):
        build_book.check_stated_numbers([(path, out)], "demo")
    capsys.readouterr()
    build_book.check_stated_numbers([(path, out)], "demo", warn_only=True)  # --claims warn: reported, no stop
    assert "the prose says 0.39 but results.json has rows.stage1.wer = 0.45" in capsys.readouterr().out
    build_book.check_stated_numbers([(path, out)], "smoke")  # other sizes: keys only
    (out / "results.json").write_text(json.dumps({"rows": {}}))
    with pytest.raises(SystemExit, match="does not have"):
        build_book.check_stated_numbers([(path, out)], "smoke")
