"""Long-form transcription (kdlib.longform) and ``python -m kdlib transcribe`` (issue 28, part):
chunk edges, the merge on a synthetic recording whose words are known, and the command end to end
in each output format, with a broken file among the inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from kdlib import longform as LF
from kdlib.__main__ import main

SR = LF.SAMPLE_RATE


# ---- chunks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, spans", [
    (1, [(0, 1)]),
    (100, [(0, 100)]),                          # exactly one window: one chunk
    (101, [(0, 100), (80, 101)]),               # one sample more: a second, short chunk
    (260, [(0, 100), (80, 180), (160, 260)]),   # the last chunk ends on the last sample
    (261, [(0, 100), (80, 180), (160, 260), (240, 261)]),
])
def test_chunks_cover_the_recording_and_overlap_by_the_given_amount(n, spans):
    assert LF.chunk_spans(n, 100, 20) == spans


def test_chunk_settings_that_cannot_work_are_refused():
    for window, overlap in ((0, 0), (100, 100), (100, -1)):
        with pytest.raises(ValueError, match="0 <= overlap < window"):
            LF.chunk_spans(500, window, overlap)


# ---- merge -------------------------------------------------------------------------------------


def test_merge_joins_overlapping_sequences_into_the_whole():
    words = list(range(100, 200))
    merged, kept = LF.merge_tokens([words[0:40], words[30:70], words[62:100]])
    assert merged == words
    # each chunk's share, in its own token positions, adds up to the whole without repeats
    assert sum(b - a for a, b in kept) == len(words)


def test_merge_tolerates_a_disagreement_inside_the_overlap_and_concatenates_without_one():
    left, right = [1, 2, 3, 4, 5, 6], [4, 9, 6, 7, 8]  # the overlap 4 5 6 was heard as 4 9 6
    merged, _ = LF.merge_tokens([left, right])
    assert merged[:3] == [1, 2, 3] and merged[-2:] == [7, 8] and len(merged) == 8


def test_a_chance_agreement_over_a_long_span_does_not_beat_the_real_overlap():
    """Common tokens (0: "di", 1: ".") agree at two positions of a 9-token alignment; the real
    overlap is the short, fully agreeing one. Found by benchmarks/longform.py, where the first
    merge (most agreeing positions) cut away whole sentences."""
    left = [10, 0, 11, 1, 12, 0, 13, 1, 14, 15, 16]
    right = [15, 16, 17, 0, 18, 1, 19, 0, 20, 1, 21]
    merged, _ = LF.merge_tokens([left, right])
    assert merged == left + right[2:]
    merged, _ = LF.merge_tokens([left, right], overlap_fraction=0.2)
    assert merged == left + right[2:]
    assert LF.merge_tokens([[1, 2], [3, 4]])[0] == [1, 2, 3, 4]  # nothing in common
    assert LF.merge_tokens([[], [3, 4], []])[0] == [3, 4]


def test_a_decoding_loop_is_kept_once_and_ordinary_repeats_stay():
    loop = [7, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 9]  # "... di pomedi di pomedi di pomedi ..."
    assert LF.collapse_loops(loop) == [7, 1, 2, 9]
    assert LF.collapse_loops([5, 5, 5, 5, 6]) == [5, 6]
    assert LF.collapse_loops([3, 4, 3, 4, 5, 6, 6, 7]) == [3, 4, 3, 4, 5, 6, 6, 7]  # twice is speech


class WordsInSamples:
    """A decoder for a synthetic recording: word ``w`` is written into the samples as the value
    ``w / 1000`` for as long as it is spoken. It hears a word only when the whole word lies inside
    the chunk: a word cut by the chunk's edge is lost, as a real decoder loses it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, audios):
        out = []
        for audio in audios:
            self.calls += 1
            values = np.round(audio * 1000).astype(int)
            whole = [int(w) for w in np.unique(values[values > 0])
                     if np.flatnonzero(values == w)[0] > 0 and np.flatnonzero(values == w)[-1] < len(audio) - 1]
            out.append(whole)
        return out


