"""Length-grouped vs random batches: how much of each batch is padding? Prints fractions, never fails.

Two kinds of waste per epoch, for the same batches:

* **frames**: audio frames (10 ms log-mel frames) padded to the longest clip of the batch. Whisper
  itself pads every clip to 30 s (3000 frames) whatever the batching, so for the stock encoder
  this is what a length-aware encoder or data pipeline would waste; the fixed 30 s padding is
  printed alongside;
* **decoder tokens**: label positions padded to the longest label sequence of the batch (the
  decoder, the output projection over 51,865 tokens and the KL all run on these positions).

Corpora: the embedded Italian training split (real durations and real label lengths from the
Whisper tokenizer) and a synthetic MLS-like set (``--synthetic N`` clips, durations mostly 10-20 s,
tokens ~ 4.4 per second + 4 special tokens, with noise). Batches come from
`kdlib.data.LengthGroupedBatchSampler` (grouped by duration) and `kdlib.data.random_batches`;
waste is `kdlib.data.padding_waste`.

    .venv/bin/python benchmarks/padding.py [--batch 8 64] [--synthetic 20000] [--epochs 3]

``--quick``: the same table with 1,000 synthetic clips and one epoch (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse

import numpy as np

from kdlib import data

FRAMES_PER_SECOND = 100  # Whisper log-mel hop: 160 samples at 16 kHz
WINDOW_FRAMES = 3000


def embedded_lengths() -> tuple[list[float], list[int]]:
    """Durations (s) and label lengths (tokens) of the embedded Italian training split."""
    from kdlib import models

    scan = data.scan_mls(data.embedded_corpus("it"), "train")
    tokenizer = models.real_tokenizer()
    dataset = data.MLSDataset(scan.utterances, None, tokenizer)
    return [u.duration for u in scan.utterances], [len(dataset.labels_for(u.text, u.language)) for u in scan.utterances]


def synthetic_lengths(n: int, seed: int = 0) -> tuple[list[float], list[int]]:
    """MLS-like: 85 % uniform 10-20 s, 10 % 2-10 s, 5 % 20-30 s; tokens ~ 4.4/s (Italian
    read speech, ~2.5 words/s) with 15 % noise, plus Whisper's 4 special label tokens."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[0.85, 0.10, 0.05])
    low, high = np.array([10.0, 2.0, 20.0])[kind], np.array([20.0, 10.0, 30.0])[kind]
    durations = rng.uniform(low, high)
    tokens = np.maximum(1, np.round(durations * 4.4 * rng.normal(1.0, 0.15, n))).astype(int) + 4
    return durations.tolist(), tokens.tolist()


def waste(durations, tokens, batches) -> dict[str, float]:
    frames = [d * FRAMES_PER_SECOND for d in durations]
    padded_frames = sum(max(frames[i] for i in b) * len(b) for b in batches)
    padded_tokens = sum(max(tokens[i] for i in b) * len(b) for b in batches)
    return {
        "frames": data.padding_waste(frames, batches),
        "tokens": data.padding_waste(tokens, batches),
        "pad_frames": padded_frames - sum(frames),
        "pad_tokens": padded_tokens - sum(tokens),
    }


def report(name: str, durations, tokens, batch_sizes, epochs: int) -> None:
    n = len(durations)
    fixed = 1 - sum(durations) * FRAMES_PER_SECOND / (n * WINDOW_FRAMES)
    print(f"\n{name}: {n} clips, {sum(durations) / 3600:.2f} h, durations {min(durations):.1f}-{max(durations):.1f} s "
          f"(median {np.median(durations):.1f}), labels {min(tokens)}-{max(tokens)} tokens "
          f"(median {np.median(tokens):.0f})")
    print(f"  Whisper's fixed 30 s window: {fixed:.1%} of encoder input frames are padding, whatever the batching")
    print(f"  {'batch':>5}  {'sampler':<15} {'frame waste':>11} {'token waste':>11} {'padded tokens/epoch':>20}")
    for bs in batch_sizes:
        for sampler in ("random", "length-grouped"):
            rows = []
            for epoch in range(epochs):
                if sampler == "random":
                    batches = data.random_batches(n, bs, seed=epoch)
                else:
                    batches = data.LengthGroupedBatchSampler(durations, bs, shuffle=True, seed=0)
                    batches.set_epoch(epoch)
                    batches = batches.batches()
                rows.append(waste(durations, tokens, batches))
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            print(f"  {bs:>5}  {sampler:<15} {mean['frames']:>11.1%} {mean['tokens']:>11.1%} {mean['pad_tokens']:>20,.0f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--synthetic", type=int, default=20000, help="clips in the synthetic MLS-like set")
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged (different shuffles)")
    parser.add_argument("--quick", action="store_true", help="1,000 synthetic clips, one epoch (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.synthetic, args.epochs = 1000, 1
    durations, tokens = embedded_lengths()
    report("embedded Italian train split", durations, tokens, args.batch, args.epochs)
    durations, tokens = synthetic_lengths(args.synthetic)
    report("synthetic MLS-like", durations, tokens, args.batch, args.epochs)


if __name__ == "__main__":
    main()
