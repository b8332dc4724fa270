"""A run folder belongs to one config (issue 26, first part): ``python -m kdlib train`` compares
the folder's ``training_config.json`` with the requested config before it writes anything; a
finished run rerun is left byte for byte as it was; values that would fail mid-run are refused
before any model loads."""

from __future__ import annotations

import hashlib
import json

import pytest

from kdlib.__main__ import main
from kdlib.config import ConfigError, make_config

SMALL = ["--set", "max_train_utterances=4", "--set", "max_dev_utterances=2", "--set", "batch_size=2",
         "--set", "eval_every=2", "--set", "save_every=2"]


def train(run_dir, *sets, max_steps=2):
    return main(["train", "--preset", "smoke", "--stage", "1", "--run-dir", str(run_dir), "--no-progress",
                 *SMALL, "--set", f"max_steps={max_steps}", *sets])


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_changed_config_or_a_hand_edit_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run) == 0
    before = digests(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dev_loss"] is not None

    # the same command again: the finished run is reused, every file byte for byte as it was
    assert train(run) == 0
    assert digests(run) == before

    # another lr, another LoRA rank, more steps: refused, naming the field with both values
    for change, field in ((["--set", "lr=0.5"], "lr: 0.001 there, 0.5 now"), (["--set", "lora_r=16"], "lora_r"),
                          ([], "max_steps: 2 there, 3 now")):
        capsys.readouterr()
        assert train(run, *change, max_steps=3 if not change else 2) == 2
        assert field in capsys.readouterr().err
        assert digests(run) == before  # nothing written, nothing lost

    # a hand edit of the folder's config is not silently overwritten either
    config_file = run / "training_config.json"
    edited = json.loads(config_file.read_text())
    edited["kl_weight"] = 0.25
    config_file.write_text(json.dumps(edited))
    assert train(run) == 2
    assert "kl_weight: 0.25 there, 1.0 now" in capsys.readouterr().err
    assert json.loads(config_file.read_text())["kl_weight"] == 0.25


def test_cadence_fields_reuse_the_finished_run(tmp_path):
    run = tmp_path / "run"
    assert train(run) == 0
    before = digests(run)
    assert main(["train", "--preset", "smoke", "--stage", "1", "--run-dir", str(run), "--no-progress",
                 *SMALL[:-4], "--set", "eval_every=1", "--set", "save_every=1", "--set", "max_steps=2"]) == 0
    assert digests(run) == before


@pytest.mark.parametrize("bad, message", [
    ("save_every=0", "save_every: must be at least 1"),
    ("eval_every=0", "eval_every: must be at least 1"),
    ("lr=0", "lr: must be positive"),
    ("lr=-0.1", "lr: must be positive"),
    ("min_lr=0.5", "min_lr: must be in [0, lr"),
    ("warmup_steps=-1", "warmup_steps: must be at least 0"),
    ("grad_clip=0", "grad_clip: must be positive"),
    ("lora_dropout=1.0", "lora_dropout: must be in [0, 1)"),
])
def test_values_that_would_fail_mid_run_are_refused_up_front(bad, message, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        make_config("smoke", stage=1, sets=[bad])
    assert message in str(err.value)
    # through the command line: exit status 2, the field named, nothing is created
    assert train(tmp_path / "run", "--set", bad) == 2
    assert f"kdlib train: {message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _cli(run_dir, *sets):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "KDLIB_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    args = [sys.executable, "-m", "kdlib", "train", "--preset", "smoke", "--stage", "1", "--run-dir", str(run_dir),
            "--no-progress", *SMALL, *[a for s in sets for a in ("--set", s)]]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_writer_a_second_process_stops_and_a_dead_holder_is_taken_over(tmp_path):
    """Two real processes on one folder: the second stops at once naming the first (PID, host);
    after the first is killed with SIGKILL the folder is free again, and the leftover temporary
    file of a killed write is removed by the next holder."""
    import signal
    import time

    run = tmp_path / "run"
    first = _cli(run, "max_steps=400", "save_every=1000", "eval_every=1000")
    lock = run / ".lock"
    deadline = time.time() + 240
    while not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.2)
    second = _cli(run, "max_steps=400", "save_every=1000", "eval_every=1000")
    out, err = second.communicate(timeout=240)
    assert second.returncode == 2, (out[-2000:], err[-2000:])
    assert f"in use by pid {first.pid} on " in err
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)

    (run / ".checkpoint.pt.tmp-99999").write_bytes(b"half a checkpoint")  # a killed write's leftover
    third = _cli(run, "max_steps=2", "save_every=1000", "eval_every=1000")
    # the killed run's config says max_steps=400: a run of another config, refused
    out, err = third.communicate(timeout=240)
    assert third.returncode == 2 and "max_steps: 400 there, 2 now" in err, err[-2000:]
    again = _cli(run, "max_steps=400", "save_every=1000", "eval_every=1000")
    deadline = time.time() + 240
    while f"pid {again.pid}" not in lock.read_text():  # the dead holder's lock is taken over
        assert again.poll() is None and time.time() < deadline, again.communicate()
        time.sleep(0.2)
    assert not (run / ".checkpoint.pt.tmp-99999").exists()
    again.kill()
    again.wait(timeout=60)
