"""Data-parallel training: two gloo workers on the CPU (torchrun) train the `smoke` preset.

Checks what data parallelism must guarantee: every rank ends with bitwise-identical trainable
weights (gradients are averaged before the step), only rank 0 writes the run folder, a global
batch is split across ranks, and the run folder is the same thesis layout as a 1-process run."""

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
from kdlib.train import CHECKPOINT, trainable_state

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir: Path, out_dir: Path, *sets: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(WORKER), str(run_dir), str(out_dir), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
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

    # only rank 0 wrote under the run folder; rank 0 did write it
    assert ranks[1]["writes"] == []
    assert ranks[0]["writes"], "the audit hook saw no write at all: the check itself is broken"
    for name in ("training_config.json", "summary.json", "training_history.json", "adapter_final"):
        assert (run_dir / name).exists(), name
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    history = json.loads((run_dir / "training_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 7))
    assert "2 data-parallel workers" in proc.stdout


def test_data_parallel_training_moves_the_weights_like_one_process(tmp_path):
    """The averaged step is a real step: the weights leave their initial values, and after one
    step they move the way a single process on the whole batch moves them (not bitwise: each
    rank's loss is a mean over its own tokens)."""
    from kdlib.config import make_config
    from kdlib.train import build_models, train

    sets = ["max_steps=1", "warmup_steps=0", "lora_dropout=0.0", "eval_every=100", "save_every=1"]
    _torchrun(tmp_path / "ddp", tmp_path / "out", *sets)
    config = make_config("smoke", stage=1, sets=["max_steps=1", "warmup_steps=0", "lora_dropout=0.0",
                                                  "eval_every=100", "save_every=1", "batch_size=4",
                                                  "eval_wer=false", "max_train_utterances=8",
                                                  "max_dev_utterances=4"])
    train(config, tmp_path / "single", progress=False)
    ddp = torch.load(tmp_path / "ddp" / CHECKPOINT, map_location="cpu", weights_only=True)["trainable"]
    one = torch.load(tmp_path / "single" / CHECKPOINT, map_location="cpu", weights_only=True)["trainable"]
    initial = trainable_state(build_models(config, torch.device("cpu")))
    moved = sum(float((ddp[k] - initial[k]).abs().sum()) for k in initial)
    assert moved > 0
    # AdamW's first step is about lr·sign(gradient) per weight, so compare directions: the
    # averaged half-batch gradients must point where the whole-batch gradient points.
    keys = sorted(one)
    d_ddp = torch.cat([(ddp[k] - initial[k]).flatten() for k in keys])
    d_one = torch.cat([(one[k] - initial[k]).flatten() for k in keys])
    cosine = float(torch.nn.functional.cosine_similarity(d_ddp, d_one, dim=0))
    assert cosine > 0.9, cosine

def math_finite(x) -> bool:
    import math

    return x is not None and math.isfinite(x)
