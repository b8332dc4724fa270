"""The distillation forward: student and frozen teacher on one batch, and the loss parts.

`forward_losses` is the training step's forward, the one a reader of chapter 05 takes by hand:
the student reads the batch (or a frozen encoder's cached states), the frozen teacher gives its
logits (on the student's tokens) and encoder states (`teacher_forward`), the teacher's states are
put on the student's frame grid (`kdlib.frames.teacher_on_student_frames`), and
`kdlib.losses.DistillationLoss` combines the terms with the step's weights (`stage_weights`: KL
warm-up, stage III's contrastive decay). `dev_pass` scores the student during training
(dev loss and dev WER from one pass over the dev clips), with the same caches.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader

from kdlib.caches import EncoderCaches
from kdlib.config import TrainConfig
from kdlib.decode import length_sorted_batches, transcribe_features, wer_cer
from kdlib.distributed import Dist, gather_objects, sum_over_ranks
from kdlib.frames import teacher_on_student_frames
from kdlib.losses import LossWeights, cross_entropy, terms_reading
from kdlib.models import RunModels, decoder_inputs, merge_factor, teacher_outputs

# --------------------------------------------------------------------------------------------
# Loss weights of a step
# --------------------------------------------------------------------------------------------


def ramp(step: int, warmup_steps: int, value: float) -> float:
    """Linear ramp to `value` over `warmup_steps` (the KL weight warm-up): `value / warmup_steps`
    at step 0, `value` from step `warmup_steps - 1` on.

    Not 0 at step 0: a term with weight 0 is not computed, and the first step is the memory probe
    (its batch holds the longest clip, `data.LengthGroupedBatchSampler`). Starting from 0 let the
    probe run without the teacher and the KL, so a batch too big for the GPU failed only when the
    KL came in, at the next epoch's longest batch, hours later (issue 25)."""
    if warmup_steps <= 0:
        return value
    return value * min(1.0, (step + 1) / warmup_steps)


def linear_decay(step: int, max_steps: int, start: float, end: Optional[float]) -> float:
    """Linear interpolation start → end over the run (stage III's contrastive weight)."""
    if end is None:
        return start
    return start + (end - start) * min(1.0, step / max(1, max_steps - 1))


# --------------------------------------------------------------------------------------------
# Forward and loss
# --------------------------------------------------------------------------------------------


def forward_losses(models: RunModels, loss_fn, batch: dict, device: torch.device,
                   autocast: tuple[bool, Optional[torch.dtype]], taid_t: Optional[float] = None,
                   caches: Optional[EncoderCaches] = None) -> dict:
    """One forward of student (and frozen teacher) and the combined loss dict (``total`` has grad)."""
    enabled, dtype = autocast
    features = batch["input_features"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    student_model = models.student
    base_config = student_model.base_model.model.config
    dec_in = decoder_inputs(labels, base_config)
    w = loss_fn.weights
    need_hidden = any(getattr(w, term) > 0 for term in terms_reading("hidden"))
    need_logits = any(getattr(w, term) > 0 for term in terms_reading("teacher_logits"))
    with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=enabled):
        caches = caches or EncoderCaches()
        encoded = None
        if caches.student is not None:  # frozen student encoder: cached or no-grad states
            encoded = caches.student(features, batch["ids"], device)
            student_out = student_model(encoder_outputs=(encoded,), decoder_input_ids=dec_in, use_cache=False)
        else:
            student_out = student_model(input_features=features, decoder_input_ids=dec_in, use_cache=False)
        teacher_logits = teacher_hidden = None
        if models.teacher is not None and (need_logits or need_hidden):
            # Identical frozen encoders (distil-whisper's student): the teacher's decoder reads the
            # student's encoder states, so each batch costs one encoder forward, not two.
            teacher_features = batch.get("teacher_input_features", batch["input_features"])
            teacher_logits, teacher_hidden = teacher_forward(
                models.teacher, caches, batch["ids"], teacher_features, dec_in, labels, need_logits, device,
                encoded=encoded if caches.shared else None, vocab_index=models.vocab_index,
                need_hidden=need_hidden,
            )
        student_hidden = student_mask = None
        if need_hidden:
            # (batch, frames_s, d_student): what the student's decoder reads (window, merged)
            student_hidden = student_out.encoder_last_hidden_state
            # The teacher's states on the student's frame grid: student frame i is teacher frame
            # i inside the window, or teacher frames k·i .. k·i+k-1 when k frames are merged.
            teacher_hidden, student_mask = teacher_on_student_frames(
                teacher_hidden, batch["num_frames"].to(device),
                window_frames=base_config.max_source_positions, factor=merge_factor(base_config))
        return loss_fn(
            student_logits=student_out.logits,
            labels=labels,
            teacher_logits=teacher_logits,
            student_hidden=student_hidden,
            teacher_hidden=teacher_hidden if need_hidden else None,
            hidden_mask=student_mask,
            projector=models.projector,
            taid_t=taid_t,
            teacher_hidden_mask=student_mask,
        )


