"""The training loop: one function, read top to bottom.

`train(config)` does, in order (nanoGPT's habit: the loop is the page):

  setup    teacher and student (`kdlib.runs.build_models`), data (`kdlib.runs.build_data`,
           `kdlib.data.batch_stream`), optimizer, LR schedule, GradScaler, encoder caches;
  resume   from ``checkpoint.pt`` if the run folder has one (`kdlib.runs.load_checkpoint`);
  loop     forward + loss (`kdlib.distill.forward_losses`), backward, all-reduce, clip, step,
           schedule, log, evaluate (`kdlib.distill.dev_pass`), checkpoint;
  summary  final adapter, ``summary.json`` (`kdlib.runs.run_summary`).

Stages (see `kdlib.config.STAGE_TERMS`):
  0  teacher adaptation: LoRA fine-tuning of the teacher itself with CE (its own run folder);
  I  knowledge distillation: CE + KL(teacher ‖ student)·T², student LoRA trained;
  II representation alignment: CE + geodesic (point or curve) + InfoNCE through the projector;
  III decoder fine-tuning: encoder frozen, decoder LoRA trained with CE + KL; the contrastive
     term (decayed linearly to ``contrastive_final_weight``, 0.1) only when the encoder trains
     (``train_encoder=True``): with it frozen the term would train the projector alone.
Each stage starts from the previous stage's folder (``init_from``): its exported adapter
(``adapter_best/`` when early stopping kept one, else ``adapter_final/``). What a run folder
holds is described in `kdlib.runs`. `run_stage` trains a stage into a folder unless the folder
already holds a finished run of the same config.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from kdlib import data, distributed
from kdlib.caches import build_caches
from kdlib.config import ConfigError, TrainConfig
from kdlib.distill import dev_pass, forward_losses, stage_weights
from kdlib.files import atomic_write_json, exclusive, shown
from kdlib.losses import TERMS, DistillationLoss, TAIDSchedule
from kdlib.models import amp_settings, build_optimizer, placement, resolve_device, tensor_digest, trainable_report
from kdlib.progress import progress_bar
from kdlib.runs import (BEST_ADAPTER_DIR, HISTORY, build_data, build_models, has_checkpoint, load_checkpoint,
                        note_evaluation, reusable_run, rng_state, run_summary, save_adapter, save_checkpoint,
                        seed_everything, trainable_state)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left untouched."""


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the base LR at `step`: linear warm-up to 1, then cosine down to min_lr/lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip(scaler, optimizer, params, max_norm: float) -> float:
    """Unscale the gradients (the GradScaler's inf check) and clip their norm; returns the norm
    before clipping (not finite: an overflow, the step is skipped)."""
    scaler.unscale_(optimizer)
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def skip_step(optimizer, scaler, *, unscaled: bool) -> None:
    """A non-finite step: gradients dropped, no update, no schedule advance. After an unscale_
    (overflowing gradients) the scaler lowers its scale; without one it must not be updated."""
    optimizer.zero_grad(set_to_none=True)
    if unscaled:
        scaler.update()


def add_scalars(writer, prefix: str, values: dict, step: int) -> None:
    """TensorBoard scalars ``<prefix>/<key>`` (rank 0 only: other ranks have no writer)."""
    if writer is None:
        return
    for key, value in values.items():
        if key not in ("step", "dev_utterances") and value is not None:
            writer.add_scalar(f"{prefix}/{key}", value, step)


def train(config: TrainConfig, run_dir: str | Path | None = None, *, progress: bool = True,
          on_eval=None, ignore: tuple[str, ...] = ()) -> dict:
    """Run one stage; returns the summary dict (also written to ``summary.json``).

    ``on_eval(step, metrics)`` is called after every dev evaluation (metrics: ``dev_loss`` and,
    when ``eval_wer``, ``dev_wer``); it may raise to stop the run (e.g. ``optuna.TrialPruned``).

    The run folder belongs to one config and one writer: a folder holding another config is
    refused before anything is written (`RunFolderConflict`, each field with both values; cadence
    fields and ``ignore`` aside), a finished run of this config is returned as it is (its files
    untouched), and the folder is held (`kdlib.files.exclusive`) while the run writes, so a
    second process on it stops at once (`FolderBusy`, naming the holder).
    """
    run_dir = Path(run_dir or config.run_dir or f"runs/stage{config.stage}")
    if config.stage >= 2 and not config.init_from and not config.from_untrained:
        raise ConfigError(f"init_from: stage {config.stage} builds on the stage before it, and no run folder was given "
                          "(init_from = the previous stage's run). To train it from the untrained student on purpose "
                          "(an ablation), set from_untrained=true.")
    if config.data_root:  # before the folder is made: a wrong path leaves nothing behind
        for split in (config.train_split, config.dev_split):
            if not (Path(config.data_root) / split).is_dir():
                raise ConfigError(f"data_root: {Path(config.data_root) / split} is not a folder (an MLS language "
                                  f"folder holds {config.train_split}/ and {config.dev_split}/, each with "
                                  "transcripts.txt and audio/)")
    if (done := reusable_run(config, run_dir, ignore=ignore)) is not None:
        return done
    device = resolve_device(config.device)
    ctx = distributed.setup(device.type)  # torchrun / accelerate launch: one process per worker
    try:
        # rank 0 writes and holds the folder; the check again once held (another process may
        # have written its config in between)
        with exclusive(run_dir) if ctx.is_main else contextlib.nullcontext():
            if (done := reusable_run(config, run_dir, ignore=ignore)) is not None:
                return done
            return _train(config, run_dir, device, ctx, progress=progress, on_eval=on_eval)
    finally:
        distributed.teardown(ctx)


