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
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Stage III: decoder fine-tuning with the encoder frozen
#
# After stage II the student's encoder speaks the teacher's language. Stage III freezes it and
# fine-tunes the decoder's LoRA adapters as a *conditional language model* on top of it, with
# CE and KL still on. The contrastive weight is decayed linearly to 0.1 over the stage: in the
# thesis' words, "its contribution to representation learning diminishes and may introduce
# misaligned gradients during decoder optimization". With the encoder frozen, its outputs are
# computed once per utterance and reused every epoch (`kdlib.train.EncoderCache`).
#
# ## What this chapter teaches
#
# - stage III: the encoder frozen (and cached), decoder LoRA trained with CE + KL, the contrastive
#   weight decayed;
# - how the stages chain (each starts from the previous stage's adapter) and how to read the
#   results table of the whole pipeline.
#
# The chapter ends the training part of the book with the table that matters: dev WER of the
# student before training, after CE-only fine-tuning, after stage I (KD), after stage II and
# after stage III, next to the teacher.
#
# ## What it needs
#
# Chapter 06's run folder (`prev_run`) and chapter 05's folder (`stage1_root`). A
# missing (or other-preset) prerequisite is trained here first, at the same preset.
# **Writes** `out_dir/stage3` (read by chapters 08 and 10) and `out_dir/results.json`.

# %% tags=["parameters"]
preset = "demo"  # "smoke": tiny random pair, seconds; "demo": whisper-base → distil-base on CPU, minutes; thesis: "thesis" (GPU)
prev_run = "../runs/06_stage2_alignment/stage2"  # stage II run folder (chapter 06); thesis: the same
stage1_root = "../runs/05_stage1_kd"  # holds stage1/ and ce_only/ from chapter 05; thesis: the same
max_steps = None  # None: the preset's (demo 60; thesis 8000)
overrides = {}  # e.g. {"contrastive_final_weight": 0.0}; thesis: {} (decay to 0.1, the thesis' schedule)
eval_limit = None  # None: the preset's max_dev_utterances (demo: all 20 dev clips; thesis: 1248)
out_dir = "../runs/07_stage3_decoder"  # thesis: the same (chapters 08 and 10 read it)

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt

from kdlib import evaluate
from kdlib.config import TrainConfig, make_config
from kdlib.data import embedded_corpus
from kdlib.train import (final_dev_scores, finished_run, load_history, load_trained, run_stage, teacher_model,
                         untrained_student)

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
if max_steps is not None:
    overrides = {**overrides, "max_steps": max_steps}


# %% [markdown]
# ## The runs this chapter builds on

# %%
runs = {"stage1": Path(stage1_root) / "stage1", "ce_only": Path(stage1_root) / "ce_only", "stage2": Path(prev_run)}
if not finished_run(runs["stage1"], preset):
    print(f"{runs['stage1']} missing or from another preset: training stage I here")
    runs["stage1"] = out / "stage1"
    run_stage(make_config(preset, stage=1), runs["stage1"])
if not finished_run(runs["ce_only"], preset):
    print(f"{runs['ce_only']} missing or from another preset: training the CE-only control here")
    runs["ce_only"] = out / "ce_only"
    run_stage(make_config(preset, stage=1, overrides={"kl_weight": 0.0}), runs["ce_only"])
if not finished_run(runs["stage2"], preset):
    print(f"{runs['stage2']} missing or from another preset: training stage II here")
    runs["stage2"] = out / "stage2"
    stage1_config = TrainConfig.from_json(runs["stage1"] / "training_config.json")
    run_stage(make_config(preset, stage=2, overrides={"init_from": str(runs["stage1"]),
                                                      "teacher_from": stage1_config.teacher_from}), runs["stage2"])
for name, path in runs.items():
    print(f"{name:<8} {path}")

# %% [markdown]
# Each path is a run folder with `training_config.json`, `adapter_final/` and its history.
#
# ## Stage III

# %%
stage2_config = TrainConfig.from_json(runs["stage2"] / "training_config.json")
config3 = make_config(preset, stage=3, overrides={
    **overrides, "init_from": str(runs["stage2"]), "teacher_from": stage2_config.teacher_from,
})
for key in ("ce_weight", "kl_weight", "contrastive_weight", "contrastive_final_weight", "train_encoder", "max_steps"):
    print(f"  {key:<26} {getattr(config3, key)}")
summary = run_stage(config3, out / "stage3")
runs["stage3"] = out / "stage3"
trainable = json.loads((out / "stage3" / "trainable.json").read_text())
assert not any(".encoder." in name for name in trainable["student"]), "stage III must not train the encoder"
print({k: summary[k] for k in ("final_ce", "final_kl", "final_contrastive", "dev_loss", "dev_wer")})

# %% [markdown]
# The assertion checks what stage III trains: no encoder parameter is in the trainable list.
#
# ## The contrastive weight decays to 0.1

