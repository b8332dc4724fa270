"""What does kdlib's training loop cost on top of the bare step? Prints the ratio, never fails.

* **kdlib**: `kdlib.train.train` itself (stage I), so every step does what a real run does:
  batch from the DataLoader + collate, forward (student + cached teacher), `DistillationLoss`,
  backward, grad-norm clip, GradScaler, optimizer step, LR schedule, the history record, a
  TensorBoard scalar per term (``log_every=1``), the non-finite checks. A step's time is the
  interval between two consecutive calls of `kdlib.distill.forward_losses` (recorded by a
  wrapper), so the one-off work (model build, final evaluation and checkpoint) is not counted.
* **bare**: the same model (same config and seed) and the same batch in a plain loop:
  ``forward_losses`` → ``backward`` → ``optimizer.step`` → ``zero_grad``, nothing else.

To compare steps and not data loading, both see the same batch: the training set is the
``--batch`` first clips, decoded once and served from memory (`build_data` is replaced for
this script only), so each of kdlib's epochs is that one batch.

    .venv/bin/python benchmarks/train_step.py [--preset smoke|demo] [--steps 8] [--batch 4]

``--quick``: the same printout on the smoke pair, batch 2, 4 steps, once: seconds
(tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from kdlib import caches as C, data, distill as DL, models as M, runs as R, train as T
from kdlib.config import make_config
from kdlib.losses import DistillationLoss
from kdlib.models import build_optimizer


class InMemory(torch.utils.data.Dataset):
    """A decoded copy of an `MLSDataset` (items computed once)."""

    def __init__(self, dataset):
        self.utterances = dataset.utterances
        self.items = [dataset[i] for i in range(len(dataset))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def kdlib_steps(config) -> list[float]:
    # the trainer's own references (kdlib.train imports them at its top) are the ones to wrap
    build_data, forward_losses = T.build_data, T.forward_losses
    stamps: list[float] = []

    def in_memory(*args, **kwargs):
        train_set, dev_set, report = build_data(*args, **kwargs)
        return InMemory(train_set), dev_set, report

    def timed(*args, **kwargs):
        stamps.append(time.perf_counter())
        return forward_losses(*args, **kwargs)

    T.build_data, T.forward_losses = in_memory, timed
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            T.train(config, run_dir, progress=False)
    finally:
        T.build_data, T.forward_losses = build_data, forward_losses
    return [b - a for a, b in zip(stamps, stamps[1:])][1:]  # first interval: warm-up


def bare_steps(config) -> list[float]:
    R.seed_everything(config.seed)
    device = M.resolve_device(config.device)
    models = R.build_models(config, device)
    # as kdlib.train.train builds it: the teacher's own log-mels when the student's window is shorter
    train_set, _, _ = R.build_data(config, models.feature_extractor, models.tokenizer, models.teacher_feature_extractor)
    batch = data.collate([train_set[i] for i in range(len(train_set))])
    caches = C.build_caches(models, config, train_set)
    loss_fn = DistillationLoss(DL.stage_weights(config, 0))
    modules = [models.student] + ([models.projector] if models.projector is not None else [])
    optimizer = build_optimizer(modules, lr=config.lr)
    models.student.train()
    stamps = []
    for _ in range(config.max_steps):
        stamps.append(time.perf_counter())
        parts = DL.forward_losses(models, loss_fn, batch, device, (False, None), caches=caches)
        parts["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])][2:]  # skip the warm-up steps (caches fill)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke", choices=["smoke", "demo"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="alternate kdlib/bare this many times")
    parser.add_argument("--quick", action="store_true", help="smoke pair, batch 2, 4 steps, one repeat (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.steps, args.repeats = "smoke", 2, 4, 1
    config = make_config(args.preset, stage=1, overrides={
        "batch_size": args.batch, "max_train_utterances": args.batch, "max_dev_utterances": 1,
        "max_steps": args.steps, "warmup_steps": 1, "eval_every": 10**6, "save_every": 10**6,
        "eval_wer": False, "device": "cpu", "log_every": 1})
    kdlib, bare = [], []
    for _ in range(args.repeats):  # alternate, so a burst of load on a shared machine hits both
        kdlib += kdlib_steps(config)
        bare += bare_steps(config)
    k, b = statistics.median(kdlib), statistics.median(bare)
    print(f"{args.preset} pair, stage I, batch {args.batch}, {args.steps} steps x {args.repeats}, "
          f"{torch.get_num_threads()} threads, CPU float32")
    print(f"  kdlib train() step   median {k * 1e3:8.1f} ms  (min {min(kdlib) * 1e3:.1f})")
    print(f"  bare loop step       median {b * 1e3:8.1f} ms  (min {min(bare) * 1e3:.1f})")
    print(f"  kdlib / bare: {k / b:.3f}x median, {min(kdlib) / min(bare):.3f}x min")


if __name__ == "__main__":
    main()
