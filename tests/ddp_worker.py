"""One worker of the 2-process gloo test (tests/test_distributed.py), started by torchrun (or
directly, without ``RANK``, as the 1-process reference).

Trains the `smoke` preset into RUN_DIR and writes, outside it, ``OUT/rank<r>.json``:

- ``summary``: the summary this rank returned (with the exact digest of its trained weights);
- ``writes``: every path under RUN_DIR that this process opened for writing, created, renamed or
  removed (recorded by an audit hook);
- ``global_batches``: every epoch's global batches as `kdlib.data.epoch_batches` made them
  (utterance ids), and ``steps``: for every batch this rank trained on, its epoch, position and
  the utterance ids and real-token count of the slice it took;

and ``OUT/grad<r>.pt``: the trainable gradients of the first optimizer step as the optimizer saw
them (after the all-reduce, before clipping), in parameter order.

``KDLIB_TEST_EVEN_FIRST_BATCH=1``: the first global batch is one whose two rank slices hold the
same number of real tokens (a batch of the epoch and an order within it are searched for). Each
rank's loss is a mean over its own tokens, so only then is the average of the two slices'
gradients the gradient of the whole batch's token mean, which the test compares to 1e-6."""

import json
import os
import sys
from itertools import permutations
from pathlib import Path

run_dir, out_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
extra = sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))
writes: list[str] = []


def _inside(path) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(run_dir)
    except (TypeError, ValueError, OSError):
        return False


def audit(event: str, args) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and isinstance(path, (str, bytes, os.PathLike)) and _inside(path):
            writes.append(f"open {path}")
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree") and args and _inside(args[0]):
        writes.append(f"{event} {args[0]}")


sys.addaudithook(audit)

import torch  # noqa: E402

from kdlib import distributed  # noqa: E402
from kdlib import data, train as T  # noqa: E402
from kdlib.config import make_config  # noqa: E402

global_batches: dict[int, list[list[str]]] = {}
steps: list[dict] = []
grads: list[torch.Tensor] = []


def _tokens(dataset, index: int) -> int:
    u = dataset.utterances[index]
    return len(dataset.labels_for(u.text, u.language))


def _even_first(dataset, batches: list[list[int]]) -> list[list[int]]:
    for b, batch in enumerate(batches):
        for order in permutations(batch):
            if sum(_tokens(dataset, i) for i in order[0::2]) == sum(_tokens(dataset, i) for i in order[1::2]):
                return [list(order)] + batches[:b] + batches[b + 1:]
    raise SystemExit("no batch of the epoch splits into two slices with equal token counts")


real_epoch_batches = data.epoch_batches


def epoch_batches(dataset, config, epoch):
    batches = real_epoch_batches(dataset, config, epoch)
    if os.environ.get("KDLIB_TEST_EVEN_FIRST_BATCH") == "1" and epoch == 0:
        batches = _even_first(dataset, batches)
    global_batches[epoch] = [[dataset.utterances[i].id for i in b] for b in batches]
    return batches


real_batch_stream = data.batch_stream


def batch_stream(dataset, collate, config, epoch, position, ctx=None):
    for epoch_, position_, batch in real_batch_stream(dataset, collate, config, epoch, position, ctx):
        if batch is not None:
            steps.append({"epoch": epoch_, "position": position_, "ids": list(batch["ids"]),
                          "tokens": int((batch["labels"] != -100).sum())})
        yield epoch_, position_, batch


real_average = distributed.average_gradients


def average_gradients(params, ctx):
    real_average(params, ctx)
    if not grads:  # the first optimizer step
        grads.extend(p.grad.detach().clone() for p in params)


data.epoch_batches, data.batch_stream, distributed.average_gradients = epoch_batches, batch_stream, average_gradients

sets = ["max_steps=6", "batch_size=4", "eval_every=3", "save_every=3", "eval_wer=true",
        "max_train_utterances=8", "max_dev_utterances=4", *extra]
config = make_config("smoke", stage=1, sets=sets)
summary = T.train(config, run_dir, progress=False)
out_dir.mkdir(parents=True, exist_ok=True)
torch.save(grads, out_dir / f"grad{rank}.pt")
(out_dir / f"rank{rank}.json").write_text(json.dumps(
    {"summary": summary, "writes": writes, "steps": steps,
     "global_batches": {str(k): v for k, v in global_batches.items()}}, default=str))
