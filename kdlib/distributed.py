"""Data-parallel training with plain ``torch.distributed``: what the loop needs and nothing more.

Launch the same command on every worker with ``torchrun`` or ``accelerate launch``; both set
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which is all
`setup` reads::

    torchrun --nproc_per_node 4 -m kdlib train --preset thesis --stage 1 --run-dir runs/stage1
    accelerate launch --num_processes 4 -m kdlib train --preset thesis --stage 1 --run-dir runs/stage1

How the loop uses it (see `kdlib.train.train`):

- ``batch_size`` stays the *global* batch: every rank computes the same list of batches for an
  epoch (a pure function of seed and epoch) and takes its slice ``batch[rank::world]``, so a
  resumed or rescaled run sees the same data order, and the thesis' batch 64 means 64 clips per
  optimizer step whatever the number of GPUs.
- Gradients of the trainable parameters (LoRA + projector: a few MB) are averaged with one
  all-reduce per optimizer step, after accumulation and before clipping; every rank then takes
  the identical AdamW step, so parameters stay identical without broadcasting them again.
- Whether a step is skipped (non-finite loss or gradients) is agreed by all ranks, and dev
  metrics are computed on shards and combined, so early stopping is the same decision everywhere.
- Only rank 0 writes the run folder (config, TensorBoard, history, checkpoints, adapter,
  summary); every rank reads the checkpoint on resume, and each rank's RNG state is saved.

Gloo (CPU) and NCCL (CUDA) are both supported; a CPU test runs two gloo workers on ``smoke``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world`` workers (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when `setup` created the process group (and `teardown` ends it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str = "cpu") -> Dist:
    """Join the process group the launcher describes in the environment, or return the
    single-process `Dist` when ``WORLD_SIZE`` is absent or 1. A group created elsewhere (for
    example by ``accelerate``) is used as it is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the run with torchrun "
                "or accelerate launch, which set them"
            )
        backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend)
        owns = True
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, owns_group=owns)


def teardown(ctx: Dist) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(batch: list[int], ctx: Dist) -> list[int]:
    """This rank's slice of a global batch of dataset indices."""
    return batch[ctx.rank :: ctx.world] if ctx.enabled else batch


def _reduce_device() -> torch.device:
    """Where collectives run: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_true(flag: bool, ctx: Dist) -> bool:
    """True on every rank only when ``flag`` is true on every rank (e.g. "my loss is finite")."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_reduce_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def average_gradients(params: list[torch.Tensor], ctx: Dist) -> None:
    """Average ``.grad`` of ``params`` over ranks with one flat all-reduce (a missing gradient
    counts as zero, so a parameter unused on one rank still gets the others' gradient)."""
    if not ctx.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]).to(_reduce_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype)
        offset += n


def sum_over_ranks(values: Iterable[float], ctx: Dist) -> list[float]:
    """Element-wise sum of a few numbers over ranks (float64, on the CPU for gloo)."""
    values = list(values)
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def gather_objects(obj: Any, ctx: Dist) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled; for small things only)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out
