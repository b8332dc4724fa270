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
# # 00 · A tour: teacher, student, a few distillation steps
#
# The whole book in one short notebook. We load a pretrained Whisper **teacher** and the smaller
# **student** built from it, let both transcribe three Italian clips, run a few steps of
# knowledge distillation (stage I: cross-entropy on the reference plus KL to the teacher's
# softened distribution), look at the loss, and let the student transcribe the same clips again.
# Each piece is a call into `kdlib`; the later chapters open those calls up one at a time.
#
# ## What this chapter teaches
#
# - what the teacher and the student are, and how far apart they start;
# - the shape of a distillation run: one config, one `run_stage` call, one run folder with the
#   config, the per-step loss history, the adapter;
# - what the loss components (CE, KL·T², their weighted total) look like over the first steps;
# - where in the book each piece is explained (the map at the end).
#
# ## What it needs
#
# Nothing from an earlier chapter: this is the first one. It loads the offline whisper-base
# teacher (the `offline-whisper` extra; built once from PyPI packages and cached in
# `~/.cache/kdlib`), the student built from it (whisper-base cut to a 10 s encoder window: 500
# encoder frames instead of 1500, chapter 02) and the first three clips of the embedded Italian `dev` split. With
# `preset = "smoke"` a tiny random teacher/student pair stands in and the chapter runs in
# seconds; the transcripts are then gibberish and the prose describes the `demo` run.

# %% tags=["parameters"]
preset = "demo"  # "smoke": tiny random pair, seconds; "demo": whisper-base → distil-base, a few CPU minutes; thesis: "thesis" (GPU)
n_clips = 3  # embedded Italian dev clips transcribed before and after; thesis: 3 (a tour, not an evaluation)
max_steps = 8  # stage-I optimizer steps; thesis: 8000 (chapter 05 runs the full stage)
out_dir = "../runs/00_tour"  # run folder of the tour; thesis: the same

# %%
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Audio, display

from kdlib import decode, evaluate
from kdlib.config import make_config
from kdlib.data import embedded_corpus, load_audio
from kdlib.runs import load_history, load_trained, teacher_model, untrained_student
from kdlib.train import run_stage

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
started = time.perf_counter()

# %% [markdown]
# ## One config for the whole run
#
# Every knob of a run lives in one `TrainConfig`. `make_config(preset, stage, overrides)` takes
# the preset's values, switches on the loss terms of the stage (stage I: CE and KL) and applies
# our overrides: here only a short run, one dev-loss evaluation at its end, and the dev loss
# computed on the same few clips we transcribe (chapter 05 runs the full stage).

# %%
config = make_config(preset, stage=1, overrides={
    "max_steps": max_steps, "warmup_steps": min(2, max_steps), "eval_every": max_steps,
    "save_every": max_steps, "eval_wer": False, "max_dev_utterances": n_clips,
})
for key in ("teacher", "student", "max_steps", "batch_size", "lr", "temperature", "ce_weight",
            "kl_weight", "lora_preset", "lora_r", "train_encoder"):
    print(f"{key:<14} {getattr(config, key)}")

# %% [markdown]
# On the demo the teacher is OpenAI's multilingual whisper-base and the student is whisper-base
# with a 10 s encoder window (`student_window_seconds`). Only LoRA adapters of the student's
# decoder train (`train_encoder` is off in stage I on the demo: the frozen encoder runs once per
# clip and its states are reused).
#
# ## Three clips, two models

# %%
utterances, _ = evaluate.load_utterances(embedded_corpus(config.language), config.dev_split,
                                         limit=n_clips)
audios = [load_audio(u.path).numpy() for u in utterances]
references = [u.text for u in utterances]
for u, audio in zip(utterances, audios):
    print(f"{u.id}  {len(audio) / 16000:4.1f} s  {u.text}")
display(Audio(audios[0], rate=16000))


def transcribe(model, tokenizer, feature_extractor):
    return decode.transcribe(model, feature_extractor, tokenizer, audios, language=config.language,
                               max_new_tokens=config.eval_max_new_tokens)


# each model reads its own log-mels and writes its own token ids (the thesis pair differs in both:
# large-v3 has 128 mel bins and another vocabulary, whisper-small 80)
teacher, teacher_tokenizer, teacher_fe = teacher_model(config)
student, tokenizer, feature_extractor = untrained_student(config)
n_teacher = sum(p.numel() for p in teacher.parameters())
n_student = sum(p.numel() for p in student.parameters())
print(f"teacher {n_teacher / 1e6:.1f} M parameters, student {n_student / 1e6:.1f} M "
      f"({n_student / n_teacher:.0%} of the teacher); mel bins: teacher {teacher.config.num_mel_bins}, "
      f"student {student.config.num_mel_bins}")
