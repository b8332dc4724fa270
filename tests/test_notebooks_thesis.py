"""Every chapter through papermill at the thesis-shaped preset (``thesis-tiny``), the way the
README's thesis command runs them: ``--cwd notebooks``, ``-p preset ...``, a relative
``data_root`` (resolved against the working directory) and the earlier chapters' run folders
passed as parameters. ``thesis-tiny`` keeps every structural difference of large-v3 → small (128
vs 80 mel bins, 51,866 vs 51,865 tokens, another token layout, 3:1 frames merged inside the
student's encoder) and the thesis' training machinery (fp16 path with an enabled GradScaler,
gradient checkpointing, early stopping, DataLoader workers) at smoke size.

Two tests: the chapters that take no earlier run (one item each), and the chain 05 → 06 → 07
whose runs 08, 10 and 11 then read, so nothing trains twice. Every chapter is prepared by
``tests/prepare_chapters.py``: its run paths point into the test's temporary folder, and a last
cell fails if the chapter touched the repository's ``runs/``. Each chapter's check reads what the
chapter itself wrote (``results.json``, the run folders) for the thesis shapes."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import NOTEBOOKS, ROOT
from prepare_chapters import CHAPTERS, prepare

import nbformat
import papermill

PRESET = "thesis-tiny"
ALONE = ["00_tour", "01_data_loader", "02_whisper_frames", "03_losses", "04_lora", "09_search_and_ablations"]
CHAIN = ["05_stage1_kd", "06_stage2_alignment", "07_stage3_decoder", "08_evaluation", "10_latent_space",
         "11_distil_whisper_recipe"]


def parameter_names(notebook: Path) -> set[str]:
    """Names assigned in a chapter's ``parameters`` cell."""
    nb = nbformat.read(str(notebook), as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    return {n.targets[0].id for n in ast.parse(cell.source).body if isinstance(n, ast.Assign)}


def data_root() -> str:
    """The embedded Italian corpus relative to ``--cwd notebooks``, as in ``-p data_root ../data/...``."""
    from kdlib.data import embedded_corpus

    return os.path.relpath(embedded_corpus("it"), NOTEBOOKS)


def execute(tmp_path: Path, name: str, **parameters) -> tuple[str, Path]:
    """Run chapter ``name`` at thesis-tiny; returns its printed text and its ``out_dir``. A chapter
    cut below the preset's size (`SIZES`) skips the results-keys check: its results lack parts."""
    notebook = NOTEBOOKS / f"{name}.ipynb"
    if "data_root" in parameter_names(notebook):
        parameters.setdefault("data_root", data_root())
    (prepared,) = prepare(tmp_path, PRESET, [notebook], parameters, check_results=name not in SIZES)
    out = tmp_path / f"executed_{name}.ipynb"
    try:
        papermill.execute_notebook(
            str(prepared), str(out), kernel_name="python3", language="python", cwd=str(NOTEBOOKS),
            progress_bar=False, execution_timeout=900,
        )
    except papermill.PapermillExecutionError as err:
        pytest.fail(f"{name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}")
    executed = nbformat.read(str(out), as_version=4)
    printed = "".join(o.get("text", "") for cell in executed.cells for o in cell.get("outputs", []))
    (injected,) = [c.source for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    out_dir = Path(ast.literal_eval(next(line.split(" = ", 1)[1] for line in injected.splitlines()
                                         if line.startswith("out_dir = "))))
    assert out_dir.is_relative_to(tmp_path), out_dir
    return printed, out_dir


@pytest.fixture
def kernel_env(monkeypatch):
    # the kernel and its DataLoader workers import this checkout's kdlib, whatever the venv has installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("KDLIB_PROGRESS", "0")


def read(path: Path):
    return json.loads(path.read_text())


def table_rows(path: Path) -> list[dict]:
    """The rows of a comparison table a chapter wrote (`kdlib.evaluate.write_comparison`)."""
    table = read(path)
    return table["rows"] if isinstance(table, dict) else table


def assert_placement(placement: dict, device: str, where: str) -> None:
    """Every model a chapter or a run used sat on the run's device (a model left on the CPU of a
    GPU run fails here; on a GPU every entry must read cuda), and the teacher in large-v3's dtype
    (thesis-tiny's teacher is saved and loaded in float16)."""
    from kdlib.models import misplaced

    assert placement, f"{where}: no placement recorded"
    problems = misplaced(placement, device, teacher_dtype="float16")
    assert not problems, (where, problems)


def config_of(run: Path):
    from kdlib.config import TrainConfig

    return TrainConfig.from_json(run / "training_config.json")


# ---------------------------------------------------------------------------------------------
# What each chapter must show at thesis shape, read from the files it wrote


def check_00(printed, out):
    assert "mel bins: teacher 128, student 80" in printed
    assert config_of(out / "stage1").preset == PRESET


def check_01(printed, out):
    results = read(out / "results.json")
    assert results["kept"]["train"] > 0 and results["mixed_languages"]


def check_02(printed, out):
    summary = read(out / "results.json")
    teacher, student = summary["sizes"][:2]
    assert (teacher["mel_bins"], student["mel_bins"]) == (128, 80)
    assert teacher["embed_tokens"][0] == 51866 and student["embed_tokens"][0] == 51865
    assert summary["frames"]["student_total"] == 500


def check_03(printed, out):
    # the teacher's logits were put in the student's order, not compared id for id
    assert read(out / "results.json")["vocab"] == {"teacher": 51866, "student": 51865, "remapped": True}


def check_04(printed, out):
    rows = read(out / "results.json")["presets"]
    assert {r["role"] for r in rows} == {"teacher", "student"} and all(r["trainable"] > 0 for r in rows)


def check_09(printed, out):
    assert read(out / f"timings_{PRESET}.json")
    assert (out / f"study_{PRESET}" / "best_params.json").is_file()


CHECKS = {"00_tour": check_00, "01_data_loader": check_01, "02_whisper_frames": check_02, "03_losses": check_03,
          "04_lora": check_04, "09_search_and_ablations": check_09}


def test_every_chapter_runs_at_thesis_shape_in_one_of_the_tests():
    assert sorted(ALONE + CHAIN) == [p.stem for p in CHAPTERS]
    assert set(CHECKS) == set(ALONE)


# Chapter parameters that size the run here: chapter 09 trains a run per trial and per ablation
# row, and at thesis-tiny every run pays for fp16 on a CPU; two trials and one ablation still
# exercise the study, the pruner and the ablation table.
SIZES = {"09_search_and_ablations": {"n_trials": 2, "ablations": ["no_stage_2"]}}


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", ALONE)
def test_chapter_without_earlier_runs_at_thesis_shape(chapter, tmp_path, kernel_env):
    printed, out = execute(tmp_path, chapter, **SIZES.get(chapter, {}))
    CHECKS[chapter](printed, out)


@pytest.mark.notebook
def test_stage_chapters_and_their_readers_at_thesis_shape(tmp_path, kernel_env):
    """05 → 06 → 07 chained by parameters, then 08, 10 and 11 on those runs (nothing trains twice)."""
    from kdlib.config import TrainConfig
    from kdlib.data import embedded_corpus

    printed, out05 = execute(tmp_path, "05_stage1_kd")
    assert "run folders in /" in printed  # absolute paths printed
    printed, out06 = execute(tmp_path, "06_stage2_alignment", prev_run=str(out05 / "stage1"))
    assert "missing or from another preset" not in printed
    printed, out07 = execute(tmp_path, "07_stage3_decoder", stage1_run=str(out05 / "stage1"),
                             ce_only_run=str(out05 / "ce_only"), stage2_run=str(out06 / "stage2"))
    assert "missing or from another preset" not in printed  # chained, not retrained
    for run in (out05 / "stage0", out05 / "stage1", out06 / "stage2", out07 / "stage3"):
        config = TrainConfig.from_json(run / "training_config.json")
        assert config.preset == PRESET and config.data_root == str(embedded_corpus("it")), run
        assert os.path.isabs(config.init_from or "/") and os.path.isabs(config.teacher_from or "/"), run
    # nothing trained twice: 06 and 07 hold only their own stage's run
    assert not {"stage0", "stage1", "ce_only"} & {p.name for p in out06.iterdir()}
    assert not {"stage0", "stage1", "ce_only", "stage2"} & {p.name for p in out07.iterdir()}
    for run in (out05 / "stage1", out06 / "stage2", out07 / "stage3"):  # the trainer's own record
        config = TrainConfig.from_json(run / "training_config.json")
        assert config.amp == "fp16"
        device = "cuda" if config.device == "auto" and torch.cuda.is_available() else config.device.replace("auto", "cpu")
        assert_placement(read(run / "summary.json")["placement"], device, str(run))
    for out in (out05, out06, out07):
        results = read(out / "results.json")
        assert_placement(results["placement"], results["device"], out.name)
    results = read(out07 / "results.json")
    assert [r["model"] for r in results["rows"]][:2] == ["teacher", "teacher, adapted (stage 0)"]
    assert config_of(out07 / "stage3").student_frame_factor == 3

    runs = {"stage0_run": out05 / "stage0", "ce_only_run": out05 / "ce_only", "stage1_run": out05 / "stage1",
            "stage3_run": out07 / "stage3"}
    printed, out08 = execute(tmp_path, "08_evaluation", **{k: str(v) for k, v in runs.items()})
    assert "missing or trained with another preset" not in printed
    assert not any(p.is_dir() and (p / "training_config.json").exists() for p in out08.iterdir())  # trained nothing
    measured = [r for r in table_rows(out08 / "comparison.json") if r.get("status") == "measured"]
    assert measured[0]["name"] == "teacher (tiny-random-v3)" and len(measured) == 6
    assert all(r["n_utterances"] == 3 for r in measured)

    printed, out10 = execute(tmp_path, "10_latent_space", run_dir=str(out07 / "stage3"))
    results = read(out10 / "latent_space.json")
    assert results["after_kd"] is True and results["frame_factor"] == 3, results.get("after_kd_source")
    assert_placement(results["placement"], results["device"], "10_latent_space")

    printed, out11 = execute(tmp_path, "11_distil_whisper_recipe", reference_run=str(out07 / "stage3"))
    assert "missing or from another preset" not in printed
    names = [r["name"] for r in table_rows(out11 / "comparison.json")]
    assert any("chapter 07" in n for n in names), names  # the reference row from chapter 07's run
    # distil-whisper's student keeps the teacher's encoder whole; the thesis method's merges 3:1
    assert config_of(out11 / "distil_all").student_frame_factor == 1
    assert config_of(out11 / "thesis_stage1").student_frame_factor == 3
