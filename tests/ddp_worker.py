"""One worker of the 2-process gloo test (tests/test_distributed.py), started by torchrun.

Trains the `smoke` preset into RUN_DIR and writes, outside it, ``OUT/rank<r>.json``: the summary
this rank returned (with the exact digest of its trained weights) and every path under RUN_DIR
that this process opened for writing, created, renamed or removed (recorded by an audit hook)."""

import json
import os
import sys
from pathlib import Path

run_dir, out_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
extra = sys.argv[3:]
rank = int(os.environ["RANK"])
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

from kdlib.config import make_config  # noqa: E402
from kdlib.train import train  # noqa: E402

sets = ["max_steps=6", "batch_size=4", "eval_every=3", "save_every=3", "eval_wer=true",
        "max_train_utterances=8", "max_dev_utterances=4", *extra]
config = make_config("smoke", stage=1, sets=sets)
summary = train(config, run_dir, progress=False)
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"rank{rank}.json").write_text(json.dumps({"summary": summary, "writes": writes}, default=str))
