"""distil-whisper's recipe: the `distil` preset and the shared frozen encoder (one encoder
forward per batch, the teacher's decoder reading the student's encoder states)."""

from __future__ import annotations

import pytest
import torch

from kdlib import caches as C, distill as DL, models as M, runs as R, train as T
from kdlib.config import ConfigError, make_config


def distil_smoke(**overrides):
    """The recipe on the tiny pair: a student built from the tiny teacher (same encoder)."""
    recipe = dict(student="from-teacher", student_decoder_layers=1, lora_preset="decoder_all", train_encoder=False, projector=False,
                  ce_weight=0.8, kl_weight=1.0, temperature=2.0, kl_warmup_steps=0, lora_dropout=0.0)
    return make_config("smoke", stage=1, overrides={**recipe, **overrides})


def test_distil_preset_is_the_papers_recipe():
    c = make_config("distil")
    assert (c.ce_weight, c.kl_weight, c.temperature, c.kl_warmup_steps) == (0.8, 1.0, 2.0, 0)
    # 4 maximally spaced decoder layers of 6 (distil-small.en keeps 4 of 12); the whole encoder
    assert c.student == "distil-base" and c.student_decoder_layers == 4 and c.student_encoder_layers is None
    assert c.train_encoder is False and c.projector is False and c.lora_preset == "decoder_all"
    assert c.geo_weight == 0 and c.contrastive_weight == 0
    with pytest.raises(ConfigError, match="stage must be 1"):
        make_config("distil", stage=2)


def test_decoder_all_lora_leaves_the_encoder_untouched():
    models = R.build_models(distil_smoke(), torch.device("cpu"))
    lora = [n for n, _ in models.student.named_parameters() if "lora_" in n]
    assert lora and not any(".encoder." in n for n in lora)
    assert any(".fc1." in n for n in lora) and any("encoder_attn" in n for n in lora)
    assert C.same_encoder(models.student, models.teacher)


def _count_encoder_calls(*modules):
    calls = []
    handles = [m.get_encoder().register_forward_hook(lambda *a: calls.append(1)) for m in modules]
    return calls, handles


@pytest.mark.parametrize("encoder_cache", ["off", "memory"])
def test_shared_encoder_runs_once_per_batch_and_matches_a_separate_teacher(encoder_cache):
    from kdlib import data
    from kdlib.losses import DistillationLoss

    config = distil_smoke(encoder_cache=encoder_cache)
    models = R.build_models(config, torch.device("cpu"))
    caches = C.build_caches(models, config)
    assert caches.shared
    train_set, _, _ = R.build_data(config, models.feature_extractor, models.tokenizer)
    batch = data.WhisperCollator()([train_set[i] for i in range(3)])
    loss_fn = DistillationLoss()
    loss_fn.weights = DL.stage_weights(config, 0)

    calls, handles = _count_encoder_calls(models.student, models.teacher)
    shared = DL.forward_losses(models, loss_fn, batch, torch.device("cpu"), (False, None), caches=caches)
    for h in handles:
        h.remove()
    assert len(calls) == 1, f"{len(calls)} encoder forwards for one batch"

    # The same batch with no sharing and no caches: student and teacher each run their encoder.
    calls, handles = _count_encoder_calls(models.student, models.teacher)
    separate = DL.forward_losses(models, loss_fn, batch, torch.device("cpu"), (False, None), caches=C.EncoderCaches())
    for h in handles:
        h.remove()
    assert len(calls) == 2
    for key in ("ce", "kl", "total"):
        torch.testing.assert_close(shared[key], separate[key], rtol=1e-5, atol=1e-6, msg=key)
    assert float(shared["kl"]) > 0


def test_teacher_logits_from_the_shared_states_equal_a_full_teacher_forward():
    from kdlib import data

    config = distil_smoke(encoder_cache="off")
    models = R.build_models(config, torch.device("cpu"))
    caches = C.build_caches(models, config)
    train_set, _, _ = R.build_data(config, models.feature_extractor, models.tokenizer)
    batch = data.WhisperCollator()([train_set[i] for i in range(2)])
    labels = batch["labels"]
    dec_in = M.decoder_inputs(labels, models.teacher.config)
    with torch.no_grad():
        student_states = models.student.get_encoder()(batch["input_features"]).last_hidden_state
        full = models.teacher(input_features=batch["input_features"], decoder_input_ids=dec_in, use_cache=False).logits
    logits, states = DL.teacher_forward(models.teacher, caches, batch["ids"], batch["input_features"], dec_in,
                                       labels, True, torch.device("cpu"), encoded=student_states)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(states, student_states)


def test_distil_recipe_trains(tmp_path):
    summary = T.train(distil_smoke(max_steps=3, eval_every=3, save_every=3), tmp_path, progress=False)
    assert summary["final_kl"] is not None and summary["final_ce"] is not None
    assert summary["final_geo"] is None and summary["final_contrastive"] is None
    trainable = (tmp_path / "trainable.json").read_text()
    assert "encoder" not in trainable.replace("encoder_attn", "")