def _train(config: TrainConfig, run_dir: Path, device: torch.device, ctx, *, progress: bool, on_eval) -> dict:
    main = ctx.is_main  # only rank 0 writes the run folder and prints
    log = print if main else (lambda *a, **k: None)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_json(run_dir / "training_config.json", paths_relative=True)  # movable run folders
    seed_everything(config.seed)  # the same on every rank: identical initial LoRA weights
    autocast_on, autocast_dtype, use_scaler = amp_settings(config, device)

    models = build_models(config, device)
    report = trainable_report(models.student, [models.projector] if models.projector is not None else [])
    log(f"stage {config.stage} · {report}" + (f" · {ctx.world} data-parallel workers" if ctx.enabled else ""))
    if main:
        atomic_write_json(run_dir / "trainable.json", models.trainable)
    if ctx.enabled:
        seed_everything(config.seed + ctx.rank)  # from here on: a dropout stream of its own per rank

    train_set, dev_set, data_report = build_data(config, models.feature_extractor, models.tokenizer,
                                                 models.teacher_feature_extractor)
    for split, text in data_report.items():
        log(f"[{split}] {text}")
    collate = data.WhisperCollator()

    modules = [models.student] + ([models.projector] if models.projector is not None else [])
    optimizer = build_optimizer(modules, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                               lr=config.lr, min_lr=config.min_lr),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    caches = build_caches(models, config, train_set, dev_set)
    log("encoder outputs: teacher " + ("from the disk cache " + config.teacher_cache if caches.disk
                                       else "cached" if caches.teacher and caches.teacher.keep else "live")
          + ", student " + ("trains (live)" if caches.student is None else
                            "shares the teacher's (identical frozen encoder)" if caches.shared else "frozen, cached"))
    loss_fn = DistillationLoss()
    taid = TAIDSchedule(t_start=config.taid_t_start, total_steps=config.max_steps) if config.kd_kind == "taid" else None

    # ---- resume -------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "position": 0, "nonfinite_total": 0, "best_wer": None, "bad_evals": 0}
    history: list[dict] = []
    if has_checkpoint(run_dir):
        state, history = load_checkpoint(run_dir, models, optimizer, scheduler, scaler, state, ctx, log)
        if taid is not None and "taid" in state:
            taid.load_state_dict(state["taid"])
    else:
        log("no checkpoint: fresh optimizer, schedule and scaler")

    writer = SummaryWriter(str(run_dir / "tb")) if main else None
    stream = data.batch_stream(train_set, collate, config, state["epoch"], state["position"], ctx)
    models.student.train()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    nonfinite_in_row = 0
    bar = progress_bar(total=config.max_steps, initial=state["step"], desc=f"stage {config.stage}", disable=not (progress and main))
    last_eval: dict = {}
    stopped_early = False

    while state["step"] < config.max_steps:
        step = state["step"]
        loss_fn.weights = stage_weights(config, step)
        taid_t = taid.t if taid is not None else None
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        finite = True
        for _ in range(config.grad_accum):
            epoch, position, batch = next(stream)
            if batch is None or not finite:  # an undecodable slice (distributed), or a step already lost
                continue
            # forward + loss
            parts = forward_losses(models, loss_fn, batch, device, (autocast_on, autocast_dtype), taid_t=taid_t, caches=caches)
            if not torch.isfinite(parts["total"]):
                finite = False  # the rest of this step's micro-batches are drawn and left unused
                continue
            # backward
            scaler.scale(parts["total"] / config.grad_accum).backward()
            for key, value in parts.items():
                if value is not None:
                    parts_sum[key] = parts_sum.get(key, 0.0) + float(value.detach()) / config.grad_accum
        # all-reduce (distributed: average the trainable gradients; skip together or not at all)
        finite = distributed.all_true(finite, ctx)
        if finite:
            distributed.average_gradients(params, ctx)
        # clip (unscaled first: GradScaler.update() may only follow an unscale_)
        grad_norm = clip(scaler, optimizer, params, config.grad_clip) if finite else None
        if grad_norm is None or not math.isfinite(grad_norm):
            skip_step(optimizer, scaler, unscaled=grad_norm is not None)  # no update; the scale drops
            nonfinite_in_row, state["nonfinite_total"] = nonfinite_in_row + 1, state["nonfinite_total"] + 1
            state["epoch"], state["position"] = epoch, position
            if nonfinite_in_row >= config.max_nonfinite_in_row:
                raise TrainingDiverged(f"{nonfinite_in_row} non-finite steps in a row at step {step}: stopping. The "
                                       f"checkpoints in {run_dir} are those of the last saved step (digest-checked "
                                       "on resume); lower lr or check the data.")
            continue
        nonfinite_in_row = 0
        # step + schedule
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if taid is not None:  # distributed: every rank needs the same t, so use the mean TAID loss
            taid.update(distributed.sum_over_ranks([parts_sum["taid"]], ctx)[0] / ctx.world)
            state["taid"] = taid.state_dict()
        state.update(step=step + 1, epoch=epoch, position=position)
        # log
        history.append({"step": step + 1, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "seconds": time.perf_counter() - started, **({"taid_t": taid_t} if taid_t is not None else {}),
                        **{f"w_{k}": getattr(loss_fn.weights, k) for k in TERMS}, **parts_sum})
        if (step + 1) % config.log_every == 0:
            add_scalars(writer, "train", history[-1], step + 1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in parts_sum.items() if k in ("total", "ce", "kl", "geo", "contrastive")})
        bar.update(1)
        # evaluate
        if (step + 1) % config.eval_every == 0 or step + 1 == config.max_steps:
            last_eval = {"step": step + 1, **dev_pass(models, dev_set, collate, config, device, caches, ctx,
                                                      autocast=(autocast_on, autocast_dtype))}
            history[-1].update({k: v for k, v in last_eval.items() if k != "step"})
            add_scalars(writer, "dev", last_eval, step + 1)
            if main:
                bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()
                                                           if k not in ("step", "dev_utterances") and v is not None))
            if note_evaluation(state, last_eval) and main and config.early_stopping_patience:
                save_adapter(run_dir, models, BEST_ADAPTER_DIR)  # the adapter early stopping hands on
            if on_eval is not None:
                on_eval(step + 1, dict(last_eval))
            if config.early_stopping_patience and state["bad_evals"] >= config.early_stopping_patience:
                log(f"early stopping: no dev improvement in {state['bad_evals']} evaluations")
                stopped_early = True
        # checkpoint
        if (step + 1) % config.save_every == 0 or step + 1 == config.max_steps or stopped_early:
            rng_per_rank = distributed.gather_objects(rng_state(), ctx) if ctx.enabled else None
            if main:
                save_checkpoint(run_dir, models, optimizer, scheduler, scaler, dict(state), rng_per_rank)
                atomic_write_json(run_dir / HISTORY, history)
        if stopped_early:
            break
    bar.close()
    if main:
        writer.close()
        save_adapter(run_dir, models)
        atomic_write_json(run_dir / HISTORY, history)

    summary = run_summary(config, state, history, last_eval, stopped_early, report, ctx.world,
                          tensor_digest(trainable_state(models)),
                          placement(teacher=models.teacher, student=models.student, projector=models.projector))
    if main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def run_stage(config: TrainConfig, run_dir: str | Path, *, reuse: bool = True, progress: bool = True,
              on_eval=None, train_fn=None, quiet: bool = False, ignore: tuple[str, ...] = ()) -> dict:
    """Train one stage into ``run_dir`` unless it already holds a finished run of this very
    config (then its ``summary.json`` is returned). A folder holding a *different* config is
    refused (`RunFolderConflict` naming the fields) rather than overwritten, and an unfinished
    run of this config resumes.

    For runners (`kdlib.tune`): ``train_fn`` replaces `train` (same signature; ``on_eval`` is
    passed only when it takes one), ``quiet`` sends the trainer's printout to
    ``<run_dir>/train.log``, and ``ignore`` names more fields left out of the comparison (the
    pipeline's folders are already keyed by their upstream, so it ignores ``init_from``)."""
    run_dir = Path(run_dir)
    done = reusable_run(config, run_dir, ignore=ignore) if reuse else None
    if done is not None:
        if not quiet:
            print(f"{shown(run_dir)}: finished run of this config found, reusing it")
        return done
    train_fn = train_fn or train
    kwargs: dict[str, Any] = {"progress": progress}
    if on_eval is not None:
        try:
            takes_on_eval = "on_eval" in inspect.signature(train_fn).parameters
        except (TypeError, ValueError):
            takes_on_eval = False
        if takes_on_eval:
            kwargs["on_eval"] = on_eval
    if train_fn is train:  # the same comparison inside train, under the folder's lock
        kwargs["ignore"] = ignore
    if not quiet:
        return train_fn(config, run_dir, **kwargs)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a", encoding="utf-8") as logfile, \
            contextlib.redirect_stdout(logfile), contextlib.redirect_stderr(logfile):
        return train_fn(config, run_dir, **kwargs)
