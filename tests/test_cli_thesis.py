"""The command line runs the thesis pipeline end to end at the thesis-shaped preset
(``thesis-tiny``): stage 0 (teacher adaptation) → I → II → III chained through ``teacher_from``
and ``init_from``, then ``evaluate`` and ``export``, each as ``python -m kdlib ...`` would."""

from __future__ import annotations

import json

from kdlib.__main__ import main


def _train(stage, run_dir, *sets):
    args = ["train", "--preset", "thesis-tiny", "--stage", str(stage), "--run-dir", str(run_dir), "--no-progress"]
    for text in sets:
        args += ["--set", text]
    assert main(args) == 0
    return json.loads((run_dir / "summary.json").read_text())


def test_cli_chains_stages_0_to_3_then_evaluates_and_exports(tmp_path, capsys):
    s0, s1, s2, s3 = (tmp_path / f"stage{i}" for i in range(4))
    summary0 = _train(0, s0)
    summary1 = _train(1, s1, f"teacher_from={s0}")
    summary2 = _train(2, s2, f"teacher_from={s0}", f"init_from={s1}")
    summary3 = _train(3, s3, f"teacher_from={s0}", f"init_from={s2}")
    for summary in (summary0, summary1, summary2, summary3):
        assert summary["steps"] >= 1 and summary["nonfinite_steps"] == 0
        assert summary["dev_loss"] is not None and summary["dev_wer"] is not None
    # stage 0 adapted the v3-like teacher's decoder only; stage II trained the student's encoder
    trainable0 = json.loads((s0 / "trainable.json").read_text())["student"]
    assert trainable0 and not any(".encoder." in n for n in trainable0)
    assert any(".encoder." in n for n in json.loads((s2 / "trainable.json").read_text())["student"])
    assert summary1["final_kl"] is not None and summary2["final_geo"] is not None
    config3 = json.loads((s3 / "training_config.json").read_text())
    assert config3["amp"] == "fp16" and config3["grad_checkpointing"] and config3["num_workers"] >= 2
    assert config3["student_frame_factor"] == 3

    assert main(["evaluate", "--run-dir", str(s3), "--split", "dev", "--limit", "2", "--max-new-tokens", "4"]) == 0
    metrics = json.loads((s3 / "metrics_dev.json").read_text())
    assert metrics["n_utterances"] == 2 and metrics["wer"] is not None
    assert main(["export", "--run-dir", str(s3)]) == 0
    merged = s3 / "merged"
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(merged)
    assert model.config.num_mel_bins == 80 and model.config.vocab_size == 51865  # the student, not the teacher
    capsys.readouterr()