hyps = {"teacher": transcribe(teacher, teacher_tokenizer, teacher_fe),
        "student before KD": transcribe(student, tokenizer, feature_extractor)}
del teacher, student

# %% [markdown]
# The clips are Italian sentences spoken by espeak-ng (a synthetic voice; chapter 01 shows how
# the corpus is read). The demo student printed above is whisper-base itself with its encoder
# window cut from 30 s to 10 s: it keeps almost every parameter of the teacher (only the encoder's
# table of positions shrinks), but its encoder reads 500 frames instead of 1500. On a CPU most of
# Whisper's time is spent in the encoder (chapter 02 measures it), so the shorter window is what
# makes this student faster; chapter 08 measures its real-time factor against the teacher's. The
# thesis' student, whisper-small, is smaller as well.
#
# ## Before distillation

# %%
results = {"preset": preset, "clips": len(references), "wer": {}, "cer": {}}


def show(names):
    for i, ref in enumerate(references):
        print(f"[{utterances[i].id}]")
        print(f"  {'reference':<18} {ref}")
        for name in names:
            print(f"  {name:<18} {hyps[name][i]!r}")
    for name in names:
        score = decode.wer_cer(references, hyps[name])
        key = name.replace(" ", "_")
        results["wer"][key], results["cer"][key] = score["wer"], score["cer"]
        print(f"{name:<18} WER {score['wer']:.2f}  CER {score['cer']:.2f}  "
              f"(on these {len(references)} clips, {score['normalizer']} normaliser)")


show(["teacher", "student before KD"])

# %% [markdown]
# The teacher gets most words but not all (on the demo, WER about 0.41<!-- results: wer.teacher --> on these three clips):
# whisper-base is weak on synthetic voices, and chapter 05 adapts it to the domain before
# distilling from it. The demo student is the teacher with a shorter encoder window (10 s instead
# of 30 s, so its encoder reads a third of the frames; chapter 02): before any training it already
# transcribes much like the teacher, a little worse (WER 0.52<!-- results: wer.student_before_KD -->), because its encoder never saw
# a window that short. That gap, and the speed the short window buys, are what distillation works
# with. Every WER here
# uses Whisper's basic normaliser (lower case, punctuation removed; chapter 08).
#
# ## A few steps of knowledge distillation

# %%
summary = run_stage(config, out / "stage1", progress=False)
print({k: summary[k] for k in ("steps", "final_total", "final_ce", "final_kl", "dev_loss")})
print("trainable:", summary["trainable_report"])
results["trainable_percent"] = float(summary["trainable_report"].rsplit("trainable%:", 1)[1])
print("run folder:", sorted(p.name for p in (out / "stage1").iterdir()))

# %% [markdown]
# One call trained the student and wrote a run folder: the exact config
# (`training_config.json`), the loss of every step (`training_history.json`), TensorBoard
# scalars, a checkpoint to resume from and the trained adapter (`adapter_final/`). Rerunning the
# cell reuses the finished run instead of training again. Only the LoRA adapters train: a few
# percent of the student's parameters (2.1<!-- results: trainable_percent --> % on the demo).
#
# ## The loss components

# %%
history = load_history(out / "stage1")
steps = [h["step"] for h in history]
fig, ax = plt.subplots(figsize=(8, 3.6))
ax.plot(steps, [h["ce"] for h in history], marker="o", label="CE on the reference tokens")
# a step whose KL weight is 0 (kl_weight=0, the CE-only control) does not compute the term
ax.plot(steps, [h.get("kl", float("nan")) for h in history], marker="o", label="KL(teacher ‖ student)·T²")
ax.plot(steps, [h["total"] for h in history], marker="o", color="black", linestyle="--",
        label=f"total = {config.ce_weight:g}·CE + {config.kl_weight:g}·KL·T²")
ax.set(title=f"Stage I loss components, {len(steps)} steps ({preset})", xlabel="optimizer step",
       ylabel="loss (nats per token)")
ax.legend()
fig.tight_layout()
fig.savefig(out / "tour_losses.png", dpi=120)
results["steps"] = len(steps)
# first and last recorded value (a KL warm-up leaves the first steps without a KL term)
recorded = {term: [h[term] for h in history if h.get(term) is not None] for term in ("ce", "kl")}
results["loss"] = {term: {"first": values[0], "last": values[-1]} for term, values in recorded.items()}
plt.show()

