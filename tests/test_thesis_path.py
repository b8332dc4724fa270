"""The thesis-shaped preset (``thesis-tiny``) and the pieces of the thesis path it exercises on a
CPU: the fp16 path with an enabled GradScaler, the teacher's own vocabulary, mel bins and
generation ids, a stage 0 that fits large-v3 at batch 64, no fp32 CPU copy of encoder states
with ``encoder_cache="off"`` (issue 16)."""

from __future__ import annotations

import re

import pytest
import torch

from kdlib import caches as C, models as M, runs as R
from kdlib.config import PRESETS, make_config


def test_thesis_tiny_keeps_the_thesis_structure_and_machinery():
    config = make_config("thesis-tiny", stage=1)
    thesis = make_config("thesis", stage=1)
    for field in ("kl_weight", "geo_weight", "temperature", "student_frame_factor", "encoder_cache", "betas"):
        assert getattr(config, field) == getattr(thesis, field), field
    assert config.teacher == "tiny-random-v3" and config.student == "tiny-random"
    assert config.amp == "fp16" and config.grad_checkpointing and config.early_stopping_patience
    assert config.num_workers >= 2 and config.pin_memory and thesis.pin_memory
    on, dtype, scaler = M.amp_settings(config, torch.device("cpu"))
    assert on and scaler and dtype in (torch.float16, torch.bfloat16)  # the CPU GradScaler path
    assert set(PRESETS["thesis-tiny"]) >= {"teacher", "student", "amp", "grad_checkpointing", "num_workers"}


def test_thesis_tiny_models_differ_like_large_v3_and_small():
    config = make_config("thesis-tiny", stage=1)
    run = R.build_models(config, torch.device("cpu"))
    assert run.teacher.config.num_mel_bins == 128 and run.teacher.config.vocab_size == 51866
    assert run.student.base_model.model.config.num_mel_bins == 80
    assert run.student.base_model.model.config.vocab_size == 51865
    assert run.teacher_feature_extractor is not None and run.vocab_index is not None
    base = run.student.base_model.model
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())


def test_v3_teacher_generates_with_its_own_ids():
    teacher, _ = M.tiny_random_pair(teacher_like_v3=True)
    gen, tok = teacher.model.generation_config, teacher.tokenizer
    for token, i in (("<|yue|>", gen.lang_to_id["<|yue|>"]), ("<|it|>", gen.lang_to_id["<|it|>"]),
                     ("<|transcribe|>", gen.task_to_id["transcribe"]),
                     ("<|notimestamps|>", gen.no_timestamps_token_id)):
        assert tok.convert_ids_to_tokens(i) == token
    out = teacher.transcribe(torch.zeros(16000).numpy(), max_new_tokens=2)
    assert isinstance(out[0], str)


def test_thesis_stage0_adapts_the_teacher_decoder_only():
    for preset in ("thesis", "thesis-tiny"):
        config = make_config(preset, stage=0)
        assert config.train_encoder is False and config.lora_preset == "decoder_no_cross_kv"
    run = R.build_models(make_config("thesis-tiny", stage=0), torch.device("cpu"))
    assert run.trainable["student"] and not any(".encoder." in n for n in run.trainable["student"])
    # no LoRA on the cross-attention k/v (they read all 1500 encoder frames: stage 0's memory at
    # thesis scale, benchmarks/stage0_memory.py); its q and out_proj, self-attention and FFN adapt
    trained = run.trainable["student"]
    assert not any(re.search(r"encoder_attn\.(k_proj|v_proj)", n) for n in trained)
    for part in ("encoder_attn.q_proj", "encoder_attn.out_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"):
        assert any(part in n for n in trained), part


def test_encoder_cache_off_keeps_states_on_device_in_their_dtype():
    """encoder_cache="off": the frozen encoder's states go straight to the consumer, not through
    a float32 copy on the CPU and back (the thesis: every step, 64 x 1500 x 1280)."""
    teacher, _ = M.tiny_random_pair(teacher_like_v3=True)
    model = teacher.model.to(torch.bfloat16)
    cache = C.EncoderCache(model, keep=False)
    states = cache(torch.randn(2, 128, 3000), ["a", "b"], torch.device("cpu"))
    assert states.dtype == torch.bfloat16 and cache.store == {}
    kept = C.EncoderCache(model, keep=True)(torch.randn(2, 128, 3000), ["a", "b"], torch.device("cpu"))
    assert kept.dtype == torch.float32  # stored states are float32, as before


