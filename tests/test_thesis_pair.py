"""A teacher that disagrees with its student, as whisper-large-v3 does with whisper-small (the
thesis pair): 128 vs 80 mel bins, and 51,866 vs 51,865 tokens with every special token from
``<|translate|>`` on shifted by one. Exercised offline with the `tiny-random-v3` teacher."""

from __future__ import annotations

import math

import pytest
import torch

from kdlib import data, models
from kdlib import caches as C, distill as DL, runs as R, train as T
from kdlib.config import make_config


@pytest.fixture(scope="module")
def pair():
    return models.tiny_random_pair(teacher_like_v3=True)


def test_large_v3_layout_shifts_special_tokens_only(pair):
    teacher, student = pair
    t, s = teacher.tokenizer, student.tokenizer
    assert len(t) == 51866 and len(s) == 51865
    assert t.convert_tokens_to_ids("<|yue|>") == 50358
    for token in ("<|translate|>", "<|transcribe|>", "<|notimestamps|>", "<|0.00|>"):
        assert t.convert_tokens_to_ids(token) == s.convert_tokens_to_ids(token) + 1, token
    for token in ("<|endoftext|>", "<|startoftranscript|>", "<|it|>", "<|su|>"):
        assert t.convert_tokens_to_ids(token) == s.convert_tokens_to_ids(token), token
    text = " la stampante dell'ufficio non funziona"
    assert t(text, add_special_tokens=False).input_ids == s(text, add_special_tokens=False).input_ids


def test_vocab_index(pair):
    teacher, student = pair
    index = models.vocab_index(student.tokenizer, teacher.tokenizer, 51865)
    assert index.shape == (51865,)
    assert torch.equal(index[:50358], torch.arange(50358))
    assert torch.equal(index[50358:], torch.arange(50359, 51866))  # <|yue|> (50358) left out
    assert models.vocab_index(student.tokenizer, student.tokenizer, 51865) is None


def test_stand_in_tokenizers_name_the_no_speech_token_as_the_real_checkpoints_do(pair):
    # Hugging Face checkpoints before v3 (whisper-small): <|nocaptions|> at 50362; large-v3:
    # <|yue|> at 50358 and <|nospeech|> at 50363. Neither has the other's name.
    teacher, student = pair
    s, t = student.tokenizer, teacher.tokenizer
    assert s.convert_ids_to_tokens(50362) == "<|nocaptions|>" and "<|nospeech|>" not in s.get_vocab()
    assert t.convert_ids_to_tokens(50363) == "<|nospeech|>" and "<|nocaptions|>" not in t.get_vocab()
    assert t.convert_ids_to_tokens(50358) == "<|yue|>"
    # the v3 stand-in's template puts the shifted ids around the text
    assert t("ciao").input_ids[:2] == [50258, 50364] and t("ciao").input_ids[-1] == 50257


def test_vocab_index_maps_every_special_token_by_role(pair):
    teacher, student = pair
    s, t = student.tokenizer, teacher.tokenizer
    index = models.vocab_index(s, t, 51865)
    expect = {  # whisper-small id -> large-v3 id
        "<|endoftext|>": (50257, 50257), "<|startoftranscript|>": (50258, 50258), "<|en|>": (50259, 50259),
        "<|it|>": (50274, 50274), "<|su|>": (50357, 50357), "<|translate|>": (50358, 50359),
        "<|transcribe|>": (50359, 50360), "<|startoflm|>": (50360, 50361), "<|startofprev|>": (50361, 50362),
        "<|nocaptions|>": (50362, 50363), "<|notimestamps|>": (50363, 50364), "<|0.00|>": (50364, 50365),
        "<|0.02|>": (50365, 50366), "<|30.00|>": (51864, 51865),
    }
    for token, (sid, tid) in expect.items():
        assert s.convert_tokens_to_ids(token) == sid, token
        assert int(index[sid]) == tid, token
    assert t.convert_ids_to_tokens(50363) == "<|nospeech|>"
    for sid in range(50257, 51865):  # every special token: same role on both sides
        assert models.token_role(s.convert_ids_to_tokens(sid)) == models.token_role(
            t.convert_ids_to_tokens(int(index[sid]))), sid
    assert models.token_role("<|nocaptions|>") == models.token_role("<|nospeech|>")
    assert models.token_role("<|it|>") != models.token_role("<|es|>")
    assert models.token_role("ciao") == "ciao"