# %%
history = load_history(out / "stage3")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
axes[0].plot([h["step"] for h in history], [h["w_contrastive"] for h in history], color="C3")
axes[0].set(title="Contrastive weight in stage III", xlabel="step", ylabel="weight")
axes[1].plot([h["step"] for h in history], [h["ce"] for h in history], label="CE")
axes[1].plot([h["step"] for h in history], [h["kl"] for h in history], label="KL·T²")
axes[1].set(title="Stage III losses (train)", xlabel="step", ylabel="nats/token")
axes[1].legend()
fig.tight_layout()
fig.savefig(out / "stage3_curves.png", dpi=120)
plt.show()

# %% [markdown]
# Left: the schedule of the contrastive weight, linear from its stage value down to 0.1.
# Right: the decoder's losses with the encoder frozen.
#
# ## The results table

# %%
root = Path(config3.data_root) if config3.data_root else embedded_corpus(config3.language)
limit = eval_limit or config3.max_dev_utterances


def score(model, tokenizer, feature_extractor, name):
    metrics = evaluate.evaluate_model(
        (model, feature_extractor, tokenizer), data_root=root, split=config3.dev_split,
        language=config3.language, limit=limit, name=name, progress=False,
        max_new_tokens=config3.eval_max_new_tokens, reuse_encoder_states=True,
    )
    return {"model": name, "wer": metrics["wer"], "cer": metrics["cer"], "n_utterances": metrics["n_utterances"],
            "normalizer": metrics["normalizer"]}


# Models chapter 05 already scored on the same clips are read from its table; a trained run's
# scores come from its trainer's final evaluation (summary.json: same greedy decoding, same
# normaliser). Only what is missing, or a different `eval_limit`, is decoded here.
earlier = Path(stage1_root) / "stage1_table.json"
earlier_rows = {r["model"]: r for r in json.loads(earlier.read_text())} if earlier.exists() and eval_limit is None else {}


def reuse_or_score(name, earlier_name, load):
    row = earlier_rows.get(earlier_name)
    if row is not None and row.get("n") == limit_or_all:
        return {"model": name, "wer": row["wer"], "cer": row["cer"], "n_utterances": row["n"],
                "normalizer": evaluate.NORMALIZER}
    return score(*load(), name)


def run_row(name, key):
    done = final_dev_scores(runs[key]) if eval_limit is None else None
    if done is not None:
        return {"model": name, "wer": done["wer"], "cer": done["cer"], "n_utterances": done["n"],
                "normalizer": evaluate.NORMALIZER}
    model, tok, fe, _ = load_trained(runs[key])
    return score(model, tok, fe, name)


limit_or_all = (final_dev_scores(runs["stage3"]) or {}).get("n")
rows = [reuse_or_score("teacher", "teacher (whisper-base)", lambda: teacher_model(make_config(preset, stage=1)))]
if config3.teacher_from:
    rows.append(reuse_or_score("teacher, adapted (stage 0)", "teacher adapted (stage 0)",
                               lambda: teacher_model(config3)))
rows.append(reuse_or_score("student, untrained", "student, untrained", lambda: untrained_student(config3)))
for name, key in (("student, CE only", "ce_only"), ("student, stage I (KD)", "stage1"),
                  ("student, stage I+II", "stage2"), ("student, stage I+II+III", "stage3")):
    rows.append(run_row(name, key))
print(f"{'model':<28}{'dev WER':>10}{'dev CER':>10}")
for row in rows:
    print(f"{row['model']:<28}{row['wer']:>10.3f}{row['cer']:>10.3f}")
(out / "results.json").write_text(json.dumps({"rows": rows, "runs": {k: str(v) for k, v in runs.items()}}, indent=2))

fig, ax = plt.subplots(figsize=(8, 3.8))
ax.barh([r["model"] for r in rows][::-1], [r["wer"] for r in rows][::-1], color="C0")
ax.set(title=f"Dev WER, {rows[0]['n_utterances']} clips (Whisper basic normaliser, greedy)",
       xlabel="WER (lower is better)")
fig.tight_layout()
fig.savefig(out / "results_wer.png", dpi=120)
plt.show()

# %% [markdown]
# Read the table from the bottom up: each stage's row says what that stage added on top of the
# previous one, with the same data and seed. CE-only and stage I differ in one field (the KL
# weight), so their gap is the value of the teacher's soft targets at this budget. Twenty
# synthetic dev clips are a small sample: differences of a few points are within what another
# seed would change (chapter 09 runs seeds).
#
#
# ## What the student costs: the speed/accuracy frontier
#
# Distillation pays off when the student is much cheaper than its teacher and nearly as good.
# The student's shape is set in its config (chapter 02): `student_window_seconds` cuts the
# encoder's window (the demo's 10 s: 500 encoder frames instead of 1500, a standard Whisper),
# `student_decoder_layers` keeps maximally spaced decoder layers. One point per step from the
# teacher to the deployed student, each decoded on the same dev clips in this one process with
# the same threads (greedy, Whisper's basic normaliser); the speed-up is over the teacher in
# transformers. CTranslate2 points are the engine a user deploys (int8 for the student).

# %%
import copy
import tempfile

from kdlib import models

t_model, t_tok, t_fe = teacher_model(make_config(preset, stage=1))
window_cut = models.shape_student(models.WhisperBundle(copy.deepcopy(t_model), t_tok, t_fe),
                                  window_seconds=config3.student_window_seconds) \
    if config3.student_window_seconds else None