# %% [markdown]
# Both terms are averaged over the real (non-padding) tokens of the batch. CE says how surprised
# the student is by the reference transcript; KL·T² how far its softened distribution (T = 2) is
# from the teacher's. On the demo CE falls over the eight steps (from 0.98<!-- results: loss.ce.first --> to 0.83<!-- results: loss.ce.last --> nats per
# token) while KL·T² rises from 0.08<!-- results: loss.kl.first --> to 0.31<!-- results: loss.kl.last -->: the student starts as a copy of the teacher, so
# it first agrees with it, and the reference tokens pull it away from the unadapted teacher's
# mistakes. Every step sees another batch, and the
# first steps run near the peak learning rate (3e-3, warmed up over 2 steps, then a cosine to 0).
# Eight steps on 64 clips are the very beginning of a run, not a result.
#
# ## After a few steps

# %%
student_kd, _, _, _ = load_trained(out / "stage1")
hyps["student after KD"] = transcribe(student_kd, tokenizer, feature_extractor)
del student_kd
show(["teacher", "student before KD", "student after KD"])
print(f"\nthe whole tour took {time.perf_counter() - started:.0f} s")
(out / "results.json").write_text(json.dumps(results, indent=2))

# %% [markdown]
# Be careful with what we just saw. After eight steps the student writes these three clips closer
# to the references than the teacher does (WER 0.21<!-- results: wer.student_after_KD --> against 0.41<!-- results: wer.teacher -->): its CE term pulls it towards the
# reference words, and the clips are close to what it trained on. Three clips are an anecdote, not
# a measurement, and the loss it trained on is measured with *teacher forcing* (each next token
# given the correct previous ones), while decoding feeds the student its own output: a falling
# training loss is necessary for better transcripts, not sufficient.
# Chapter 05 runs stage I for real (60 steps on the demo, with a teacher first adapted to the
# domain and a CE-only control), chapters 06 and 07 add the other two stages, and chapter 08
# measures the result properly on all 20 dev clips. At thesis scale (whisper-large-v3 → whisper-small on MLS
# Italian) the same calls run for 8,000 steps per stage on a GPU.
#
# ## A map of the book
#
# | chapter | what it teaches | reads |
# |---|---|---|
# | 00 tour | the whole pipeline in one short run (this chapter) | nothing |
# | 01 data loader | MLS folders, decoding and resampling, Dataset, collate, length grouping, bad input | nothing |
# | 02 Whisper frames | 30 s → 3000 log-mel → 1500 encoder frames, 3:1 downsampling, alignment, masks | nothing |
# | 03 losses | hard vs soft labels, KL·T², geodesic vs L2, point vs curve, TAID | nothing |
# | 04 LoRA | where adapters go, what trains, the AdamW caveat, merging | nothing |
# | 05 stage I | knowledge distillation, stage 0 teacher adaptation, KD against CE only | nothing |
# | 06 stage II | representation alignment: geodesic + contrastive through the projector | chapter 05's stage-I run |
# | 07 stage III | decoder fine-tuning with the encoder frozen; the results table | chapters 05 and 06 |
# | 08 evaluation | WER/CER with a named normaliser, real-time factor, memory, CTranslate2 | chapters 05 and 07 |
# | 09 search and ablations | Optuna search for the main run, ablations as config diffs | nothing |
# | 10 latent space | PCA, t-SNE, UMAP and DTW of teacher and student states | chapter 07's run |
# | 11 distil-whisper's recipe | pseudo-labels with a WER filter, a shared frozen encoder, CTranslate2 int8 | chapter 07's run (an extra row only) |
#
# A chapter that reads an earlier chapter's run folder trains the missing stage itself (at the
# same preset) when that folder is absent, so every chapter also runs on its own.
#
# ## Summary
#
# - A teacher (whisper-base) and a student built from it (the same weights, a 10 s encoder
#   window) start close: the teacher transcribes the synthetic Italian clips with errors, the
#   untrained student a little worse, because its encoder never read so short a window.
# - A distillation run is one `TrainConfig` (preset + stage + overrides) and one `run_stage`
#   call, which writes a run folder that can be resumed, reused and loaded (`load_trained`).
# - Stage I minimises CE on the reference plus KL·T² to the teacher. Over these eight steps CE
#   falls while KL·T² rises (the student leaves the unadapted teacher's mistakes); a few steps are
#   far from enough, and a loss measured with teacher forcing does not yet say how the student
#   decodes.
#
# ## Exercises
#
# 1. Set `max_steps = 30` (and a new `out_dir`). How do the loss curves and the three
#    transcripts of the student change? How long did the run take per step?
# 2. Add `"kl_weight": 0.0` to the overrides: the student is then fine-tuned on the references
#    alone. Compare the CE curve with the KD run; chapter 05 makes this comparison properly.
# 3. Open `training_history.json` of the run: which other numbers does every step record, and
#    which of them would you watch first when a run diverges?
