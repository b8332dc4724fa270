"""Should the frozen teacher run under bfloat16 autocast on this CPU? Prints ratios, never fails.

Runs the offline whisper-base teacher (a forward over a batch of 30 s inputs with a short decoder
prefix, as a distillation step does) in float32 and under CPU bfloat16 autocast, then compares
speed and how much the teacher's outputs move. `kdlib.models.TeacherWrapper` uses bfloat16 on
CPUs with bfloat16 instructions (`kdlib.models.cpu_has_fast_bf16`); this script is the evidence.

    .venv/bin/python benchmarks/teacher_autocast_cpu.py [--batch 4] [--repeats 3]

``--quick``: the same printout for the tiny random teacher (`kdlib.models.tiny_random_pair`),
batch 1, 4 tokens, one repeat: seconds (tests/test_benchmarks.py). ``--model tiny-random`` picks
that teacher at any size.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from kdlib import models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-base", help="a load_whisper name or tiny-random")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny random teacher, batch 1, 4 tokens, 1 repeat (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.tokens, args.repeats = "tiny-random", 1, 4, 1

    bundle = models.tiny_random_pair()[0] if args.model == "tiny-random" else models.load_whisper(args.model)
    model = models.freeze_teacher(bundle.model)
    torch.manual_seed(0)
    feats = torch.randn(args.batch, model.config.num_mel_bins, 3000)
    ids = torch.randint(0, 50000, (args.batch, args.tokens))
    modes = {
        "float32": contextlib.nullcontext,
        "bfloat16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }
    outputs, seconds = {}, {}
    for name, ctx in modes.items():
        with torch.no_grad(), ctx():
            outputs[name] = model(input_features=feats, decoder_input_ids=ids)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                model(input_features=feats, decoder_input_ids=ids)
        seconds[name] = (time.perf_counter() - start) / args.repeats

    ref, low = outputs["float32"], outputs["bfloat16 autocast"]
    enc_ref, enc_low = ref.encoder_last_hidden_state, low.encoder_last_hidden_state.float()
    logp_ref, logp_low = ref.logits.log_softmax(-1), low.logits.float().log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp_low)).sum(-1).mean()
    agree = (logp_ref.argmax(-1) == logp_low.argmax(-1)).float().mean()
    print(f"{args.model}, batch {args.batch} x 30 s + {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, cpu_has_fast_bf16={models.cpu_has_fast_bf16()}")
    for name, s in seconds.items():
        print(f"  {name:18s} {s:6.2f} s per forward")
    print(f"  speed-up bf16 / fp32: {seconds['float32'] / seconds['bfloat16 autocast']:.2f}x")
    print(f"  encoder relative L2 difference: {float((enc_ref - enc_low).norm() / enc_ref.norm()):.4f}")
    print(f"  KL(fp32 || bf16) per token: {float(kl):.2e} nats; argmax agreement {float(agree):.1%}")


if __name__ == "__main__":
    main()
