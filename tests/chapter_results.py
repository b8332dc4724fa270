"""What every chapter's ``<out_dir>/results.json`` must hold when it runs at smoke size.

The chapters' prose states demo-size numbers, each marked with the results key it comes from
(scripts/check_claims.py); `make book` compares them at demo size. At smoke size the values
differ, so the test harness (tests/prepare_chapters.py adds a last cell to every prepared
chapter, whether nbval or papermill runs it) calls `assert_results`:

- every key a marker in the chapter's prose names exists (a number, or null where the smoke run
  skips that part): deleting a number from a chapter's results fails the chapter's test;
- the keys of `RANGES` exist and lie in their ranges (structure and plausibility);
- `EXACT` values, where the chapter is deterministic at smoke size (frame arithmetic, parameter
  counts of the tiny pair), are equal.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_claims  # noqa: E402

WER = (0.0, 10.0)  # a looping decoder inserts words: WER can exceed 1 by far
SHARE = (0.0, 1.0)
POSITIVE = (0.0, math.inf)

# chapter stem → {dotted key: (low, high)}; every key must be a number in [low, high]
RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "00_tour": {"clips": (1, 3), "wer.teacher": WER, "wer.student_before_KD": WER, "wer.student_after_KD": WER,
                "trainable_percent": (0.0, 100.0), "loss.ce.first": POSITIVE, "loss.ce.last": POSITIVE,
                "loss.kl.first": POSITIVE, "loss.kl.last": POSITIVE},
    "01_data_loader": {"kept.train": (1, math.inf), "kept.dev": (1, math.inf), "hours.train": POSITIVE},
    "02_whisper_frames": {"seconds": (0.1, 30.0), "padding_percent": (0.0, 100.0),
                          "frames.encoder_valid": (1, 1500), "frames.mel_valid": (1, 3000),
                          "embedding_params_M": POSITIVE, "sizes.0.params_M": POSITIVE},
    "03_losses": {"hard_ce.teacher": POSITIVE, "hard_ce.student": POSITIVE, "hard_vs_soft.top.0.p.1": SHARE,
                  "hard_vs_soft.top.1.p.1": SHARE, "hard_vs_soft.outside_top.2": SHARE,
                  "kl_vs_T.grad_ratio_T2.4": POSITIVE},
    "04_lora": {"trainable_counts.teacher.dec_self_qv": (1, math.inf), "trainable_counts.student.ffn": (1, math.inf),
                "thesis_trainable_r32.whisper-large-v3.qkv_all": (1, math.inf)},
    "05_stage1_kd": {"dev_clips": (1, math.inf), "rows.teacher.wer": WER, "rows.teacher.cer": WER,
                     "rows.student_untrained.wer": WER, "rows.ce_only.wer": WER, "rows.stage1.wer": WER,
                     "rows.stage1.n_utterances": (1, math.inf), "teacher_fit.train_p": SHARE,
                     "teacher_fit.dev_p": SHARE, "payoff.dev.stage1.wer": (0.0, 1000.0)},
    "06_stage2_alignment": {"steps": (1, math.inf), "train_geo.first_quarter": (0.0, math.pi),
                            "train_geo.last_quarter": (0.0, math.pi), "dev_geodesic.stage1": (0.0, math.pi),
                            "dev_geodesic.stage2": (0.0, math.pi)},
    "07_stage3_decoder": {"dev_clips": (1, math.inf), "table.teacher.wer": WER, "table.student_untrained.wer": WER,
                          "table.ce_only.wer": WER, "table.stage1.wer": WER, "table.stage2.wer": WER,
                          "table.stage3.wer": WER, "table.stage3.cer": WER, "table.stage3.n_utterances": (1, math.inf)},
    "08_evaluation": {"clips": (1, math.inf), "rows.teacher.wer": WER, "rows.stage3.wer": WER,
                      "rows.teacher.n_parameters": (1, math.inf), "rows.stage3.n_parameters": (1, math.inf)},
    "09_search_and_ablations": {"best_trial": (0, math.inf), "ablations.main.dev_loss": POSITIVE,
                                "ablations.main.dev_wer": WER, "ablations.no_stage_2.dev_loss": POSITIVE,
                                "monitor.flags.0": (1, math.inf)},
    "10_latent_space": {"clips": (1, math.inf), "frame_points": (1, math.inf),  # cosines: null when widths differ
                        "preservation.PCA.knn_overlap": SHARE, "dtw.after_mean": (0.0, 2.0)},
    "11_distil_whisper_recipe": {"dev_clips": (1, math.inf), "pseudo.clips": (1, math.inf), "pseudo.wer": WER,
                                 "rows.teacher.wer": WER, "rows.distil_unfiltered.wer": WER,
                                 "rows.thesis_stage1.wer": WER, "step_seconds.min": POSITIVE},
}

# chapter stem → {dotted key: value} at smoke size, where the chapter is deterministic
EXACT: dict[str, dict[str, float]] = {
    # the embedded corpus is the same at every size: the default clip and the dev split's longest
    "02_whisper_frames": {"frames.mel_total": 3000, "frames.encoder_total": 1500, "frames.student_total": 500,
                          "seconds": 3.27, "frames.encoder_valid": 164, "longest.padding_percent": 68.8},
    # LoRA counts are architecture arithmetic: the tiny random pair's at smoke, large-v3's always
    "04_lora": {"thesis_trainable_r32.whisper-large-v3.qkv_all": 23_592_960,
                "trainable_counts.teacher.dec_self_qv": 8192, "trainable_counts.student.dec_self_qv": 2048,
                "trainable_counts.student.ffn": 9216, "trainable_counts.student.qkvo_all": 16384},
    "09_search_and_ablations": {"monitor.flags.0": 900, "monitor.factors.0": 0.5, "monitor.factors.1": 0.25,
                                "monitor.factors.2": 0.125},
}


def problems(notebook: Path, results: dict) -> list[str]:
    """Everything wrong with a chapter's smoke-size results; empty when all is well."""
    stem = Path(notebook).stem
    found = check_claims.missing_keys(notebook, results, allow_null=True)
    for key, (low, high) in RANGES.get(stem, {}).items():
        value = check_claims.lookup(results, key)
        if value is check_claims._MISSING:
            found.append(f"{stem}: results.json has no {key}, expected a number in [{low}, {high}]")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            found.append(f"{stem}: results.json {key} = {value!r}, expected a number in [{low}, {high}]")
        elif not low <= value <= high:
            found.append(f"{stem}: results.json {key} = {value!r}, outside [{low}, {high}]")
    for key, expected in EXACT.get(stem, {}).items():
        value = check_claims.lookup(results, key)
        if value is check_claims._MISSING or value is None or abs(value - expected) > 1e-9 * max(1.0, abs(expected)):
            found.append(f"{stem}: results.json {key} = {value!r}, expected exactly {expected!r} (deterministic)")
    return found


def assert_results(notebook: Path, results_path: Path) -> None:
    """The harness's check (tests/prepare_chapters.py): raise naming every problem."""
    results_path = Path(results_path)
    assert results_path.is_file(), f"{Path(notebook).stem} wrote no {results_path} (every chapter writes <out_dir>/results.json)"
    results = json.loads(results_path.read_text(encoding="utf-8"))
    found = problems(notebook, results)
    assert not found, "\n".join(found)
