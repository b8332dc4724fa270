"""Issue 16, item 6: stage III's contrastive term, with the student's encoder frozen, reaches no
student weight: its gradient lands on the projector alone, which no later stage and no exported
model uses. So `make_config` drops it from stage III unless the encoder trains. These tests
measure that claim on one batch (the student's gradients are identical with and without the
term) and show the one thing the term did change: gradient clipping over all trainable
parameters, projector included, scaled the decoder's update."""

from __future__ import annotations

import pytest
import torch

from kdlib import caches as C, data, distill as DL, runs as R
from kdlib.config import make_config
from kdlib.losses import DistillationLoss


def _grads(config, batch):
    torch.manual_seed(0)
    models = R.build_models(config, torch.device("cpu"))
    models.student.eval()  # no dropout: the two forwards must be comparable
    caches = C.build_caches(models, config)
    loss_fn = DistillationLoss(DL.stage_weights(config, 0))
    parts = DL.forward_losses(models, loss_fn, batch, torch.device("cpu"), (False, None), caches=caches)
    parts["total"].backward()
    student = {n: p.grad.clone() for n, p in models.student.named_parameters() if p.requires_grad}
    projector = {n: p.grad for n, p in models.projector.named_parameters() if p.requires_grad}
    return student, projector, parts


@pytest.fixture(scope="module")
def batch():
    config = make_config("smoke", stage=3)
    models = R.build_models(config, torch.device("cpu"))
    train_set, _, _ = R.build_data(config, models.feature_extractor, models.tokenizer)
    return data.WhisperCollator()([train_set[i] for i in range(4)])


def test_stage3_drops_contrastive_when_the_encoder_is_frozen():
    assert make_config("smoke", stage=3).contrastive_weight == 0.0
    assert make_config("thesis", stage=3).contrastive_weight == 0.0
    on = make_config("thesis", stage=3, overrides={"train_encoder": True})
    assert on.contrastive_weight > 0 and on.contrastive_final_weight == pytest.approx(0.1)


def test_frozen_encoder_contrastive_reaches_only_the_projector(batch):
    without = make_config("smoke", stage=3)
    with_term = make_config("smoke", stage=3, overrides={"contrastive_weight": 0.5})
    s0, p0, parts0 = _grads(without, batch)
    s1, p1, parts1 = _grads(with_term, batch)
    assert parts0["contrastive"] is None and float(parts1["contrastive"]) > 0
    assert s0.keys() == s1.keys() and not any(".encoder." in n for n in s0)
    for name in s0:  # every trained student weight gets exactly the same gradient
        assert torch.equal(s0[name], s1[name]), name
    assert not p0  # without the term nothing uses the projector: it does not train
    assert p1 and any(float(g.abs().sum()) > 0 for g in p1.values())


def test_the_term_only_enters_the_clip_norm(batch):
    """What the dropped term could do to the kept weights: nothing through its gradient, but the
    global clip norm counts the projector's gradient too, so where clipping engages it shrinks the
    decoder's step (measured at smoke size, 8 steps, clip 1.0: the mean grad norm rose from 0.143
    to 0.180, under the clip, and the student's weights were bit-identical with and without)."""
    s1, p1, _ = _grads(make_config("smoke", stage=3, overrides={"contrastive_weight": 0.5}), batch)
    student_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in s1.values()]))
    with_projector = torch.linalg.vector_norm(torch.stack([g.norm() for g in [*s1.values(), *p1.values()]]))
    assert with_projector > student_norm
