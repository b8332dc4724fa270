"""``python -m kdlib`` with faults injected for the resume tests (tests/test_train.py).

Runs ``kdlib.__main__.main(sys.argv[1:])``; environment variables, all optional:

- ``KDLIB_TEST_TRACE=FILE``: one JSON line per training batch, appended as it is drawn
  (``{"epoch", "position", "ids"}``), so a killed run leaves the batches it reached.
- ``KDLIB_TEST_KILL_AT_FORWARD=N``: SIGKILL this process at the start of the N-th training
  forward (N-1 batches trained; the optimizer step of batch N never happens).
- ``KDLIB_TEST_KILL_IN_CHECKPOINT=N``: SIGKILL this process in the middle of writing the N-th
  checkpoint: half of its bytes written and flushed to whatever file the writer opened, the rest
  never. A writer that writes over ``checkpoint.pt`` in place loses the previous checkpoint.
- ``KDLIB_TEST_KILL_AT_TEACHER_BATCH=N``: SIGKILL at the N-th teacher batch of a cache build
  (``python -m kdlib cache-teacher``), with the earlier batches written into its folder.
- ``KDLIB_TEST_KILL_IN_EXPORT=1``: SIGKILL in ``python -m kdlib export`` once the merged model is
  written into the temporary folder, before it is moved into place.
"""

import json
import os
import signal
import sys

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
    from kdlib import files

    real_atomic, saves = files.atomic_write_bytes, [0]

    class HalfThenKill:
        """A file handle that writes half of the first block it is given, flushes it to disk and
        kills the process."""

        def __init__(self, handle, name):
            self.handle, self.name = handle, name

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            os.fsync(self.handle.fileno())
            _kill(f"train_worker: SIGKILL in checkpoint write {kill_in_save} "
                  f"({len(data) // 2} of {len(data)} bytes written for {self.name})")

    def atomic_write_bytes(path, write, **kwargs):
        if os.path.basename(str(path)) == R.CHECKPOINT:
            saves[0] += 1
            if saves[0] == kill_in_save:
                return real_atomic(path, lambda h: write(HalfThenKill(h, path)), **kwargs)
        return real_atomic(path, write, **kwargs)

    files.atomic_write_bytes = atomic_write_bytes

kill_at_teacher = int(os.environ.get("KDLIB_TEST_KILL_AT_TEACHER_BATCH", "0"))
if kill_at_teacher:
    from kdlib import teacher_cache as TC

    real_outputs, batches = TC.teacher_outputs, [0]

    def teacher_outputs(*args, **kwargs):
        batches[0] += 1
        if batches[0] == kill_at_teacher:
            _kill(f"train_worker: SIGKILL at teacher batch {kill_at_teacher}")
        return real_outputs(*args, **kwargs)

    TC.teacher_outputs = teacher_outputs

if os.environ.get("KDLIB_TEST_KILL_IN_EXPORT"):
    real_digests = R.write_folder_digests

    def write_folder_digests(folder):
        if "merged" in os.path.basename(str(folder)):
            _kill(f"train_worker: SIGKILL in export, {folder} written, not moved into place")
        return real_digests(folder)

    R.write_folder_digests = write_folder_digests

sys.exit(main(sys.argv[1:]))
