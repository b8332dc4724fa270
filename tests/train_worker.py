"""``python -m kdlib`` with faults injected for the resume tests (tests/test_train.py).

Runs ``kdlib.__main__.main(sys.argv[1:])``; environment variables, all optional:

- ``KDLIB_TEST_TRACE=FILE``: one JSON line per training batch, appended as it is drawn
  (``{"epoch", "position", "ids"}``), so a killed run leaves the batches it reached.
- ``KDLIB_TEST_KILL_AT_FORWARD=N``: SIGKILL this process at the start of the N-th training
  forward (N-1 batches trained; the optimizer step of batch N never happens).
- ``KDLIB_TEST_KILL_IN_CHECKPOINT=N``: SIGKILL this process in the middle of writing the N-th
  checkpoint: half of its bytes written and flushed to whatever file the writer opened, the rest
  never. A writer that writes over ``checkpoint.pt`` in place loses the previous checkpoint.
"""

import io
import json
import os
import signal
import sys

import torch

from kdlib import data, distill as DL, runs as R
from kdlib.__main__ import main


def _kill(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


trace = os.environ.get("KDLIB_TEST_TRACE")
if trace:
    real_stream = data.batch_stream

    def batch_stream(dataset, collate, config, epoch, position, ctx=None):
        for epoch_, position_, batch in real_stream(dataset, collate, config, epoch, position, ctx):
            with open(trace, "a") as out:
                out.write(json.dumps({"epoch": epoch_, "position": position_,
                                      "ids": None if batch is None else list(batch["ids"])}) + "\n")
            yield epoch_, position_, batch

    data.batch_stream = batch_stream

kill_at = int(os.environ.get("KDLIB_TEST_KILL_AT_FORWARD", "0"))
if kill_at:
    real_forward, forwards = DL.forward_losses, [0]

    def forward_losses(*args, **kwargs):
        forwards[0] += 1
        if forwards[0] == kill_at:
            _kill(f"train_worker: SIGKILL at training forward {kill_at}")
        return real_forward(*args, **kwargs)

    DL.forward_losses = forward_losses

kill_in_save = int(os.environ.get("KDLIB_TEST_KILL_IN_CHECKPOINT", "0"))
if kill_in_save:
    real_save, saves = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if R.CHECKPOINT in os.path.basename(name):
            saves[0] += 1
            if saves[0] == kill_in_save:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                if hasattr(f, "write"):
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                else:
                    with open(f, "wb") as handle:
                        handle.write(data[: len(data) // 2])
                _kill(f"train_worker: SIGKILL in checkpoint write {kill_in_save} "
                      f"({len(data) // 2} of {len(data)} bytes written to {name})")
        return real_save(obj, f, *args, **kwargs)

    torch.save = save

sys.exit(main(sys.argv[1:]))
