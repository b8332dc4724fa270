"""Does the demo student pay off? Issue 18's targets over several seeds, with mean and spread.

For each seed, the book's chain at one preset: stage 0 (teacher adaptation, once, shared by
every seed) → stage I (KD) → stage II (alignment) → stage III (decoder), and the CE-only control
with as many steps as the three stages together. Then, on the dev split and on the test split
(more clips where cheap), greedy, Whisper's basic normaliser:

* WER / CER of the teacher, the adapted teacher, the untrained student, the student after each
  stage and the CE-only control (mean ± sd over seeds; per-clip WER spread of the final student);
* speed in one process, same thread count: the teacher and the final student in transformers
  (greedy), the teacher in CTranslate2 float32 and the student's export in CTranslate2 int8
  (window students only: merged students are not a CTranslate2 shape);
* stage II: the mean geodesic to the teacher over its first and last steps.

Prints a table and the targets (met / missed); never fails on a number. ``--quick`` runs the
same chain on the smoke preset (tiny random pair) with one seed, two training clips, two steps a
stage and two dev clips, in a temporary folder: the same table in about 20 s
(tests/test_benchmarks.py runs it).

    .venv/bin/python benchmarks/student_payoff.py [--preset demo] [--seeds 0 1 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdlib import data, decode as dec, evaluate as ev
from kdlib.config import make_config
from kdlib.runs import export_merged, load_history, load_trained, teacher_model, untrained_student
from kdlib.train import run_stage


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values, pct=True):
    m, sd = _mean_sd(values)
    if m is None:
        return "–"
    k = 100 if pct else 1
    return f"{k * m:.1f} ± {k * sd:.1f}" if pct else f"{m:.2f} ± {sd:.2f}"


def _score(model, tok, fe, clips, refs, max_new_tokens):
    hyps = dec.transcribe(model, fe, tok, clips, max_new_tokens=max_new_tokens, batch_size=8)
    scores = dec.wer_cer(refs, hyps)
    per_clip = [dec.wer_cer([r], [h])["wer"] for r, h in zip(refs, hyps)]
    return scores["wer"], scores["cer"], per_clip


def _timed(fn, reps: int = 2) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--splits", nargs="+", default=["dev", "test"])
    parser.add_argument("--quick", action="store_true",
                        help="smoke preset, one seed, 2 steps a stage, 2 clips: the same table in seconds (tests)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.seeds, args.splits = "smoke", [0], ["dev"]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="payoff-") as tmp:
        return _run(args, Path(args.out or tmp))


def _run(args, out: Path) -> dict:
    quick = args.preset == "smoke"
    # --quick: every stage at its smallest (2 clips, 2 steps, one evaluation at the end)
    size = ({"max_train_utterances": 2, "max_dev_utterances": 2, "batch_size": 2, "max_steps": 2,
             "eval_every": 2, "save_every": 2} if args.quick else {})

    stage0 = out / "stage0"
    run_stage(make_config(args.preset, 0, overrides=size), stage0, progress=False, quiet=True)
    adapted = {"teacher_from": str(stage0)}
    runs: dict[int, dict[str, Path]] = {}
    geo: dict[int, tuple[float, float]] = {}
    for seed in args.seeds:
        base = {**size, **adapted, "seed": seed}
        r = {name: out / f"seed{seed}" / name for name in ("stage1", "stage2", "stage3", "ce_only")}
        c1 = make_config(args.preset, 1, overrides=base)
        run_stage(c1, r["stage1"], progress=False, quiet=True)
        c2 = make_config(args.preset, 2, overrides={**base, "init_from": str(r["stage1"])})
        run_stage(c2, r["stage2"], progress=False, quiet=True)
        c3 = make_config(args.preset, 3, overrides={**base, "init_from": str(r["stage2"])})
        run_stage(c3, r["stage3"], progress=False, quiet=True)
        total = c1.max_steps + c2.max_steps + c3.max_steps
        run_stage(make_config(args.preset, 1, overrides={**base, "kl_weight": 0.0, "max_steps": total}),
                  r["ce_only"], progress=False, quiet=True)
        hist = [h["geo"] for h in load_history(r["stage2"]) if h.get("geo") is not None]
        if hist:
            k = max(1, len(hist) // 4)
            geo[seed] = (statistics.fmean(hist[:k]), statistics.fmean(hist[-k:]))
        runs[seed] = r

    config = make_config(args.preset, 1)
    teacher = teacher_model(config)
    adapted_teacher = teacher_model(make_config(args.preset, 1, overrides=adapted))
    student0 = untrained_student(config)
    limit = 2 if args.quick else 4 if quick else None
    max_new = config.eval_max_new_tokens
    results: dict = {"preset": args.preset, "seeds": args.seeds, "threads": args.threads,
                     "normaliser": "whisper basic", "splits": {}}
    root = Path(config.data_root) if config.data_root else data.embedded_corpus(config.language)
    final_bundle = None
    for split in args.splits:
        scan = data.scan_mls(root, split, language=config.language, window_seconds=config.student_window_seconds)
        utts = scan.utterances[:limit] if limit else scan.utterances
        clips = [data.load_audio(u.audio).numpy() for u in utts]
        refs = [u.text for u in utts]
        rows: dict[str, list] = {}
        rows["teacher"] = [_score(*teacher, clips, refs, max_new)]
        rows["teacher adapted (stage 0)"] = [_score(*adapted_teacher, clips, refs, max_new)]
        rows["student untrained"] = [_score(*student0, clips, refs, max_new)]
        for name in ("stage1", "stage2", "stage3", "ce_only"):
            rows[name] = []
            for seed in args.seeds:
                model, tok, fe, _ = load_trained(runs[seed][name])
                rows[name].append(_score(model, tok, fe, clips, refs, max_new))
                if name == "stage3" and seed == args.seeds[0]:
                    final_bundle = (model, fe, tok)
        results["splits"][split] = {
            "n_clips": len(clips), "skipped": scan.n_skipped,
            "rows": {k: {"wer": [v[0] for v in vs], "cer": [v[1] for v in vs],
                         "per_clip_wer_sd": [float(np.std(v[2])) for v in vs]} for k, vs in rows.items()},
        }

    # speed: same process, same threads, same clips (the first split), greedy
    split = args.splits[0]
    scan = data.scan_mls(root, split, language=config.language, window_seconds=config.student_window_seconds)
    clips = [data.load_audio(u.audio).numpy() for u in (scan.utterances[:limit] if limit else scan.utterances)]
    audio_s = sum(len(c) for c in clips) / 16000
    t_model, t_tok, t_fe = teacher
    s_model, s_fe, s_tok = final_bundle
    speed = {"audio_seconds": audio_s}
    speed["teacher_tf_s"] = _timed(lambda: dec.transcribe(t_model, t_fe, t_tok, clips, max_new_tokens=max_new))
    speed["student_tf_s"] = _timed(lambda: dec.transcribe(s_model, s_fe, s_tok, clips, max_new_tokens=max_new))
    speed["tf_speedup"] = speed["teacher_tf_s"] / speed["student_tf_s"]
    if not getattr(s_model.config, "kdlib_merge", None):
        try:
            import ctranslate2  # noqa: F401

            with tempfile.TemporaryDirectory() as tmp:
                hf_t, hf_s = Path(tmp) / "teacher", export_merged(runs[args.seeds[0]]["stage3"], Path(tmp) / "student")
                t_model.save_pretrained(hf_t)
                t_tok.save_pretrained(hf_t)
                t_fe.save_pretrained(hf_t)
                ct_t = ev.CT2Whisper(ev.export_ct2(hf_t, Path(tmp) / "ct2_t", quantization="float32"),
                                     compute_type="float32", threads=args.threads)
                ct_s = ev.CT2Whisper(ev.export_ct2(hf_s, Path(tmp) / "ct2_s", quantization="int8"),
                                     compute_type="int8", threads=args.threads)
                speed["teacher_ct2_fp32_s"] = _timed(lambda: ct_t.transcribe(clips, max_new_tokens=max_new))
                speed["student_ct2_int8_s"] = _timed(lambda: ct_s.transcribe(clips, max_new_tokens=max_new))
                speed["ct2_speedup"] = speed["teacher_ct2_fp32_s"] / speed["student_ct2_int8_s"]
        except ImportError:
            pass
    results["speed"] = speed
    results["stage2_geodesic_first_last"] = geo

    # the table
    print(f"# student payoff · preset {args.preset} · seeds {args.seeds} · {args.threads} threads · "
          "greedy · Whisper basic normaliser")
    for split, block in results["splits"].items():
        print(f"\n## {split}: {block['n_clips']} clips ({block['skipped']} skipped)\n")
        print("| model | WER % (mean ± sd over seeds) | CER % | per-clip WER sd % |")
        print("|---|---:|---:|---:|")
        for name, r in block["rows"].items():
            print(f"| {name} | {_fmt(r['wer'])} | {_fmt(r['cer'])} | {_fmt(r['per_clip_wer_sd'])} |")
    print("\n## speed (same process and threads)\n")
    for k, v in speed.items():
        print(f"- {k}: {v:.3f}")
    print("\n## stage II: mean geodesic to the teacher, first vs last quarter of its steps\n")
    for seed, (a, b) in geo.items():
        print(f"- seed {seed}: {a:.4f} -> {b:.4f} rad ({'falls' if b < a else 'does not fall'})")
    dev = results["splits"][args.splits[0]]["rows"]
    m = {k: _mean_sd(v["wer"])[0] for k, v in dev.items()}
    s1, s2 = _mean_sd(dev["stage1"]["wer"])[0], _mean_sd(dev["stage2"]["wer"])[0]
    targets = {
        "transformers speed-up >= 2.5x": speed["tf_speedup"] >= 2.5,
        "CTranslate2 int8 vs teacher fp32 >= 5x": speed.get("ct2_speedup", 0) >= 5,
        "WER within 0.10 of the adapted teacher": m["stage3"] - m["teacher adapted (stage 0)"] <= 0.10,
        "below the untrained student": m["stage3"] < m["student untrained"],
        "below the CE-only control": m["stage3"] < m["ce_only"],
        "stage II: geodesic falls": bool(geo) and all(b < a for a, b in geo.values()),
        "stage II: WER no worse than after stage I": s2 <= s1,
    }
    results["targets"] = targets
    print(f"\n## targets ({args.splits[0]} split, means over seeds)\n")
    for name, ok in targets.items():
        print(f"- {name}: {'met' if ok else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