def test_scan_reads_each_header_once_until_the_file_changes(tmp_path, monkeypatch):
    """A rescan (every start, every rank: 60k headers for MLS Italian train) reads the header
    cache keyed by size and modification time; a changed file is read again."""
    import os
    import shutil

    from kdlib import data

    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "mls_italian_opus"
    shutil.copytree(data.embedded_corpus("it") / "dev", root / "dev")
    calls = []
    real_info = data.sf.info
    monkeypatch.setattr(data.sf, "info", lambda path: calls.append(path) or real_info(path))
    first = data.scan_mls(root, "dev")
    assert len(calls) == len(first.utterances) > 0
    calls.clear()
    second = data.scan_mls(root, "dev")
    assert calls == [] and [(u.id, u.duration) for u in second.utterances] == [(u.id, u.duration) for u in first.utterances]
    changed = first.utterances[0].audio
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    data.scan_mls(root, "dev")
    assert calls == [str(changed)]


def test_one_dataloader_for_the_whole_run_replays_the_epoch_batches(monkeypatch):
    """The batch stream walks `epoch_batches` epoch after epoch, from a resume position, with one
    DataLoader (its workers start once per run, not once per epoch)."""
    import itertools

    import torch.utils.data

    from kdlib import data

    config = make_config("thesis-tiny", stage=1, overrides={"max_train_utterances": 6, "batch_size": 4})
    _, student = M.tiny_random_pair()
    train_set, _, _ = R.build_data(config, student.feature_extractor, student.tokenizer)
    made = []
    real = torch.utils.data.DataLoader

    class Counting(real):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("num_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(data, "DataLoader", Counting)  # the loader kdlib.data.batch_stream builds
    expected = [(e, i + 1, [train_set.utterances[j].id for j in b])
                for e in range(4) for i, b in enumerate(data.epoch_batches(train_set, config, e))]
    start = 1  # resume after the first batch of epoch 0
    stream = data.batch_stream(train_set, data.WhisperCollator(), config, 0, start)
    got = [(e, p, batch["ids"]) for e, p, batch in itertools.islice(stream, len(expected) - start - 2)]
    assert got == expected[start:len(expected) - 2]
    assert made == [config.num_workers] and config.num_workers >= 2
    assert len({e for e, _, _ in got}) >= 3  # several epochs, one loader


def test_an_encoder_cache_at_mls_scale_is_refused_up_front():
    """encoder_cache "memory" (or "disk") at MLS Italian scale would keep about a terabyte: the
    run stops before its first step and says how much, and "off" (the thesis preset's) passes."""
    from types import SimpleNamespace

    from kdlib.files import NotEnoughSpace

    config = make_config("thesis-tiny", stage=1, overrides={"encoder_cache": "memory"})
    run = R.build_models(config, torch.device("cpu"))
    mls = [SimpleNamespace(duration=15.0)] * 59_600  # MLS Italian train: ~59,600 clips of 10-20 s
    need = C.cache_footprint(run, config, mls)
    # the teacher's logits alone: 59,600 x 64 tokens x 51,866 x 4 bytes = 791 GB
    assert need["memory"] > 7e11 and need["disk"] == 0
    with pytest.raises(NotEnoughSpace, match=r'encoder_cache="memory" for 59,600 clips would hold about'):
        C.check_cache_fits(run, config, mls)
    C.check_cache_fits(run, make_config("thesis-tiny", stage=1), mls)  # "off": nothing kept
    C.check_cache_fits(run, config, mls[:4])  # four clips fit


def test_misplaced_names_a_model_left_off_the_runs_device():
    """The placement check that the thesis-tiny chain and gpu_check use can fail: a teacher left on
    the CPU of a CUDA run, or in float32, is named; nested training records are read too."""
    teacher = torch.nn.Linear(2, 2).half()
    record = {**M.placement(teacher=teacher, student=torch.nn.Linear(2, 2)),
              "training": {"teacher": {"device": "cpu", "dtype": "float32"}}}
    assert record["teacher"] == {"device": "cpu", "dtype": "float16"}
    assert M.misplaced(record, "cpu", teacher_dtype="float16") == ["training: teacher ran in float32, not float16"]
    assert M.misplaced(record, "cuda:0") == ["teacher ran on cpu, the run's device is cuda",
                                             "student ran on cpu, the run's device is cuda",
                                             "training: teacher ran on cpu, the run's device is cuda"]