class Digits:
    """A tokenizer whose token ``w`` reads ``w<w>``."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids if i > 0)


def _recording(n_words: int, step: float = 0.6, length: float = 0.4, sr: int = SR) -> np.ndarray:
    audio = np.zeros(int((n_words * step + 1.0) * sr), dtype=np.float32)
    for w in range(1, n_words + 1):
        start = int((w - 1) * step * sr + 0.3 * sr)
        audio[start:start + int(length * sr)] = w / 1000
    return audio


def test_a_long_recording_of_known_words_is_transcribed_whole_in_order():
    audio = _recording(150)  # 91 s of "speech": 150 words, chunks of 10 s with 2 s overlap
    decoder = WordsInSamples()
    transcript = LF.transcribe_long(audio, decoder, Digits(), window_seconds=10, overlap_seconds=2)
    assert transcript.text.split() == [f"w{i}" for i in range(1, 151)]
    assert decoder.calls == len(transcript.chunks) == len(LF.chunk_spans(len(audio), 10 * SR, 2 * SR))
    starts = [c.start for c in transcript.chunks]
    assert starts == sorted(starts) and transcript.chunks[-1].end == transcript.seconds
    # every chunk's share, joined, is the transcript
    assert " ".join(c.text for c in transcript.chunks if c.text).split() == transcript.text.split()
    srt = LF.srt(transcript).strip().split("\n\n")
    assert len(srt) == sum(1 for c in transcript.chunks if c.text)
    assert srt[0].startswith("1\n00:00:00,000 --> 00:00:09,000\n")  # to the middle of the first overlap


# ---- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """The tiny random student saved as a Hugging Face folder (its 30 s window; fast)."""
    from kdlib import models

    _, bundle = models.tiny_random_pair(seed=0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    bundle.feature_extractor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A 70 s recording joined from corpus clips with pauses, a 4 s one, and a broken file."""
    from kdlib import data

    folder = tmp_path_factory.mktemp("audio")
    clips = [data.load_audio(u.audio).numpy() for u in data.scan_mls(data.embedded_corpus("it"), "test").utterances]
    pause = np.zeros(SR // 2, dtype=np.float32)
    joined = np.concatenate([part for clip in clips for part in (clip, pause)])
    joined = np.tile(joined, int(np.ceil(70 * SR / len(joined))))[: 70 * SR]
    sf.write(folder / "lecture.wav", joined, SR)
    sf.write(folder / "short.flac", clips[0][: 4 * SR], SR)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wave file")
    return folder


def test_transcribe_writes_each_format_and_names_a_broken_file(model_folder, recordings, tmp_path, capsys):
    for fmt in ("txt", "json", "srt"):
        out = tmp_path / fmt
        code = main(["transcribe", str(recordings), "--model", str(model_folder), "--format", fmt,
                     "--out", str(out), "--no-progress", "--language", "it", "--max-new-tokens", "6"])
        err = capsys.readouterr().err
        assert code == 1  # one input could not be read: non-zero, the others done
        assert f"{recordings / 'broken.wav'}: cannot decode audio" in err
        assert sorted(p.name for p in out.iterdir()) == [f"lecture.{fmt}", f"short.{fmt}"]
        assert not list(out.glob(".*.tmp-*"))
    lecture = json.loads((tmp_path / "json" / "lecture.json").read_text())
    assert lecture["seconds"] == 70.0 and len(lecture["chunks"]) == 3  # 30 s windows, 6 s overlap
    assert [c["start"] for c in lecture["chunks"]] == [0.0, 24.0, 48.0] and lecture["chunks"][-1]["end"] == 70.0
    short = json.loads((tmp_path / "json" / "short.json").read_text())
    assert len(short["chunks"]) == 1 and short["text"] == short["chunks"][0]["decoded"]
    assert (tmp_path / "txt" / "short.txt").read_text() == short["text"] + "\n"
    srt = (tmp_path / "srt" / "lecture.srt").read_text()
    if lecture["text"]:
        assert "00:00:00,000 -->" in srt


def test_transcribe_refuses_a_missing_input_before_loading_a_model(tmp_path, capsys):
    assert main(["transcribe", str(tmp_path / "nothing.wav"), "--model", "no-such-model"]) == 2
    assert f"{tmp_path / 'nothing.wav'}: no such file or folder" in capsys.readouterr().err


def test_ctranslate2_chunks_and_merges_like_transformers(model_folder, recordings, tmp_path):
    """The same recording through both engines (CTranslate2 at float32): the same chunks, the same
    merged transcript."""
    texts = {}
    for name, extra in (("hf", []), ("ct2", ["--ct2", "--quantization", "float32"])):
        out = tmp_path / name
        assert main(["transcribe", str(recordings / "lecture.wav"), "--model", str(model_folder), "--format", "json",
                     "--out", str(out), "--no-progress", "--max-new-tokens", "6", *extra]) == 0
        texts[name] = json.loads((out / "lecture.json").read_text())
    assert texts["ct2"]["engine"] == "ctranslate2 float32" and texts["hf"]["engine"].startswith("transformers")
    assert [c["decoded"] for c in texts["ct2"]["chunks"]] == [c["decoded"] for c in texts["hf"]["chunks"]]
    assert texts["ct2"]["text"] == texts["hf"]["text"]