def test_vocab_index_refuses_student_tokens_the_teacher_lacks():
    class Vocab:
        def __init__(self, tokens):
            self.tokens = tokens

        def get_vocab(self):
            return {tok: i for i, tok in enumerate(self.tokens)}

    with pytest.raises(ValueError, match="missing from the teacher"):
        models.vocab_index(Vocab(["a", "b", "<|new|>"]), Vocab(["a", "b"]), 3)
    with pytest.raises(ValueError, match="no token for id"):
        models.vocab_index(Vocab(["a", "b"]), Vocab(["a", "b"]), 3)
    assert models.vocab_index(Vocab(["a", "b"]), Vocab(["b", "x", "a"]), 2).tolist() == [2, 0]


def _v3_config(stage=1, **overrides):
    return make_config("smoke", stage=stage, overrides={"teacher": "tiny-random-v3", "lora_dropout": 0.0, **overrides})


def test_teacher_gets_its_own_mels_and_token_ids(pair):
    config = _v3_config()
    run = R.build_models(config, torch.device("cpu"))
    assert run.teacher.config.num_mel_bins == 128 and run.teacher_feature_extractor is not None
    assert run.vocab_index is not None and run.tokenizer is not None
    train_set, _, _ = R.build_data(config, run.feature_extractor, run.tokenizer, run.teacher_feature_extractor)
    batch = data.WhisperCollator()([train_set[i] for i in range(2)])
    assert batch["input_features"].shape[1] == 80 and batch["teacher_input_features"].shape[1] == 128

    # The student's decoder inputs, translated, read the same text in the teacher's vocabulary.
    dec_in = models.decoder_inputs(batch["labels"], run.student.base_model.model.config)
    mapped = run.vocab_index[dec_in]
    teacher_tok, student_tok = pair[0].tokenizer, pair[1].tokenizer
    assert teacher_tok.decode(mapped[0]) == student_tok.decode(dec_in[0])
    assert not torch.equal(mapped, dec_in)  # <|transcribe|> and <|notimestamps|> moved

    # The logits the losses see: the teacher's own forward, at the student's tokens.
    caches = C.EncoderCaches()
    logits, hidden = DL.teacher_forward(run.teacher, caches, batch["ids"], batch["teacher_input_features"], dec_in,
                                       batch["labels"], True, torch.device("cpu"), vocab_index=run.vocab_index)
    with torch.no_grad():
        # thesis-tiny's teacher is float16, as large-v3 loads: its inputs must be cast to it
        assert run.teacher.dtype == torch.float16
        full = run.teacher(input_features=batch["teacher_input_features"].to(torch.float16),
                           decoder_input_ids=mapped, use_cache=False).logits
    assert logits.shape[-1] == 51865 and full.shape[-1] == 51866
    torch.testing.assert_close(logits, full[..., run.vocab_index])
    assert hidden.shape[1] == 1500


@pytest.mark.parametrize("stage", [1, 2])
def test_training_runs_on_a_mismatched_pair(tmp_path, stage):
    summary = T.train(_v3_config(stage=stage, max_steps=2, eval_every=2, save_every=2,
                                 from_untrained=stage >= 2), tmp_path, progress=False)
    assert summary["steps"] == 2 and summary["nonfinite_steps"] == 0
    assert math.isfinite(summary["final_total"])
    if stage == 1:
        assert summary["final_kl"] > 0
    else:
        assert summary["final_geo"] is not None and math.isfinite(summary["final_geo"])
