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
# The runs of the earlier stages, as parameters: stage I and its CE-only control (chapter 05)
# and stage II (chapter 06). `scripts/build_book.py` passes the book's own runs; left at `None`
# (or missing, or of another preset), a prerequisite is trained here first, under `out_dir`,
# at the same preset. **Writes** `out_dir/stage3` and `out_dir/results.json`.

# %% tags=["parameters"]
preset = "demo"  # "smoke": tiny random pair, seconds; "demo": whisper-base → distil-base on CPU, minutes; thesis: "thesis" (GPU)
stage1_run = None  # stage I run folder (chapter 05's stage1/); None: trained here; thesis: chapter 05's
ce_only_run = None  # the CE-only control (chapter 05's ce_only/); None: trained here; thesis: chapter 05's
stage2_run = None  # stage II run folder (chapter 06's stage2/); None: trained here; thesis: chapter 06's
max_steps = None  # None: the preset's (demo 60; thesis 8000)
overrides = {}  # e.g. {"contrastive_final_weight": 0.0}; thesis: {} (decay to 0.1, the thesis' schedule)
eval_limit = None  # None: the preset's max_dev_utterances (demo: all 20 dev clips; thesis: 1248)
out_dir = "../runs/07_stage3_decoder"  # thesis: your own folder

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt

from kdlib import evaluate
from kdlib.config import TrainConfig, make_config
from kdlib.train import finished_run, load_history, run_stage, teacher_model, untrained_student

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
if max_steps is not None:
    overrides = {**overrides, "max_steps": max_steps}


# %% [markdown]
# ## The runs this chapter builds on

# %%
runs = {"stage1": Path(stage1_run or out / "stage1"), "ce_only": Path(ce_only_run or out / "ce_only"),
        "stage2": Path(stage2_run or out / "stage2")}
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
def model_scores(load, config, name):
    """Dev scores of a model that is not a run (teacher, untrained student): decoded here."""
    model, tokenizer, feature_extractor = load(config)
    return evaluate.dev_scores((model, feature_extractor, tokenizer), config3, name=name, limit=eval_limit)


# A trained run's scores come from its trainer's final evaluation (summary.json: same greedy
# decoding, same normaliser, same clips); only the others, or another `eval_limit`, are decoded.
rows = [model_scores(teacher_model, make_config(preset, stage=1), "teacher")]
if config3.teacher_from:
    rows.append(model_scores(teacher_model, config3, "teacher, adapted (stage 0)"))
rows.append(model_scores(untrained_student, config3, "student, untrained"))
for name, key in (("student, CE only", "ce_only"), ("student, stage I (KD)", "stage1"),
                  ("student, stage I+II", "stage2"), ("student, stage I+II+III", "stage3")):
    rows.append(evaluate.dev_scores(runs[key], config3, name=name, limit=eval_limit))
rows = [{"model": r["name"], **{k: r[k] for k in ("wer", "cer", "n_utterances", "normalizer", "scored_by")}}
        for r in rows]
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
# ## Summary
#
# - Stage III freezes the encoder (its outputs are cached) and fine-tunes decoder LoRA with CE +
#   KL while the contrastive weight decays linearly to 0.1.
# - Every stage starts from the previous stage's `adapter_final/` and the same (adapted) teacher.
# - The results table compares teacher, untrained student, CE-only, and stages I → III on dev.
#
# ## Exercises
#
# 1. Export the final student with `python -m kdlib export --run-dir <out_dir>/stage3`
#    and transcribe a clip with `transformers.pipeline("automatic-speech-recognition", ...)`.
# 2. Set `overrides={"contrastive_final_weight": 0.5}` (no decay): does stage III's CE curve change?
# 3. Which row would you report as "the distilled student" in a thesis, and which rows does a
#    reviewer need to believe the gain comes from distillation?