@torch.no_grad()
def teacher_forward(teacher, caches: EncoderCaches, ids: list[str], features: torch.Tensor,
                    dec_in: torch.Tensor, labels: torch.Tensor, need_logits: bool, device: torch.device,
                    encoded: Optional[torch.Tensor] = None, vocab_index: Optional[torch.Tensor] = None,
                    need_hidden: bool = True):
    """Frozen teacher: ``(logits (batch, tokens, vocab) or None, encoder states (batch, 1500, d))``.

    With caches, the encoder runs once per utterance and so does the decoder: its logits depend
    only on the (fixed) reference tokens of the utterance, so they are stored per utterance and
    every later epoch reads them instead of running the teacher at all. ``encoded``: the
    teacher's encoder states when the caller already has them (a shared, identical encoder).

    With a disk cache (``caches.disk``) holding every utterance of the batch, the logits are a
    `kdlib.losses.TopKLogits` read from it and the teacher does not run.

    ``vocab_index`` (a teacher with another vocabulary, e.g. large-v3 for a small student): the
    student's token ids are translated for the teacher's decoder, and the returned logits are
    the teacher's at the student's tokens, in the student's order ``(batch, tokens, vocab_student)``.
    ``features`` are the teacher's own log-mels."""
    tdev = next(teacher.parameters()).device
    if caches.disk is not None and caches.disk.has_all(ids):
        if vocab_index is not None:
            raise ValueError("teacher_cache: the cache holds top-k ids in the teacher's vocabulary, which "
                             "differs from the student's here; train with the live teacher (teacher_cache=None)")
        logits = caches.disk.topk(ids, labels.shape[1], device, labels=labels) if need_logits else None
        encoded = caches.teacher(features, ids, device) if need_hidden and caches.disk.has_hidden else None
        return logits, encoded
    if caches.teacher is None and encoded is None:  # nothing cached: the whole teacher, every step
        out = teacher_outputs(teacher, dec_in, input_features=features, vocab_index=vocab_index,
                              need_logits=need_logits)
        return (out.logits.to(device) if need_logits else None), out.encoder_hidden.to(device)
    if encoded is None:
        encoded = caches.teacher(features, ids, tdev)  # (batch, 1500, d_teacher)
    logits = None
    if need_logits:
        lengths = (labels != -100).sum(dim=1).tolist()
        logits = caches.logits.get(ids, lengths, labels.shape[1], device) if caches.logits else None
        if logits is None:
            logits = teacher_outputs(teacher, dec_in, encoder_outputs=encoded, vocab_index=vocab_index).logits
            if caches.logits is not None:
                caches.logits.put(ids, lengths, logits)
            logits = logits.to(device)
    return logits, encoded.to(device)