s_model, s_tok, s_fe, _ = load_trained(runs["stage3"])
entries = [{"name": "teacher", "model": (t_model, t_fe, t_tok)}]
if window_cut is not None:
    entries.append({"name": f"teacher, {config3.student_window_seconds} s window (no training)",
                    "model": window_cut})
entries.append({"name": "student, stages I-III", "model": (s_model, s_fe, s_tok)})
ct2_tmp = Path(tempfile.mkdtemp(prefix="ct2-", dir=out))
try:
    import ctranslate2  # noqa: F401

    for name, (m, tok, fe), quant in (("teacher", (t_model, t_tok, t_fe), "float32"),
                                      ("student", (s_model, s_tok, s_fe), "int8")):
        if getattr(m.config, "kdlib_merge", None):
            continue  # a merged student is not a CTranslate2 shape (transformers only)
        hf = ct2_tmp / f"{name}_hf"
        m.save_pretrained(hf)
        tok.save_pretrained(hf)
        fe.save_pretrained(hf)
        entries.append({"name": f"{name}, CTranslate2 {quant}", "compute_type": quant,
                        "ct2_dir": evaluate.export_ct2(hf, ct2_tmp / f"{name}_ct2", quantization=quant),
                        "n_parameters": models.count_parameters(m)})
except ImportError:
    print("ctranslate2 not installed: transformers points only")
frontier = evaluate.compare_models(entries, data_root=root, split=config3.dev_split, language=config3.language,
                                   limit=limit, max_new_tokens=config3.eval_max_new_tokens, progress=False,
                                   out_dir=out / "frontier")
adapted_row = next((r for r in rows if r["model"].startswith("teacher, adapted")), None)
print(f"{'model':<44}{'WER':>7}{'CER':>7}{'RTF':>8}{'speed-up':>10}")
for r in frontier:
    print(f"{r['name']:<44}{r['wer']:>7.3f}{r['cer']:>7.3f}{r['rtf']:>8.3f}{r['speedup']:>9.2f}x")

fig, ax = plt.subplots(figsize=(8, 4.2))
for r in frontier:
    ax.scatter(r["speedup"], r["wer"], s=40, marker="s" if "CTranslate2" in r["name"] else "o")
    ax.annotate(r["name"], (r["speedup"], r["wer"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
if adapted_row is not None:
    ax.axhline(adapted_row["wer"], color="gray", ls="--", lw=0.8, label="adapted teacher (stage 0), WER")
    ax.axhline(adapted_row["wer"] + 0.10, color="gray", ls=":", lw=0.8, label="adapted teacher + 0.10")
ax.axvline(2.5, color="C3", ls=":", lw=0.8, label="2.5x")
ax.set(title=f"Speed/accuracy frontier on {len(frontier) and frontier[0]['n_utterances']} dev clips",
       xlabel="speed-up over the teacher in transformers (same process, same threads)",
       ylabel="WER (greedy, basic normaliser)")
ax.legend(fontsize=7, loc="upper right")
fig.tight_layout()
fig.savefig(out / "frontier.png", dpi=120)
plt.show()
results_path = out / "results.json"
saved = json.loads(results_path.read_text())
saved["frontier"] = [{k: r.get(k) for k in ("name", "engine", "compute_type", "wer", "cer", "rtf", "speedup",
                                              "n_parameters", "n_utterances")} for r in frontier]
results_path.write_text(json.dumps(saved, indent=2))

# %% [markdown]
# Each point is one step from the teacher towards the deployed student. Cutting the window is
# free on these short clips (it does not train anything), and it is where most of the CPU time
# goes: the encoder is about three quarters of a whisper-base transcription here (shared/FACTS).
# The trained student then has to win back the accuracy that the adapted teacher has (dashed
# line; the dotted line is the target of "within 0.10"). `benchmarks/student_payoff.py` measures
# the same targets over three seeds with their spread, on dev and test; `benchmarks/README.md`
# holds one run's table. faster-whisper 1.2.1 cannot run a window student (it pads every window
# to 3000 log-mel frames); `kdlib.evaluate.CT2Whisper` feeds CTranslate2 features of the window's
# length.
#
# ## Summary
#
# - Stage III freezes the encoder (its outputs are cached) and fine-tunes decoder LoRA with CE +
#   KL while the contrastive weight decays linearly to 0.1.
# - Every stage starts from the previous stage's `adapter_final/` and the same (adapted) teacher.
# - The results table compares teacher, untrained student, CE-only, and stages I → III on dev.
#
# ## Exercises
#
# 1. Export the final student with `python -m kdlib export --run-dir ../runs/07_stage3_decoder/stage3`
#    and transcribe a clip with `transformers.pipeline("automatic-speech-recognition", ...)`.
# 2. Set `overrides={"contrastive_final_weight": 0.5}` (no decay): does stage III's CE curve change?
# 3. Which row would you report as "the distilled student" in a thesis, and which rows does a
#    reviewer need to believe the gain comes from distillation?
