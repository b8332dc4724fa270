"""Data-parallel training: two gloo workers on the CPU (torchrun) train the `smoke` preset.

Checks what data parallelism must guarantee: every rank ends with bitwise-identical trainable
weights (gradients are averaged before the step), only rank 0 writes the run folder, every global
batch is split across ranks (the slices are disjoint and together are the batch), the averaged
gradient is the whole batch's gradient, and the run folder is the same thesis layout as a
1-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlib import distributed, models
from kdlib.runs import CHECKPOINT

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir: Path, out_dir: Path, *sets: str, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """``nproc=0``: the worker alone, without torchrun: a plain 1-process run."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] if nproc else [sys.executable])
    cmd = [*launcher, str(WORKER), str(run_dir), str(out_dir), *sets]
    # PYTHONPATH: the workers import this checkout's kdlib, not whichever one the venv installed
    root = str(WORKER.parents[1])
    pythonpath = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath, **(env or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_shard_splits_a_global_batch_without_overlap():
    batch = list(range(10))
    parts = [distributed.shard(batch, distributed.Dist(rank=r, world=3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == batch
    assert [len(p) for p in parts] == [4, 3, 3]
    assert distributed.shard(batch, distributed.Dist()) == batch


def test_digest_changes_with_one_bit():
    a = {"w": torch.ones(3)}
    b = {"w": torch.ones(3)}
    assert models.tensor_digest(a) == models.tensor_digest(b)
    b["w"][1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert models.tensor_digest(a) != models.tensor_digest(b)


def test_two_gloo_workers_stay_identical_and_only_rank0_writes(tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    proc = _torchrun(run_dir, out_dir)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    s0, s1 = ranks[0]["summary"], ranks[1]["summary"]

    # identical weights on both ranks, and they are the weights rank 0 saved
    assert s0["world_size"] == s1["world_size"] == 2
    assert s0["trainable_digest"] == s1["trainable_digest"]
    saved = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    assert models.tensor_digest(saved["trainable"]) == s0["trainable_digest"]
    assert len(saved["rng_per_rank"]) == 2
    # both ranks saw the same (combined) dev metrics, so early stopping is one decision
    assert s0["dev_loss"] == s1["dev_loss"] and s0["dev_wer"] == s1["dev_wer"]
    assert s0["steps"] == 6 and math_finite(s0["final_kl"])

    # every step's global batch was split: the two slices are disjoint and together are the batch
    batches = ranks[0]["global_batches"]
    assert batches == ranks[1]["global_batches"], "the ranks computed different global batches"
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    assert len(steps0) == len(steps1) == 6
    for a, b in zip(steps0, steps1):
        assert (a["epoch"], a["position"]) == (b["epoch"], b["position"])
        whole = batches[str(a["epoch"])][a["position"] - 1]
        assert len(whole) == 4, whole
        assert not set(a["ids"]) & set(b["ids"]), f"step at {a['epoch']}/{a['position']}: both ranks took {set(a['ids']) & set(b['ids'])}"
        assert sorted(a["ids"] + b["ids"]) == sorted(whole), (a["ids"], b["ids"], whole)

    # only rank 0 wrote under the run folder; rank 0 did write it
    assert ranks[1]["writes"] == []
    assert ranks[0]["writes"], "the audit hook saw no write at all: the check itself is broken"
    for name in ("training_config.json", "summary.json", "training_history.json", "adapter_final"):
        assert (run_dir / name).exists(), name
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    history = json.loads((run_dir / "training_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 7))
    assert "2 data-parallel workers" in proc.stdout


def test_two_rank_gradient_is_the_whole_batch_gradient(tmp_path):
    """The averaged gradient of a 2-rank step equals a single process's gradient over the whole
    global batch, to 1e-6: a sum instead of a mean (twice the gradient) or ranks that train on
    the same half would both fail. Each rank's loss is a mean over its own real tokens, so the
    first batch is chosen with equal token counts in both slices (see ddp_worker.py); with
    unequal counts the average of the two token means is not the whole batch's token mean."""
    sets = ["max_steps=1", "warmup_steps=0", "lora_dropout=0.0", "eval_every=100", "save_every=1",
            "eval_wer=false"]
    even = {"KDLIB_TEST_EVEN_FIRST_BATCH": "1"}
    _torchrun(tmp_path / "ddp", tmp_path / "out2", *sets, env=even)
    _torchrun(tmp_path / "single", tmp_path / "out1", *sets, nproc=0, env=even)
    r0, r1, one = (json.loads((tmp_path / d / f"rank{r}.json").read_text())
                   for d, r in (("out2", 0), ("out2", 1), ("out1", 0)))
    assert r0["steps"][0]["tokens"] == r1["steps"][0]["tokens"], "the chosen batch's slices differ in tokens"
    assert sorted(r0["steps"][0]["ids"] + r1["steps"][0]["ids"]) == sorted(one["steps"][0]["ids"])
    assert len(one["steps"][0]["ids"]) == 4

    g_ddp = torch.load(tmp_path / "out2" / "grad0.pt")
    g_ddp1 = torch.load(tmp_path / "out2" / "grad1.pt")
    g_one = torch.load(tmp_path / "out1" / "grad0.pt")
    assert len(g_ddp) == len(g_one) > 0
    for a, b in zip(g_ddp, g_ddp1):
        assert torch.equal(a, b), "the ranks stepped with different gradients"
    flat_ddp = torch.cat([g.flatten() for g in g_ddp])
    flat_one = torch.cat([g.flatten() for g in g_one])
    assert float(flat_one.abs().max()) > 1e-4, "the reference gradient is zero: nothing is compared"
    torch.testing.assert_close(flat_ddp, flat_one, rtol=0, atol=1e-6)

    # and the step taken from it: both runs end with the same weights
    ddp = torch.load(tmp_path / "ddp" / CHECKPOINT, map_location="cpu", weights_only=True)["trainable"]
    single = torch.load(tmp_path / "single" / CHECKPOINT, map_location="cpu", weights_only=True)["trainable"]
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6, msg=key)


def math_finite(x) -> bool:
    import math

    return x is not None and math.isfinite(x)
