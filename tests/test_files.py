"""kdlib.files: the one atomic writer, folder replacement, and how chapters show paths."""

from __future__ import annotations

import json

import pytest

from kdlib import files


def test_an_interrupted_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    files.atomic_write_json(target, {"step": 1})

    def broken(handle):
        handle.write(b'{"step": ')
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(target, broken)
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_replace_dir_swaps_a_whole_folder(tmp_path):
    target = tmp_path / "adapter_final"
    target.mkdir()
    (target / "old.bin").write_text("old")
    tmp = files.fresh_tmp_dir(target)
    (tmp / "new.bin").write_text("new")
    files.replace_dir(tmp, target)
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_final"]


def test_shown_paths_are_relative_inside_the_repository_and_absolute_outside(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "runs" / "05").mkdir(parents=True)
    monkeypatch.chdir(repo / "notebooks")  # where papermill runs a chapter
    assert files.shown(repo / "runs" / "05") == "../runs/05"
    assert files.shown("../runs/05") == "../runs/05"
    elsewhere = tmp_path / "elsewhere"
    assert files.shown(elsewhere) == str(elsewhere)
