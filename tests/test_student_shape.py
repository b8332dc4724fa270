"""The student's shape (issue 18): a shorter encoder window, frame merging inside the encoder,
teacher/student frame alignment for both, and the clients that must still load the student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlib import config as C
from kdlib import frames as F

models = pytest.importorskip("kdlib.models")
ev = pytest.importorskip("kdlib.evaluate")
from kdlib import decode as dec  # noqa: E402

try:
    models.real_tokenizer()
    HAS_OFFLINE = True
except Exception:  # pragma: no cover - the offline-whisper extra is part of .[all]
    HAS_OFFLINE = False
needs_offline = pytest.mark.skipif(not HAS_OFFLINE, reason="needs the offline-whisper extra")


def _clips(n: int = 5) -> list[np.ndarray]:
    """Clips of different lengths and content (1.2 to 3.6 s)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = np.arange(int(16000 * (1.2 + 0.6 * i))) / 16000
        out.append((0.3 * np.sin(2 * np.pi * (150 + 90 * i) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def student():
    """A tiny random student whose greedy output depends on its input (std 0.2 weights, see
    tests/test_evaluate.py), cut to a 10 s window."""
    if not HAS_OFFLINE:
        pytest.skip("the real tokenizer needs the offline-whisper extra")
    _, bundle = models.tiny_random_pair(seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.normal_(0.0, 0.2)
    full_states = bundle.model.get_encoder()(bundle.features(_clips(1))).last_hidden_state
    models.shape_student(bundle, window_seconds=10)
    bundle.full_states = full_states
    return bundle


# --- the builder -----------------------------------------------------------------------------


@needs_offline
def test_window_keeps_the_first_position_rows_and_reads_1000_mel_frames(student):
    enc = student.model.get_encoder()
    assert student.model.config.max_source_positions == 500
    assert enc.embed_positions.weight.shape[0] == 500
    assert student.feature_extractor.chunk_length == 10
    feats = student.features(_clips(2))
    assert feats.shape[-1] == 1000  # 10 s of 10 ms log-mel frames
    states = enc(feats).last_hidden_state
    assert states.shape[1] == 500  # 20 ms encoder frames: the notes' T ~ 499
    _, fresh = models.tiny_random_pair(seed=0)
    assert not torch.equal(enc.embed_positions.weight, fresh.model.get_encoder().embed_positions.weight[:500])
    with pytest.raises(ValueError, match="1..30 s"):
        models.set_encoder_window(fresh.model, 31)


@needs_offline
def test_window_student_decodes_and_refuses_a_clip_longer_than_its_window(student):
    texts = dec.transcribe(student.model, student.feature_extractor, student.tokenizer, _clips(3), max_new_tokens=6)
    assert len(texts) == 3
    long_clip = np.zeros(16000 * 12, dtype=np.float32)
    with pytest.raises(ValueError, match="longer than the model's 10 s encoder window"):
        dec.transcribe(student.model, student.feature_extractor, student.tokenizer, [long_clip])


@needs_offline
def test_merging_inside_the_encoder_shortens_what_the_decoder_reads(tmp_path):
    _, bundle = models.tiny_random_pair(seed=1)
    models.shape_student(bundle, frame_factor=3, merge_layer=0)
    assert bundle.model.config.kdlib_merge == {"factor": 3, "after_layer": 0}
    assert models.encoder_output_frames(bundle.model.config) == 500
    feats = bundle.features(_clips(2))
    states = bundle.model.get_encoder()(feats).last_hidden_state
    assert states.shape[1] == 500
    # the decoder cross-attends to the merged frames: a forward pass with them runs
    out = bundle.model(input_features=feats, decoder_input_ids=torch.tensor([[50258, 50274]] * 2))
    assert out.encoder_last_hidden_state.shape[1] == 500
    # saved and loaded, the merge comes back (a plain Whisper folder + config.kdlib_merge)
    bundle.model.save_pretrained(tmp_path)
    bundle.tokenizer.save_pretrained(tmp_path)
    bundle.feature_extractor.save_pretrained(tmp_path)
    again = models.load_whisper(tmp_path)
    with torch.no_grad():
        assert torch.allclose(again.model.get_encoder()(feats).last_hidden_state, states, atol=1e-5)
    with pytest.raises(ValueError, match="not a standard Whisper shape"):
        ev.export_ct2(tmp_path, tmp_path / "ct2")


@needs_offline
def test_window_and_merge_from_config_through_the_trainer_builder():
    from kdlib import runs as R

    cfg = C.make_config("smoke", 2, overrides=dict(student_window_seconds=10, student_frame_factor=2,
                                                 student_merge_layer=0))
    _, student = R.load_pair(cfg)
    assert student.model.config.max_source_positions == 500
    assert models.encoder_output_frames(student.model.config) == 250
    assert student.feature_extractor.n_samples == 160000
    with pytest.raises(C.ConfigError, match="student_window_seconds"):
        C.make_config("smoke", 1, overrides=dict(student_window_seconds=40))


# --- the scan refuses clips longer than the window --------------------------------------------


def test_scan_skips_and_counts_clips_longer_than_the_window():
    from kdlib import data

    root = data.embedded_corpus("it")
    full = data.scan_mls(root, "dev")
    cut = data.scan_mls(root, "dev", window_seconds=4.0)
    longer = [u for u in full.utterances if u.duration > 4.0]
    assert longer, "the embedded dev split has clips over 4 s"
    assert cut.n_kept == full.n_kept - len(longer)
    skipped = cut.skipped["longer than window"]
    assert len(skipped) == len(longer)
    assert "encoder window of 4 s" in skipped[0][1]
    assert "longer than window" in cut.report()


# --- alignment ------------------------------------------------------------------------------


def test_window_alignment_is_the_identity_on_the_first_frames():
    teacher = torch.randn(2, 1500, 8)
    mel = torch.tensor([400, 1000])  # 4 s and 10 s of audio
    aligned, mask = F.teacher_on_student_frames(teacher, mel, window_frames=500)
    assert aligned.shape == (2, 500, 8)
    assert torch.equal(aligned, teacher[:, :500])
    assert mask.sum(1).tolist() == [200, 500]


def test_merge_alignment_averages_teacher_frames_k_i_to_k_i_plus_k_minus_1():
    teacher = torch.randn(1, 1500, 4)
    mel = torch.tensor([601])  # 301 encoder frames hold audio
    aligned, mask = F.teacher_on_student_frames(teacher, mel, window_frames=1500, factor=3)
    assert aligned.shape == (1, 500, 4)
    for i in (0, 7, 99):
        assert torch.allclose(aligned[0, i], teacher[0, 3 * i: 3 * i + 3].mean(0), atol=1e-6)
    # the last real window holds one real frame (300): its average is that frame alone
    assert torch.allclose(aligned[0, 100], teacher[0, 300], atol=1e-6)
    assert mask.sum().item() == 101
    # window and merge together: frames past the window are never used
    aligned, mask = F.teacher_on_student_frames(teacher, torch.tensor([3000]), window_frames=500, factor=2)
    assert aligned.shape == (1, 250, 4) and mask.all()
    assert torch.allclose(aligned[0, 249], teacher[0, 498:500].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="longer than the teacher"):
        F.teacher_on_student_frames(teacher[:, :400], mel, window_frames=500)


# --- clients: transformers' pipeline and CTranslate2 ----------------------------------------


@needs_offline
def test_window_student_in_ctranslate2_gives_transformers_tokens(student, tmp_path):
    pytest.importorskip("ctranslate2")
    hf = tmp_path / "hf"
    student.model.save_pretrained(hf)
    student.tokenizer.save_pretrained(hf)
    student.feature_extractor.save_pretrained(hf)
    clips = _clips(5)
    ref = dec.generate_token_ids(student.model, student.feature_extractor, clips, max_new_tokens=10, batch_size=1)
    assert len({tuple(r) for r in ref}) > 1, "the model must give different tokens for different clips"
    out = ev.export_ct2(hf, tmp_path / "ct2", quantization="float32")
    engine = ev.CT2Whisper(out, compute_type="float32", threads=1)
    assert engine.feature_extractor.n_samples == 160000  # features of the window's length
    assert engine.generate_token_ids(clips, max_new_tokens=10, batch_size=1) == ref
    texts = ev.transcribe_ct2(out, clips[:2], compute_type="float32", threads=1, max_new_tokens=10)
    assert texts == [t.strip() for t in student.tokenizer.batch_decode(ref[:2], skip_special_tokens=True)]


@needs_offline
def test_window_student_through_the_transformers_pipeline(student, tmp_path):
    from transformers import pipeline

    student.model.save_pretrained(tmp_path)
    student.tokenizer.save_pretrained(tmp_path)
    student.feature_extractor.save_pretrained(tmp_path)
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path), device="cpu")
    clips = _clips(3)
    ref = dec.transcribe(student.model, student.feature_extractor, student.tokenizer, clips, max_new_tokens=10,
                        batch_size=1)
    got = [asr({"raw": c, "sampling_rate": 16000},
               generate_kwargs={"language": "it", "task": "transcribe", "max_new_tokens": 10,
                                                         "num_beams": 1})["text"].strip()
           for c in clips]
    assert got == ref


@needs_offline
@pytest.mark.parametrize("shape", [dict(student_window_seconds=10), dict(student_frame_factor=3, student_merge_layer=0)])
def test_alignment_stage_trains_a_shaped_student_against_the_30s_teacher(shape, tmp_path, monkeypatch):
    """Stage II with a window or a merged student: the hidden terms see the teacher on the
    student's frame grid (same frame count, same mask), and the losses are finite."""
    from kdlib import distill as DL, train as T

    seen = []
    real = DL.forward_losses

    def spy(models_, loss_fn, batch, *args, **kwargs):
        out = real(models_, loss_fn, batch, *args, **kwargs)
        teacher_features = batch.get("teacher_input_features", batch["input_features"])
        seen.append((models_.student.base_model.model.config.max_source_positions,
                     batch["input_features"].shape[-1], teacher_features.shape[-1]))
        return out

    monkeypatch.setattr(T, "forward_losses", spy)
    captured = {}
    from kdlib import losses as L

    orig = L.DistillationLoss._prepare_hidden

    def prep(self, student_hidden, teacher_hidden, hidden_mask, projector, teacher_hidden_mask):
        captured["shapes"] = (tuple(student_hidden.shape[:2]), tuple(teacher_hidden.shape[:2]))
        return orig(self, student_hidden, teacher_hidden, hidden_mask, projector, teacher_hidden_mask)

    monkeypatch.setattr(L.DistillationLoss, "_prepare_hidden", prep)
    cfg = C.make_config("smoke", 2, overrides=dict(max_steps=2, eval_every=2, save_every=2, from_untrained=True,
                                                   **shape))
    summary = T.train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_geo"])
    frames_s, frames_t = captured["shapes"][0][1], captured["shapes"][1][1]
    assert frames_s == frames_t == 500  # 10 s window: 500; 1500 merged 3:1: 500
    if "student_window_seconds" in shape:
        assert seen[0] == (500, 1000, 3000)  # student reads 10 s of log-mels, the teacher its 30 s
    else:
        assert seen[0] == (1500, 3000, 3000)  # merging happens inside the encoder, after layer 0


@needs_offline
def test_latent_states_of_a_merged_student_line_up_with_the_teacher_pooled_by_k():
    from kdlib import viz

    teacher, student = models.tiny_random_pair(seed=0)
    models.shape_student(student, frame_factor=3, merge_layer=0)
    clips = _clips(3)
    s = viz.extract_states(student.model, student.feature_extractor, clips, name="s", frame_factor=3, progress=False)
    t = viz.extract_states(teacher.model, teacher.feature_extractor, clips, name="t", frame_factor=3, progress=False)
    assert s.hidden.shape[:2] == t.hidden.shape[:2]  # one state per 3 encoder frames on both sides
    assert np.array_equal(s.mask, t.mask)
    assert s.frame_seconds == t.frame_seconds == pytest.approx(0.06)
    with pytest.raises(ValueError, match="already merges 3"):
        viz.extract_states(student.model, student.feature_extractor, clips, name="s", frame_factor=2, progress=False)


def test_speedup_column_is_the_first_timed_rows_rtf_over_each_rows():
    rows = [{"name": "teacher", "rtf": 0.30}, {"name": "stored", "rtf": None}, {"name": "student", "rtf": 0.10}]
    ev.add_speedups(rows)
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[1]["speedup"] is None  # decoded from stored encoder states: not timed
    assert rows[2]["speedup"] == pytest.approx(3.0) and rows[2]["speedup_over"] == "teacher"
    table = ev.markdown_table(rows)
    assert "speed-up over the first row" in table and "| 3.00× |" in table
    ev.add_speedups(rows, reference="student")
    assert rows[0]["speedup"] == pytest.approx(1 / 3)


def test_benchmark_scripts_quick_modes_print_their_tables(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "flops_projection.py"
    spec = importlib.util.spec_from_file_location("flops_projection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick"])
    printed = capsys.readouterr().out
    assert "| whisper-large-v3 | whisper-small | 30 | 3 |" in printed
    merged = next(r for r in rows if r["factor"] == 3)
    plain = next(r for r in rows if r["factor"] == 1 and r["window_s"] == 30)
    assert merged["student_gmacs"] < plain["student_gmacs"] and merged["speedup"] > plain["speedup"] > 1