def stage_weights(config: TrainConfig, step: int):
    """`LossWeights` at `step`: KL warm-up and stage III's contrastive decay applied.

    ``kd_kind="taid"`` puts the KD weight on the TAID term instead of KL; ``alignment="curve"``
    puts the geometric weight on the curve term instead of the per-frame (point) term."""
    kd = ramp(step, config.kl_warmup_steps, config.kl_weight)
    curve = config.alignment == "curve" and config.geo_weight > 0
    return LossWeights(
        ce=config.ce_weight,
        kl=kd if config.kd_kind == "kl" else 0.0,
        taid=kd if config.kd_kind == "taid" else 0.0,
        temperature=config.temperature,
        geo=0.0 if curve else config.geo_weight,
        geo_kind=config.geo_kind,
        curve=config.geo_weight if curve else 0.0,
        alignment="curve" if curve else "point",
        contrastive=linear_decay(step, config.max_steps, config.contrastive_weight, config.contrastive_final_weight),
        contrastive_temperature=config.contrastive_temperature,
    )


# --------------------------------------------------------------------------------------------
# Dev scores during training
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def dev_pass(models: RunModels, dataset, collate, config: TrainConfig, device: torch.device,
             caches: Optional[EncoderCaches] = None, ctx: Optional[Dist] = None,
             autocast: tuple[bool, Optional[torch.dtype]] = (False, None), wer: Optional[bool] = None) -> dict:
    """The student's dev scores as it is now, in one pass over the dev set.

    Every clip is decoded and featurised once (the dev `DataLoader`), and each batch of log-mels
    serves both scores: ``dev_loss``, the mean token cross-entropy under teacher forcing, and
    (``wer``, default ``config.eval_wer``) greedy ``dev_wer`` / ``dev_cer`` (Whisper's basic
    normaliser) over ``dev_utterances`` clips. Both run under the run's ``autocast`` (the
    thesis: fp16 on the GPU, as training). A frozen student encoder's states come from
    ``caches`` (computed once per clip); a training encoder runs once per batch, its states shared
    by the loss and by decoding. Clips are batched by length.
    A clip that fails to decode is dropped and counted by the dataset, never a crash mid-run.
    Distributed: each rank scores its share of the clips; sums and transcripts are combined."""
    ctx = ctx or Dist()
    wer = config.eval_wer if wer is None else wer
    enabled, dtype = autocast
    student = models.student
    base_config = student.base_model.model.config
    text = {u.id: u.text for u in dataset.utterances}
    mine = list(range(ctx.rank, len(dataset), ctx.world))
    order = length_sorted_batches([dataset.utterances[i].duration for i in mine], config.batch_size)
    loader = DataLoader(dataset, batch_sampler=[[mine[j] for j in batch] for batch in order], collate_fn=collate)
    total, count, refs, hyps = 0.0, 0, [], []
    student.eval()
    for batch in loader:  # outside autocast: the loader computes log-mels in float32
        if batch is None:  # every clip of the batch failed to decode (counted by the dataset)
            continue
        features = batch["input_features"].to(device)
        labels = batch["labels"].to(device)
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=enabled):
            states = caches.student(features, batch["ids"], device) if caches is not None and caches.student is not None else None
            inputs = {"encoder_outputs": (states,)} if states is not None else {"input_features": features}
            out = student(**inputs, decoder_input_ids=decoder_inputs(labels, base_config), use_cache=False)
            tokens = int((labels != -100).sum())
            total += float(cross_entropy(out.logits.float(), labels)) * tokens
            count += tokens
            if wer:
                # the encoder ran once for this batch (teacher forcing): generate reads its states
                states = out.encoder_last_hidden_state if states is None else states
                hyps += transcribe_features(student, models.tokenizer, features, states=states, language=config.language,
                                            task=config.task, max_new_tokens=config.eval_max_new_tokens)
                refs += [text[i] for i in batch["ids"]]
    student.train()
    total, count = sum_over_ranks([total, count], ctx)
    scores = {"dev_loss": total / max(1, count)}
    if wer:
        if ctx.enabled:
            shards = gather_objects((refs, hyps), ctx)
            refs = [r for shard_refs, _ in shards for r in shard_refs]
            hyps = [h for _, shard_hyps in shards for h in shard_hyps]
        result = wer_cer(refs, hyps)
        scores.update(dev_wer=result["wer"], dev_cer=result["cer"], dev_utterances=len(refs))
    return scores
