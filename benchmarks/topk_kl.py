"""How much KL does a top-k teacher cache lose? Exact KL (full logits) vs `kl_divergence_topk`.

On the demo: the real whisper-base teacher, teacher-forced on the embedded Italian dev set, against
two students:

* the preset's **untrained student** built from the teacher (demo: whisper-base's encoder on a
  10 s window, all 6 decoder layers; the teacher reads its own 30 s log-mels), no training: where
  distillation starts;
* the **teacher plus Gaussian logit noise** (``--noise``, std in logit units): a student close to
  the teacher, as late in training, KL small, so a fixed absolute error weighs more.

For k in ``--ks`` (default 8, 32, 64) at ``--temperatures`` (default 2, distil-whisper's): per-token
exact KL; the lumped-tail top-k KL and its relative error ``(exact - topk) / exact`` (never
negative: biased low by ``p_tail * KL(p(.|tail) || q(.|tail))``); the same top-k plus
``--tail-samples`` tokens drawn from the teacher's tail (unbiased; its signed error is sampling
noise); and the teacher's mass outside the top k.

    .venv/bin/python benchmarks/topk_kl.py [--limit 20] [--noise 1.0] [--ks 8 32 64] [--temperatures 2]

``--quick``: the same tables on the smoke preset (tiny random pair), 2 dev clips, 16 tail samples:
seconds (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import time

from kdlib.config import make_config
from kdlib.teacher_cache import measure_topk_error
from kdlib.runs import load_pair as _load_pair, build_data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[2.0])
    parser.add_argument("--limit", type=int, default=None, help="dev clips (default: all 20)")
    parser.add_argument("--noise", type=float, default=1.0, help="logit noise std of the second student")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tail-samples", type=int, default=64, help="m of the sampled-tail estimator")
    parser.add_argument("--quick", action="store_true", help="smoke preset, 2 dev clips, 16 tail samples (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.limit, args.batch, args.tail_samples = "smoke", 2, 2, 16
    config = make_config(args.preset, stage=1, overrides={"max_dev_utterances": args.limit, "max_train_utterances": 1})
    teacher, student = _load_pair(config)
    # the student reads its own window's log-mels (demo: 10 s), the teacher Whisper's 30 s ones
    own = teacher.feature_extractor if teacher.feature_extractor.n_samples != student.feature_extractor.n_samples else None
    _, dev_set, _ = build_data(config, student.feature_extractor, student.tokenizer, own)
    students = {f"untrained {config.student} student": student.model.eval(),
                f"teacher + N(0, {args.noise:g}^2) logit noise": args.noise}
    start = time.perf_counter()
    r = measure_topk_error(teacher.model.eval(), students, dev_set, ks=args.ks, temperatures=args.temperatures,
                           tail_samples=args.tail_samples, batch_size=args.batch, progress=False)
    print(f"{args.preset}: {config.teacher} teacher, {len(dev_set)} dev clips, {r['tokens']} tokens "
          f"({time.perf_counter() - start:.0f} s)")
    for name, per_t in r["students"].items():
        for t, row in per_t.items():
            print(f"\n{name}, T = {t:g}: exact KL*T^2 {row['exact_kl']:.4f} nats/token")
            print(f"  {'k':>5} {'lumped KL':>10} {'rel. error':>11} {f'+{args.tail_samples} tail':>11} "
                  f"{'rel. error':>11} {'teacher p_tail':>15}")
            for k, c in row["k"].items():
                print(f"  {k:>5} {c['topk_kl']:>10.4f} {c['relative_error']:>11.2%} {c['sampled_kl']:>11.4f} "
                      f"{c['sampled_relative_error']:>+11.2%} {c['p_tail']:>15.4f}")


if __name__ == "__main__":
    main()
