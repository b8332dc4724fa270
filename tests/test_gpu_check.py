"""scripts/gpu_check.py at cut-down sizes on the CPU (``--tiny``): every check runs through
kdlib's code and reports ok, and the JSON lines also land in ``--out``. On a GPU the same script
runs at the thesis shapes (large-v3 and whisper-small configs, batch 64)."""

from __future__ import annotations

import importlib.util
import json

from conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_are_the_real_thesis_pair():
    check = _script()
    assert check.LARGE_V3 == dict(d_model=1280, layers=(32, 32), heads=20, ffn=5120, num_mel_bins=128, vocab_size=51866)
    assert check.SMALL == dict(d_model=768, layers=(12, 12), heads=12, ffn=3072, num_mel_bins=80, vocab_size=51865)


def test_gpu_check_runs_tiny_on_cpu(tmp_path, capsys):
    out = tmp_path / "check.jsonl"
    status = _script().main(["--tiny", "--device", "cpu", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == printed
    failed = [r for r in lines if not r["ok"]]
    assert status == 0 and not failed, failed
    by_check = {}
    for record in lines:
        by_check.setdefault(record["check"], []).append(record)
    assert set(by_check) == {"setup", "stage1_step", "stage2_step", "dev_decode", "dataloader", "resume", "nonfinite"}
    setup = by_check["setup"][0]
    assert setup["teacher"]["num_mel_bins"] == 128 and setup["teacher"]["vocab_size"] == 51866
    assert setup["student"]["num_mel_bins"] == 80 and setup["student"]["vocab_size"] == 51865
    assert [r["clip_s"] for r in by_check["stage1_step"]] == [1.0, 2.0]
    for record in by_check["stage1_step"] + by_check["stage2_step"]:
        # fp16 on the CPU as on the GPU: the GradScaler may skip a first overflowing step, then trains
        assert record["grad_scaler"] and record["step_s"] > 0
        assert record["steps"] == 3 and record["finite_steps"] >= 2 and record["finite"], record
    assert by_check["dev_decode"][0]["student_s_per_1000_clips"] > 0
    assert by_check["dataloader"][0]["workers_2_clips_per_s"] > 0
    assert by_check["resume"][0]["same_weights"] and by_check["resume"][0]["next_step_finite"]
    nonfinite = by_check["nonfinite"][0]
    assert nonfinite["inf_loss"]["weights_unchanged"] and nonfinite["inf_grad"]["weights_unchanged"]
    assert nonfinite["inf_grad"]["scale_after_skip_and_next"] < nonfinite["inf_grad"]["scale_before"]
