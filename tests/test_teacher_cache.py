"""The offline teacher cache (kdlib.teacher_cache) and the top-k KL (kdlib.losses.kl_divergence_topk):
stored values equal a live teacher forward, stale caches are refused, the top-k KL is exact at
k = vocab and biased low by exactly the within-tail KL otherwise, and training from the cache
gives the live teacher's losses."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from kdlib import teacher_cache as TC
from kdlib.losses import DistillationLoss, LossWeights, TopKLogits, kl_divergence, kl_divergence_topk
from kdlib.models import decoder_inputs

VOCAB = 51865


# ---- the top-k KL: pure math -----------------------------------------------------------------


def _logits(seed, shape, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def test_topk_kl_equals_exact_kl_when_k_is_vocab():
    student, teacher = _logits(0, (2, 5, 300)), _logits(1, (2, 5, 300))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    top = TopKLogits.from_logits(teacher, 300, (1.0, 2.0))
    for temperature in (1.0, 2.0):
        exact = kl_divergence(student, teacher, mask, temperature)
        assert float(kl_divergence_topk(student, top, mask, temperature)) == pytest.approx(float(exact), rel=1e-10)


@pytest.mark.parametrize("k", [1, 8, 64, 298, 299])
def test_topk_kl_bias_is_exactly_the_within_tail_kl(k):
    """KL_full = KL_topk + p_tail * KL(p(.|tail) || q(.|tail)) (chain rule), so 0 <= error."""
    temperature, vocab = 2.0, 300
    student, teacher = _logits(2, (3, 4, vocab)), _logits(3, (3, 4, vocab))
    mask = torch.ones(3, 4, dtype=torch.bool)
    top = TopKLogits.from_logits(teacher, k, (temperature,))
    exact = float(kl_divergence(student, teacher, mask, temperature))
    approx = float(kl_divergence_topk(student, top, mask, temperature))
    # the within-tail KL, from the full logits the cache does not keep
    log_p = torch.log_softmax(teacher / temperature, -1).reshape(-1, vocab)
    log_q = torch.log_softmax(student / temperature, -1).reshape(-1, vocab)
    tail = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, top.indices.reshape(-1, k), False)
    lp_tail = torch.logsumexp(log_p.masked_fill(~tail, -torch.inf), -1, keepdim=True)
    lq_tail = torch.logsumexp(log_q.masked_fill(~tail, -torch.inf), -1, keepdim=True)
    cond = ((log_p - lp_tail).exp() * ((log_p - lp_tail) - (log_q - lq_tail))).masked_fill(~tail, 0).sum(-1)
    bias = float((lp_tail.squeeze(-1).exp() * cond).mean()) * temperature**2
    assert exact - approx >= -1e-12
    assert exact - approx == pytest.approx(bias, rel=1e-8, abs=1e-12)
    if vocab - k > 1:
        assert bias > 0  # random logits: the tails differ, the estimator is really biased
    else:
        assert bias == 0  # a one-token tail has no inside: exact


def test_sampled_tail_is_unbiased_where_the_lumped_tail_is_not():
    """Flat teacher (most mass outside the top k, as Whisper at T = 2): the lumped estimate loses
    most of the KL, the sampled tail recovers it; averaged over draws it converges to the exact KL."""
    vocab, k, temperature = 2000, 16, 2.0
    student, teacher = _logits(10, (4, 8, vocab), 2.0), _logits(11, (4, 8, vocab), 2.0)
    exact = float(kl_divergence(student, teacher, None, temperature))
    lumped = float(kl_divergence_topk(student, TopKLogits.from_logits(teacher, k, (temperature,)), None, temperature))
    assert (exact - lumped) / exact > 0.5
    draws = [float(kl_divergence_topk(student, TopKLogits.from_logits(
        teacher, k, (1.0, temperature), 64, torch.Generator().manual_seed(seed)), None, temperature))
        for seed in range(8)]
    assert all(abs(d - exact) / exact < 0.1 for d in draws)
    assert abs(sum(draws) / len(draws) - exact) / exact < 0.02
    top = TopKLogits.from_logits(teacher, k, (temperature,), 64, torch.Generator().manual_seed(0))
    in_top = (top.tail_indices[..., 0, :, None] == top.indices[..., None, :]).any(-1)
    assert not in_top.any(), "tail samples must come from outside the top k"


def test_topk_kl_ignores_padding_and_has_finite_gradients():
    student = _logits(4, (2, 6, 50)).requires_grad_()
    teacher = _logits(5, (2, 6, 50))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    for tail_samples in (0, 16):
        student.grad = None
        top = TopKLogits.from_logits(teacher, 8, (2.0,), tail_samples)
        top.values[0, 4:] = torch.nan  # garbage at padded positions must not matter
        top.lse[0, 4:] = torch.inf
        if tail_samples:
            top.tail_plogp[0, 4:] = torch.nan
        loss = kl_divergence_topk(student, top, mask, 2.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
        assert torch.all(student.grad[0, 4:] == 0)


def test_topk_needs_its_temperature_and_refuses_l2():
    top = TopKLogits.from_logits(_logits(6, (1, 2, 20)), 4, (1.0,))
    with pytest.raises(ValueError, match="not at T = 2"):
        kl_divergence_topk(_logits(7, (1, 2, 20)), top, None, 2.0)
    loss = DistillationLoss(LossWeights(ce=0.0, kl=1.0, l2=1.0, temperature=1.0))
    with pytest.raises(ValueError, match="full logits"):
        loss(_logits(7, (1, 2, 20)), torch.zeros(1, 2, dtype=torch.long), teacher_logits=top)


def test_distillation_loss_uses_topk_kl_for_cached_teacher():
    student, teacher = _logits(8, (2, 3, 40)), _logits(9, (2, 3, 40))
    labels = torch.zeros(2, 3, dtype=torch.long)
    loss = DistillationLoss(LossWeights(ce=0.8, kl=1.0, temperature=2.0))
    live = loss(student, labels, teacher_logits=teacher)
    cached = loss(student, labels, teacher_logits=TopKLogits.from_logits(teacher, 40, (2.0,)))
    assert float(cached["kl"]) == pytest.approx(float(live["kl"]), rel=1e-10)
    assert float(cached["total"]) == pytest.approx(float(live["total"]), rel=1e-10)


# ---- the cache on the smoke pair -------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke():
    """The smoke teacher and its first 6 training utterances (embedded corpus)."""
    from kdlib import data, models
    from kdlib.config import make_config
    from kdlib.runs import build_data

    config = make_config("smoke", stage=1)
    teacher, _ = models.tiny_random_pair(seed=config.seed)
    train_set, _, _ = build_data(config, teacher.feature_extractor, teacher.tokenizer)
    dataset = data.MLSDataset(train_set.utterances[:6], teacher.feature_extractor, teacher.tokenizer)
    return teacher, dataset


@pytest.fixture(scope="module")
def built(smoke, tmp_path_factory):
    teacher, dataset = smoke
    out = tmp_path_factory.mktemp("cache") / "teacher"
    TC.build_teacher_cache(teacher.model, dataset, out, top_k=16, temperatures=(1.0, 2.0),
                           hidden_dtype="float32", batch_size=4, progress=False)
    return out


def test_stored_values_match_a_live_teacher_forward(smoke, built):
    from kdlib import data

    teacher, dataset = smoke
    batch = data.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():  # the whole teacher in one call, as training's live path runs it
        dec_in = decoder_inputs(batch["labels"], teacher.model.config)
        live = teacher.model(input_features=batch["input_features"], decoder_input_ids=dec_in, use_cache=False)
    cache = TC.TeacherCache(built).verify(teacher=teacher.model, feature_extractor=dataset.feature_extractor,
                                          dataset=dataset, temperature=2.0, need_hidden=True)
    assert len(cache) == len(dataset) and cache.top_k == 16
    ids = batch["ids"]
    torch.testing.assert_close(cache.hidden(ids), live.encoder_last_hidden_state, atol=1e-5, rtol=1e-5)
    top = cache.topk(ids, batch["labels"].shape[1], labels=batch["labels"])
    real = batch["labels"] != -100
    want_values, want_indices = live.logits.topk(16, dim=-1)
    assert torch.equal(top.indices[real], want_indices[real])
    torch.testing.assert_close(top.values[real], want_values[real], atol=1e-5, rtol=1e-5)
    for i, t in enumerate((1.0, 2.0)):
        torch.testing.assert_close(top.lse[..., i][real], torch.logsumexp(live.logits / t, -1)[real],
                                   atol=1e-5, rtol=1e-5)
    assert torch.all(top.values[~real] == 0)  # padding positions are left empty
    # the tail: sampled outside the top k, and its exact sum p log p at each T
    assert cache.tail_samples == 64 and top.tail_indices.shape[-2:] == (2, 64)
    in_top = (top.tail_indices[..., :, :, None] == top.indices[..., None, None, :]).any(-1)
    assert not in_top[real].any()
    for i, t in enumerate((1.0, 2.0)):
        log_p = torch.log_softmax(live.logits / t, -1)
        tail = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, want_indices, False)
        plogp = (log_p.exp() * log_p).masked_fill(~tail, 0).sum(-1)
        torch.testing.assert_close(top.tail_plogp[..., i][real], plogp[real], atol=1e-5, rtol=1e-4)
    index = json.loads((built / "index.json").read_text())
    assert set(index["fingerprint"]) == {"teacher", "features", "data", "settings"}


def test_cache_of_another_teacher_is_refused(smoke, built):
    from kdlib import models

    teacher, dataset = smoke
    other, _ = models.tiny_random_pair(seed=1)
    with pytest.raises(TC.StaleCacheError, match="teacher weights differ"):
        TC.TeacherCache(built).verify(teacher=other.model, dataset=dataset)
    bias = teacher.model.model.decoder.layer_norm.bias
    with torch.no_grad():  # one weight nudged is enough
        bias[0] += 1e-3
    try:
        assert any("teacher weights differ" in p for p in TC.TeacherCache(built).problems(teacher=teacher.model))
    finally:
        with torch.no_grad():
            bias[0] -= 1e-3
    assert TC.TeacherCache(built).problems(teacher=teacher.model) == []


def test_cache_of_other_data_or_features_is_refused(smoke, built, tmp_path):
    from kdlib import ct2, data

    teacher, dataset = smoke
    cache = TC.TeacherCache(built)
    # an utterance the cache never saw, and one whose transcript changed
    more = data.MLSDataset(dataset.utterances + [dataclasses.replace(dataset.utterances[0], id="9999_1_000001")],
                           dataset.feature_extractor, dataset.tokenizer)
    with pytest.raises(TC.StaleCacheError, match="1 of 7 utterances are not in the cache.*9999_1_000001"):
        cache.verify(dataset=more)
    edited = [dataclasses.replace(dataset.utterances[1], text=dataset.utterances[1].text + " altro")]
    edited_set = data.MLSDataset(edited, dataset.feature_extractor, dataset.tokenizer)
    assert any("changed" in p and edited[0].id in p for p in cache.problems(dataset=edited_set))
    # other feature settings (128 mels, as whisper-large-v3 uses)
    assert any("feature_size 80" in p for p in cache.problems(feature_extractor=ct2.build_feature_extractor(128)))
    # the audio file itself replaced (size / modification time)
    copy = tmp_path / dataset.utterances[2].audio.name
    shutil.copy(dataset.utterances[2].audio, copy)
    moved = [dataclasses.replace(dataset.utterances[2], audio=copy)]
    moved_set = data.MLSDataset(moved, dataset.feature_extractor, dataset.tokenizer)
    out = tmp_path / "one"
    TC.build_teacher_cache(teacher.model, moved_set, out, top_k=4, store_hidden=False, progress=False)
    assert TC.TeacherCache(out).problems(dataset=moved_set) == []
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(TC.StaleCacheError, match="changed since the cache was built"):
        TC.TeacherCache(out).verify(dataset=moved_set)
    # and a temperature or encoder states it does not hold
    problems = TC.TeacherCache(out).problems(temperature=3.0, need_hidden=True)
    assert any("temperature 3" in p for p in problems) and any("encoder states" in p for p in problems)


def test_no_cache_folder_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="cache-teacher"):
        TC.TeacherCache(tmp_path / "nothing")


def test_cli_builds_a_cache(tmp_path, capsys):
    from kdlib.__main__ import main

    out = tmp_path / "cli"
    assert main(["cache-teacher", "--preset", "smoke", "--split", "dev", "--out", str(out), "--top-k", "4",
                 "--no-hidden", "--no-progress", "--set", "max_dev_utterances=2"]) == 0
    cache = TC.TeacherCache(out)
    assert len(cache) == 2 and cache.top_k == 4 and not cache.has_hidden
    assert "teacher_cache=" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        main(["cache-teacher", "--preset", "smoke", "--split", "dev", "--out", str(out), "--no-progress",
              "--set", "max_dev_utterances=2"])


# ---- training from the cache ----------------------------------------------------------------


def test_training_from_a_full_vocab_cache_gives_the_live_losses(tmp_path):
    """k = vocab: the top-k KL is the exact KL, so every step's losses match the live teacher's
    (float32 rounding of batched vs cached forwards: relative 1e-5; 1.03e-5 in the KL measured on
    a CPU without AVX-512, so the bound is 1e-4, far below what a wrong top-k or tail would give)."""
    from kdlib import runs as R, train as T
    from kdlib.config import make_config

    overrides = {"max_train_utterances": 4, "max_dev_utterances": 2, "batch_size": 2, "max_steps": 2,
                 "eval_every": 100, "save_every": 100}
    live_config = make_config("smoke", stage=1, overrides=overrides)
    models = R.build_models(live_config, torch.device("cpu"))
    train_set, _, _ = R.build_data(live_config, models.feature_extractor, models.tokenizer)
    cache_dir = tmp_path / "full"
    TC.build_teacher_cache(models.teacher, train_set, cache_dir, top_k=VOCAB, store_hidden=False, progress=False)

    T.train(live_config, tmp_path / "live", progress=False)
    T.train(make_config("smoke", stage=1, overrides={**overrides, "teacher_cache": str(cache_dir)}),
            tmp_path / "cached", progress=False)
    live = json.loads((tmp_path / "live" / "training_history.json").read_text())
    cached = json.loads((tmp_path / "cached" / "training_history.json").read_text())
    assert len(live) == len(cached) == 2
    for a, b in zip(live, cached):
        for key in ("ce", "kl", "total", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key

    # a cache of other utterances is refused before the first step
    stale = make_config("smoke", stage=1, overrides={**overrides, "max_train_utterances": 6,
                                                      "teacher_cache": str(cache_dir)})
    with pytest.raises(TC.StaleCacheError, match="2 of 6 utterances are not in the cache"):
        T.train(stale, tmp_path / "stale", progress=False)


def test_uncached_encoder_runs_once_per_batch_for_student_and_teacher():
    """encoder_cache="off": a student sharing the teacher's frozen encoder hands its encoder
    states to the teacher's decoder; the encoder must run once per step, and again for the next
    batch (nothing is kept)."""
    from kdlib import data
    from kdlib import caches as C, distill as DL, runs as R
    from kdlib.config import make_config

    config = make_config("smoke", stage=1, overrides=dict(
        student="from-teacher", student_decoder_layers=1, train_encoder=False, projector=False,
        encoder_cache="off", lora_dropout=0.0))
    run = R.build_models(config, torch.device("cpu"))
    caches = C.build_caches(run, config)
    assert caches.shared
    train_set, _, _ = R.build_data(config, run.feature_extractor, run.tokenizer)
    loss_fn = DistillationLoss()
    loss_fn.weights = DL.stage_weights(config, 0)
    calls = []
    run.teacher.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    first = data.WhisperCollator()([train_set[i] for i in range(2)])
    second = data.WhisperCollator()([train_set[i] for i in range(2, 4)])
    DL.forward_losses(run, loss_fn, first, torch.device("cpu"), (False, None), caches=caches)
    assert len(calls) == 1
    DL.forward_losses(run, loss_fn, second, torch.device("cpu"), (False, None), caches=caches)
    assert len(calls) == 2 and caches.teacher.store == {}


def test_stage3_reads_teacher_encoder_states_from_the_cache(smoke, built):
    """Stage III (contrastive on the teacher's encoder states, KL on its logits): the states come
    from the cache (float32 here, so identical), the teacher's encoder does not run."""
    from kdlib import caches as C, data, distill as DL, runs as R
    from kdlib.config import make_config

    teacher, dataset = smoke
    config = make_config("smoke", stage=3, overrides={"teacher_cache": str(built), "max_train_utterances": 6,
                                                      "contrastive_weight": 0.5})
    models = R.build_models(config, torch.device("cpu"))
    models.student.eval()  # no dropout: the two forwards must be comparable
    caches = C.build_caches(models, config, dataset)
    assert caches.disk is not None and caches.teacher.disk is not None
    live_caches = C.build_caches(models, make_config("smoke", stage=3, overrides={"contrastive_weight": 0.5}), dataset)
    batch = data.collate([dataset[i] for i in range(3)])
    loss_fn = DistillationLoss(DL.stage_weights(config, 0))
    calls = []
    hook = models.teacher.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        cached = DL.forward_losses(models, loss_fn, batch, torch.device("cpu"), (False, None), caches=caches)
        assert calls == [], "the teacher's encoder ran although the cache holds its states"
        live = DL.forward_losses(models, loss_fn, batch, torch.device("cpu"), (False, None), caches=live_caches)
    hook.remove()
    assert float(cached["contrastive"]) == pytest.approx(float(live["contrastive"]), rel=1e-5)
    assert float(cached["ce"]) == pytest.approx(float(live["ce"]), rel=1e-6)
    # The KL here is the sampled-tail estimate (top 16 + 64 tail samples) of a near-uniform random
    # teacher, whose KL (0.04) is small next to the sampling noise: only check it is there; its
    # accuracy is tested above and measured in benchmarks/topk_kl.py.
    assert cached["kl"] is not None and torch.isfinite(cached["kl"])


# ---- measure_topk_error: the numbers behind benchmarks/topk_kl.py's table --------------------


def _hand_kl(teacher, student, batch, temperature, ks):
    """Exact KL·T² per token, and the teacher's mean tail mass outside its top k, from one
    whole-model forward of each (no teacher_outputs, no kl_divergence_topk)."""
    labels = batch["labels"]
    mask = labels != -100
    with torch.no_grad():
        t_in = batch.get("teacher_input_features", batch["input_features"])
        t = teacher(input_features=t_in, decoder_input_ids=decoder_inputs(labels, teacher.config), use_cache=False).logits
        s = student(input_features=batch["input_features"], decoder_input_ids=decoder_inputs(labels, student.config),
                    use_cache=False).logits
    log_p, log_q = torch.log_softmax(t[mask].double() / temperature, -1), torch.log_softmax(s[mask].double() / temperature, -1)
    exact = float((log_p.exp() * (log_p - log_q)).sum(-1).mean()) * temperature**2
    p_tail = {k: float((1 - log_p.exp().topk(k, -1).values.sum(-1)).mean()) for k in ks}
    return int(mask.sum()), exact, p_tail


def test_measure_topk_error_matches_a_hand_computed_kl(smoke):
    """Batches of 3 over 4 clips (padding differs per batch) give the whole-set exact KL and tail
    mass; the lumped top-k KL rises with k towards the exact one (a finer partition of the
    vocabulary: data processing), its relative error is (exact - top-k) / exact; a "student" equal
    to the teacher has KL 0 at every k; the sampled tail is closer than the lumped one."""
    from kdlib import data, models

    teacher, dataset = smoke
    dataset = data.MLSDataset(dataset.utterances[:4], dataset.feature_extractor, dataset.tokenizer)
    _, student = models.tiny_random_pair(seed=1)
    student.model.eval()
    ks = (8, 256)
    r = TC.measure_topk_error(teacher.model.eval(), {"student": student.model, "teacher": 0.0, "noisy": 1.0}, dataset,
                              ks=ks, temperatures=(1.0, 2.0), tail_samples=64, batch_size=3, progress=False)
    batch = data.collate([dataset[i] for i in range(len(dataset))])
    for t in (1.0, 2.0):
        tokens, exact, p_tail = _hand_kl(teacher.model, student.model, batch, t, ks)
        assert r["tokens"] == tokens
        row = r["students"]["student"][t]
        assert row["exact_kl"] == pytest.approx(exact, rel=1e-4)
        lumped = [row["k"][k]["topk_kl"] for k in ks]
        assert lumped == sorted(lumped) and 0 < lumped[0] and lumped[-1] <= exact * (1 + 1e-5)
        for k in ks:
            c = row["k"][k]
            assert c["p_tail"] == pytest.approx(p_tail[k], abs=1e-5)
            e = row["exact_kl"]
            assert c["relative_error"] == pytest.approx((e - c["topk_kl"]) / e, rel=1e-6)
            assert c["sampled_relative_error"] == pytest.approx((e - c["sampled_kl"]) / e, rel=1e-6)
        same = r["students"]["teacher"][t]
        assert same["exact_kl"] == pytest.approx(0.0, abs=1e-6)
        assert all(abs(c["topk_kl"]) < 1e-6 and c["relative_error"] == 0.0 for c in same["k"].values())
    noisy = r["students"]["noisy"][2.0]
    assert noisy["exact_kl"] > 0
    for k in ks:  # at T = 2 the random teacher's mass is almost all in the tail: lumping loses most of the KL
        assert abs(noisy["k"][k]["sampled_relative_error"]) < noisy["k"][k]["relative_error"]


def test_measure_topk_error_feeds_the_teacher_its_own_window(smoke):
    """A student with a 10 s window reads 1000 log-mel frames; the teacher reads its own 3000
    (``teacher_input_features``), as training does (benchmarks/topk_kl.py on the demo)."""
    from kdlib import data, models

    teacher, dataset = smoke
    _, student = models.tiny_random_pair(seed=1)
    student = models.shape_student(student, window_seconds=10)
    windowed = data.MLSDataset(dataset.utterances[:3], student.feature_extractor, student.tokenizer,
                               teacher_feature_extractor=teacher.feature_extractor)
    batch = data.collate([windowed[i] for i in range(len(windowed))])
    assert batch["input_features"].shape[-1] == 1000 and batch["teacher_input_features"].shape[-1] == 3000
    r = TC.measure_topk_error(teacher.model.eval(), {"window": student.model.eval()}, windowed, ks=(8,),
                              temperatures=(2.0,), tail_samples=0, batch_size=2, progress=False)
    tokens, exact, _ = _hand_kl(teacher.model, student.model, batch, 2.0, (8,))
    assert r["tokens"] == tokens
    assert r["students"]["window"][2.0]["exact_kl"] == pytest.approx(exact, rel=1e-4)


def test_a_cache_that_cannot_fit_is_refused_before_anything_is_written(smoke, tmp_path, monkeypatch):
    """cache-teacher at thesis scale would write ~229 GB of encoder states; a disk without the
    space says so, with the numbers, before a byte is written (issue 25)."""
    import collections

    from kdlib import files

    teacher, dataset = smoke
    # the six clips' states: 6 x 1500 x 128 x 2 bytes = 2.3 MB; the disk has 1 MB free
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: collections.namedtuple("u", "total used free")(
        10**9, 10**9 - 10**6, 10**6))
    out = tmp_path / "teacher"
    with pytest.raises(files.NotEnoughSpace, match=r"teacher cache of 6 clips .* needs about .* [MG]B on disk .* free"):
        TC.build_teacher_cache(teacher.model, dataset, out, top_k=16, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [".teacher.lock"]  # no folder, no temporary sibling


# ---- a cache whose files changed after the build (issue 26) ---------------------------------


def _copy(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    return copy


def test_zeroed_or_flipped_rows_are_refused_naming_the_utterances(smoke, built, tmp_path):
    import numpy as np

    teacher, dataset = smoke
    assert TC.TeacherCache(built).damaged() == []
    copy = _copy(built, tmp_path)
    cache = TC.TeacherCache(copy)
    victim = dataset.utterances[2].id
    entry = cache.entries[victim]
    values = np.load(copy / "topk_values.npy", mmap_mode="r+")
    values[entry["offset"]] = 0.0  # one token's top-k logits zeroed: trains with exit 0 to another result
    values.flush()
    hidden = np.load(copy / "hidden.npy", mmap_mode="r+")
    other = dataset.utterances[4].id
    raw = hidden[cache.entries[other]["row"]].view(np.uint8)
    raw[1000] ^= 0x10  # one flipped bit in another clip's encoder states
    hidden.flush()
    del values, hidden
    with pytest.raises(TC.StaleCacheError, match="2 utterances no longer match the checksums") as err:
        TC.TeacherCache(copy).verify(teacher=teacher.model, dataset=dataset, temperature=2.0)
    assert victim in str(err.value) and other in str(err.value)


def test_a_truncated_array_names_its_file(built, tmp_path):
    copy = _copy(built, tmp_path)
    with open(copy / "hidden.npy", "r+b") as handle:
        handle.truncate((copy / "hidden.npy").stat().st_size // 2)
    with pytest.raises(TC.DamagedCacheError, match=r"hidden\.npy: cannot be read .*truncated.*--overwrite"):
        TC.TeacherCache(copy)


def test_non_finite_teacher_outputs_are_counted_and_never_stored(smoke, tmp_path, monkeypatch, capsys):
    teacher, dataset = smoke
    real, calls = TC.teacher_outputs, []

    def overflowing(model, features, labels, autocast_dtype=None):
        encoded, logits = real(model, features, labels, autocast_dtype)
        calls.append(1)
        if len(calls) == 1:  # the first clip of the first batch overflows (a float16 teacher can)
            logits = logits.clone()
            logits[0, 0, 0] = float("inf")
        return encoded, logits

    monkeypatch.setattr(TC, "teacher_outputs", overflowing)
    out = TC.build_teacher_cache(teacher.model, dataset, tmp_path / "cache", top_k=4, hidden_dtype="float32",
                                 batch_size=6, progress=False)
    cache = TC.TeacherCache(out)
    assert len(cache.index["nonfinite"]) == 1 and len(cache) == len(dataset) - 1
    assert cache.index["nonfinite"][0] not in cache  # training runs the live teacher on it
    assert "1 of 6 utterances left out: the teacher's outputs are not finite" in capsys.readouterr().out
    assert cache.damaged() == []


def test_a_second_builder_stops_at_once_naming_the_first(smoke, tmp_path):
    from kdlib import files

    teacher, dataset = smoke
    out = tmp_path / "cache"
    with files.exclusive(tmp_path, "teacher cache cache", lock=".cache.lock", leftovers=()):
        with pytest.raises(files.FolderBusy, match=r"in use by pid \d+ on"):
            TC.build_teacher_cache(teacher.model, dataset, out, top_k=4, progress=False)
    assert not out.exists()
