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
# # 04 · LoRA: where to adapt, what trains, what the optimizer keeps, how to merge
#
# The thesis never trains a whole Whisper. The teacher is adapted to the domain (stage 0) and the
# student is distilled (stages I–III) through small low-rank adapters (LoRA) and one projector; the
# rest stays frozen.
#
# ## What this chapter teaches
#
# The LoRA machinery of `kdlib.models`:
#
# * what a LoRA adapter computes, W x + (α/r)·B A x, checked by hand on one real layer;
# * where `kdlib` can put adapters in Whisper (the named presets of the thesis) and how many
#   parameters each one trains on the teacher and on the student, with the report format of peft;
# * what is trainable in a distillation run: adapters *and* the projector;
# * the optimizer caveat from the thesis notes, measured: when frozen parameters cost AdamW memory
#   and when they do not, and why `build_optimizer` takes trainable parameters only;
# * merging an adapter back into plain weights, and checking that nothing changed.
#
# ## What it needs
#
# No earlier chapter's output: it loads the offline whisper-base teacher and the
# `distil-base` student built from it (the `offline-whisper` extra) and one clip of the embedded
# Italian corpus. With `preset = "smoke"` it uses a tiny random pair instead (`"thesis-tiny"`: one
# shaped like large-v3 → small; seconds, the numbers then mean nothing); the prose describes the `demo` run.

# %% tags=["parameters"]
preset = "demo"  # "smoke": tiny random models (seconds); "demo": whisper-base + distil-base, < 2 min on CPU
teacher = "whisper-base"  # thesis: "openai/whisper-large-v3"
student = "distil-base"  # thesis: "openai/whisper-small"
lora_r = 8  # thesis: 32
lora_alpha = 16  # thesis: 64 (alpha / r is 2 in both)
lora_preset = "dec_self_qv"  # preset of the optimizer and merge experiments; thesis: "qkv_all"
steps = 3  # optimizer steps per setup in the caveat experiment; thesis: n/a (a demonstration)
lr = 1e-3  # AdamW learning rate; thesis: 2.6e-4
weight_decay = 0.01  # AdamW weight decay; thesis: 0.01
out_dir = "../runs/04_lora"  # figures, tables and runs of this chapter; thesis: the same

# %%
import copy
import json
import re
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from kdlib.config import make_config
from kdlib.data import embedded_corpus, load_audio, scan_mls
from kdlib.losses import cross_entropy, geodesic
from kdlib.models import (LORA_PRESETS, TINY_RANDOM, RiemannianProjector, apply_lora, build_optimizer,
                          count_parameters, load_whisper, lora_target_modules,
                          optimizer_state_bytes, tiny_random_named, trainable_report)

# peft asks transformers a deprecated question on every wrap; the answer is right, the warning noise
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
torch.manual_seed(0)
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
results = {"preset": preset, "teacher": teacher, "student": student, "lora_r": lora_r,
           "lora_alpha": lora_alpha, "lora_preset": lora_preset}
MB = 2**20

# %% [markdown]
# ## The models and one clip
#
# We load both models and one clip of the embedded Italian dev split, and turn its transcript into
# the decoder's input tokens and labels as the trainer does (the language, task and no-timestamps
# tokens are forced at decoding, so they are not predicted).

# %%
start = time.perf_counter()
if make_config(preset).teacher in TINY_RANDOM:  # smoke, thesis-tiny: the preset's tiny random pair
    teacher_bundle, student_bundle = tiny_random_named(make_config(preset).teacher)
else:
    teacher_bundle, student_bundle = load_whisper(teacher), load_whisper(student)
teacher_model, student_model = teacher_bundle.model, student_bundle.model
clip = scan_mls(embedded_corpus("it"), "dev").utterances[0]
wave = load_audio(clip.audio).numpy()  # (samples,) float32 at 16 kHz
features = student_bundle.features(wave)  # (1, n_mels, 3000)
tokenizer = student_bundle.tokenizer
tokenizer.set_prefix_tokens(language="italian", task="transcribe", predict_timestamps=False)
ids = torch.tensor([tokenizer(clip.text).input_ids])  # <|sot|><|it|><|transcribe|><|notimestamps|> text <|eot|>
decoder_input_ids, labels = ids[:, :-1], ids[:, 1:].clone()
labels[:, :3] = -100
d_teacher, d_student = teacher_model.config.d_model, student_model.config.d_model
print(f"loaded in {time.perf_counter() - start:.1f} s: {teacher_bundle.name} "
      f"({count_parameters(teacher_model):,} params, d_model {d_teacher}) -> {student_bundle.name} "
      f"({count_parameters(student_model):,} params, d_model {d_student})")
print(f"clip {clip.id}, {clip.duration:.2f} s, {ids.shape[1]} tokens: {clip.text!r}")

# %% [markdown]
# The student has the teacher's whole encoder and 2 of its 6 decoder layers, so it is about three
# quarters of the teacher's size; both have d_model 512. (At thesis scale: whisper-small, 768, and
# large-v3, 1280.)
#
# ## LoRA in one layer
#
# A LoRA adapter (Hu et al. 2021) leaves a pretrained weight W (d_out × d_in) frozen and learns a
# low-rank update next to it:
#
# h = W x + (α / r) · B A x,  A: r × d_in,  B: d_out × r.
#
# A starts random and B starts at zero, so at initialisation the adapted model *is* the pretrained
# model. Instead of d_in·d_out numbers the adapter trains r·(d_in + d_out). The factor α/r keeps the
# size of the update roughly the same when you change r, so r can be tuned without retuning the
# learning rate from scratch. We wrap the student with `apply_lora(model, preset, r, alpha, dropout)`
# and look at one adapted layer.

# %%
adapted = apply_lora(copy.deepcopy(student_model), lora_preset, r=lora_r, alpha=lora_alpha, dropout=0.0)
first = lora_target_modules(student_model, lora_preset)[0]
layer = adapted.base_model.model.get_submodule(first)
A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, d_in), (d_out, r)
W, bias = layer.base_layer.weight, layer.base_layer.bias  # (d_out, d_in), frozen
print(f"{first}: W {tuple(W.shape)} frozen, A {tuple(A.shape)}, B {tuple(B.shape)}, "
      f"scaling α/r = {layer.scaling['default']}")
print(f"B is zero at init: {not B.any().item()}; trainable numbers {A.numel() + B.numel():,} "
      f"instead of {W.numel():,} ({100 * (A.numel() + B.numel()) / W.numel():.1f} %)")
x = torch.randn(4, W.shape[1])
with torch.no_grad():
    B.normal_(std=0.02)  # pretend it has trained, to see the formula at work
    by_hand = x @ W.T + (bias if bias is not None else 0) + (lora_alpha / lora_r) * (x @ A.T @ B.T)
    err = (layer(x) - by_hand).abs().max().item()
    B.zero_()
print(f"peft's layer vs W x + b + (α/r) B A x by hand: max |difference| = {err:.2e}")
results["one_layer"] = {"module": first, "A": list(A.shape), "B": list(B.shape), "formula_max_abs_err": err}

# %% [markdown]
# peft's layer computes exactly the formula (the difference is float32 rounding). For a square
# 512 × 512 projection at r = 8 the adapter trains 8 192 numbers, 3 % of the matrix; at thesis scale
# (768 × 768, r = 32) it is 8 %. The saving disappears at r = d/2, where r·(d + d) = d².
#
# ## Where to inject: the presets
#
# The thesis compared several places to put adapters. `kdlib.models.LORA_PRESETS` names them; each is
# a regular expression over module names that peft matches in full:
#
# | preset | adapted linear layers |
# |---|---|
# | `dec_self_qv` | decoder self-attention q, v |
# | `dec_cross_qv` | decoder cross-attention q, v (`encoder_attn`: the decoder's look at the audio) |
# | `qkv_all` | q, k, v of every attention: encoder self, decoder self and cross |
# | `qkvo_all` | the same plus the output projection `out_proj` |
# | `ffn` | `fc1`, `fc2` of every encoder and decoder layer |
# | `decoder_all` | every attention projection (self and cross: q, k, v, out) and `fc1`, `fc2` of the decoder only |
# | `decoder_no_cross_kv` | `decoder_all` without the cross-attention k, v, which read all 1500 encoder frames (stage 0 at thesis scale: less memory) |
#
# We apply each preset to the teacher and to the student, print `trainable_report` (peft's own
# format) and split the trainable count into encoder and decoder. `unload()` removes the adapters
# again, so one model serves all presets.

# %%
def parse_report(report: str) -> tuple[int, int, float]:
    n, m, p = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)",
                           report).groups()
    return int(n.replace(",", "")), int(m.replace(",", "")), float(p)


rows = []
for role, bundle in (("teacher", teacher_bundle), ("student", student_bundle)):
    model = bundle.model
    for name in LORA_PRESETS:
        wrapped = apply_lora(model, name, r=lora_r, alpha=lora_alpha)
        report = trainable_report(wrapped)
        n, total, pct = parse_report(report)
        in_encoder = sum(p.numel() for k, p in wrapped.named_parameters()
                         if p.requires_grad and ".encoder." in k)
        rows.append({"model": bundle.name, "role": role, "preset": name, "modules":
                     len(lora_target_modules(model, name)), "trainable": n, "encoder": in_encoder,
                     "all": total, "trainable_pct": pct})
        print(f"{bundle.name:>20} {name:>12}: {report}")
        model = wrapped.unload()  # back to the plain model (same object, adapters removed)
    model.requires_grad_(True)  # peft froze the base; leave it as we found it
results["presets"] = rows
results["trainable_counts"] = {role: {r["preset"]: r["trainable"] for r in rows if r["role"] == role}
                              for role in ("teacher", "student")}

# %%
print(f"LoRA r = {lora_r}, alpha = {lora_alpha}\n")
print(f"| preset | {teacher_bundle.name}: modules | trainable | in encoder | % "
      f"| {student_bundle.name}: modules | trainable | in encoder | % |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for name in LORA_PRESETS:
    t, s = (next(r for r in rows if r["role"] == role and r["preset"] == name) for role in ("teacher", "student"))
    print(f"| `{name}` | " + " | ".join(
        f"{r['modules']} | {r['trainable']:,} | {r['encoder']:,} | {r['trainable_pct']:.4f}" for r in (t, s)) + " |")

# %% [markdown]
# Read the demo table (whisper-base: 6 + 6 layers; distil-base: 6 + 2) column by column. Every preset
# trains under 1 % of either model. The two `_qv` decoder presets adapt 2 linear layers per decoder
# layer and touch nothing in the encoder: 98 304<!-- results: trainable_counts.teacher.dec_self_qv --> parameters on the teacher, 32 768<!-- results: trainable_counts.student.dec_self_qv --> on the student
# (a third, since it has a third of the decoder layers). The other three presets reach into the
# encoder: a third to a half of their parameters on the teacher, 60–75 % on the student, whose 6
# encoder layers face only 2 decoder layers. `ffn` adapts fewer layers than `qkvo_all` (2 against 4 per attention block) but
# wider ones (512 → 2048), so on the student both train 327 680<!-- results: trainable_counts.student.ffn --><!-- results: trainable_counts.student.qkvo_all --> parameters.
#
# Which one to use is a choice about *what* should change. The encoder presets let the student's
# audio representation move (stage II aligns it with the teacher's); the decoder presets keep the
# encoder exactly as copied and only change how the decoder reads it, which also lets the trainer
# compute the frozen encoder once per clip and reuse it (`encoder_cache`). Note that the thesis notes
# list every injection point under `decoder.layers.*`; kdlib's `qkv_all`, `qkvo_all` and `ffn` cover
# the encoder too, and the "in encoder" column shows what that adds.

# %%
fig, ax = plt.subplots(figsize=(8, 3.6))
names = list(LORA_PRESETS)
x = np.arange(len(names))
for i, role in enumerate(("teacher", "student")):
    sub = [next(r for r in rows if r["role"] == role and r["preset"] == n) for n in names]
    label = f"{sub[0]['model']} ({role})"
    ax.bar(x - 0.2 + 0.4 * i, [r["trainable_pct"] for r in sub], 0.4, label=label, color=f"C{i}")
    ax.bar(x - 0.2 + 0.4 * i, [100 * r["encoder"] / r["all"] for r in sub], 0.4, color=f"C{i}",
           hatch="//", edgecolor="white", label=f"… of which in the encoder" if i == 1 else None)
ax.set_xticks(x, names)
ax.set_xlabel("LoRA preset")
ax.set_ylabel("trainable parameters (% of all)")
ax.set_title(f"Trainable share per LoRA preset (r = {lora_r})")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "presets.png", dpi=120)

# %% [markdown]
# The hatched part of each bar is the share that lives in the encoder: none for the three decoder
# presets (`dec_self_qv`, `dec_cross_qv`, `decoder_all`), most of it for the others on the student.
#
# The counts grow linearly with r, and at thesis scale the models are larger. The thesis models need
# no download to be counted: a model built on PyTorch's `meta` device has every shape and no weights.
# We build whisper-small and large-v3 from their published configurations and count the same presets
# at r = 32.

# %%
THESIS_SHAPES = {  # published configs: d_model, (encoder, decoder) layers, heads, ffn, vocab, mel bins
    "openai/whisper-small": (768, (12, 12), 12, 3072, 51865, 80),
    "openai/whisper-large-v3": (1280, (32, 32), 20, 5120, 51866, 128),
    "distil-whisper/distil-small.en": (768, (12, 4), 12, 3072, 51864, 80),
}


def meta_whisper(d_model, layers, heads, ffn, vocab, mels):
    cfg = WhisperConfig(d_model=d_model, encoder_layers=layers[0], decoder_layers=layers[1],
                        encoder_attention_heads=heads, decoder_attention_heads=heads,
                        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, vocab_size=vocab, num_mel_bins=mels)
    with torch.device("meta"):  # shapes only: no memory, no weights
        return WhisperForConditionalGeneration(cfg)


def lora_count(model, name, r):
    """r * (d_in + d_out) per adapted linear layer: what peft would add."""
    targets = set(lora_target_modules(model, name))
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules() if n in targets)


thesis_models = {name: meta_whisper(*shape) for name, shape in THESIS_SHAPES.items()}
thesis_rows = []
print(f"r = 32\n| preset | " + " | ".join(f"{n} trainable | %" for n in list(THESIS_SHAPES)[:2]) + " |")
print("|---|---:|---:|---:|---:|")
for name in LORA_PRESETS:
    cells = []
    for model_name in list(THESIS_SHAPES)[:2]:
        meta = thesis_models[model_name]
        n, base = lora_count(meta, name, 32), count_parameters(meta)
        cells.append(f"{n:,} | {100 * n / (base + n):.2f}")
        thesis_rows.append({"model": model_name, "preset": name, "trainable": n, "all": base + n})
    print(f"| `{name}` | " + " | ".join(cells) + " |")
print("base sizes:", {n: f"{count_parameters(m):,}" for n, m in thesis_models.items()})
results["thesis_scale_r32"] = thesis_rows
results["thesis_trainable_r32"] = {r["model"].split("/")[1]: {} for r in thesis_rows}
for r in thesis_rows:
    results["thesis_trainable_r32"][r["model"].split("/")[1]][r["preset"]] = r["trainable"]

# %% [markdown]
# At thesis scale the shares stay small: 0.5–3.1 % of whisper-small, 0.3–2.2 % of large-v3. Adapting
# the 1.5 B-parameter teacher (stage 0) with `qkv_all` at r = 32 trains 23.6<!-- results: thesis_trainable_r32.whisper-large-v3.qkv_all *1e-6 --> M parameters, about a
# tenth of whisper-small's total.
#
# ## What is trainable: adapters and the projector
#
# A distillation run trains one more module: the `RiemannianProjector`, a linear map from the
# student's hidden size to the teacher's followed by L2 normalisation, through which the student's
# hidden states meet the teacher's on the unit sphere (chapter 03). It sits outside the student, so a
# report of the student alone misses it. `trainable_report(model, extra_modules)` counts it in both
# totals.

# %%
projector = RiemannianProjector(d_student, d_teacher)
plain, with_proj = trainable_report(adapted), trainable_report(adapted, [projector])
print("student + LoRA:             ", plain)
print("student + LoRA + projector: ", with_proj)
n_lora, n_proj = count_parameters(adapted, trainable_only=True), count_parameters(projector)
print(f"LoRA {n_lora:,} + projector {n_proj:,} = {n_lora + n_proj:,} trainable "
      f"({d_student} x {d_teacher} + {d_teacher} bias; thesis 768 -> 1280: {768 * 1280 + 1280:,})")
results["trainable"] = {"student_lora": plain, "with_projector": with_proj, "projector": n_proj}

# %% [markdown]
# With equal widths (512 → 512) the projector starts as the identity and costs d² + d parameters,
# which here is eight times the decoder adapters: for a small preset the projector dominates what
# trains. At thesis scale (768 → 1280) it is 984 320 parameters.
#
# The thesis notes quote one report: `trainable params: 15,728,640 || all params: 181,860,864`,
# "LoRA adapters + projection head". The arithmetic says more than the label:

# %%
small = thesis_models["distil-whisper/distil-small.en"]
reported_trainable, reported_all = 15_728_640, 181_860_864
print(f"all - trainable = {reported_all - reported_trainable:,}; distil-small.en has {count_parameters(small):,}")
# Which LoRA set-ups give the trainable count, with or without a 768 -> 1280 projector in it?
# Every combination of presets that adapt disjoint modules, at ranks 1, 2, 4, ..., 512.
targets = {name: set(lora_target_modules(small, name)) for name in LORA_PRESETS}
per_rank = {name: lora_count(small, name, 1) for name in LORA_PRESETS}
combos = [()]
for name in LORA_PRESETS:
    combos += [c + (name,) for c in combos if all(not targets[name] & targets[o] for o in c)]
candidates = {"no projector": reported_trainable,
              "projector with bias": reported_trainable - (768 * 1280 + 1280),
              "projector without bias": reported_trainable - 768 * 1280}
matches = {label: [] for label in candidates}
for combo in combos[1:]:
    for r in (2**k for k in range(10)):
        for label, lora_part in candidates.items():
            if r * sum(per_rank[n] for n in combo) == lora_part:
                matches[label].append(f"{' + '.join(combo)} at r = {r}")
for label, found in matches.items():
    print(f"{label:>23}: LoRA part {candidates[label]:,} <- {found or 'no preset combination'}")
results["thesis_report"] = {"frozen": reported_all - reported_trainable, "matches": matches}

# %% [markdown]
# The frozen part of that report is exactly the size of `distil-whisper/distil-small.en` (12 encoder
# and 4 decoder layers, d_model 768), and the trainable part is exactly what LoRA alone gives on that
# model in a few set-ups (first line: `qkvo_all` or `ffn` at r = 128, or both at r = 64), while no
# combination of presets at a power-of-two rank leaves room for a 768 → 1280 projector. So the
# projector was most likely not in that count, although the notes say it is, and the number alone
# does not say which preset was used. Reports that name the preset, r and every extra module avoid
# that ambiguity; `trainable_report(model, [projector])` counts what the optimizer will really update.
#
# ## The optimizer caveat, measured
#
# The thesis notes warn: "the optimizer still holds state (e.g., AdamW momentum) for the frozen
# parameters". Whether that is true depends on gradients, not on the list given to AdamW. PyTorch's
# AdamW creates its state for a parameter lazily, at the first `step()` where `p.grad` is not `None`:
# two float32 tensors (`exp_avg`, `exp_avg_sq`) the size of the parameter, plus a step counter.
#
# * **A**: plain `AdamW(model.parameters())`, frozen parameters never get a gradient: they sit in the
#   parameter list but hold no state.
# * **B**: the same AdamW, but the frozen parameters carry *zero* gradient tensors. That is what an
#   earlier stage leaves behind when it trained them and cleared gradients with
#   `zero_grad(set_to_none=False)`, and what code that allocates gradients up front does. Now AdamW
#   allocates state for every frozen tensor, the gradients themselves cost memory, and decoupled weight
#   decay (w ← w·(1 − lr·wd)) keeps shrinking weights that were meant to be frozen.
# * **C**: kdlib's `build_optimizer`, same zero gradients on the frozen part: it never sees the frozen
#   parameters, so none of that can happen.
#
# Each setup gets a fresh copy of the student with the `lora_preset` adapters and a projector, and
# takes a few steps on the clip with the loss CE + geodesic(projector(student decoder states),
# teacher decoder states). The teacher runs once, without gradients; where the student's encoder is
# a copy of the teacher's (as for distil-base), the teacher reuses the student's encoder states.

# %%
def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


encoder_trains = any(n.startswith("model.encoder.") for n in lora_target_modules(student_model, lora_preset))
shared_encoder = same_weights(student_model.get_encoder(), teacher_model.get_encoder())
with torch.no_grad():  # a frozen encoder runs once and is reused, as the trainer's encoder_cache does
    student_encoder = student_model.get_encoder()(features).last_hidden_state  # (1, 1500, d_student)
    # distil-base copied the teacher's encoder: then the teacher reuses the student's encoder states
    # (distil-whisper's shortcut) and only its decoder runs
    teacher_inputs = (dict(encoder_outputs=(student_encoder,)) if shared_encoder
                      else dict(input_features=teacher_bundle.features(wave)))
    teacher_out = teacher_model(**teacher_inputs, decoder_input_ids=decoder_input_ids, output_hidden_states=True)
teacher_hidden = teacher_out.decoder_hidden_states[-1]  # (1, tokens, d_teacher), last decoder layer
print(f"teacher decoder states {tuple(teacher_hidden.shape)}; teacher and student share the encoder: "
      f"{shared_encoder}; preset {lora_preset!r} adapts the encoder: {encoder_trains}")


def run_setup(kind: str) -> dict:
    torch.manual_seed(0)
    model = apply_lora(copy.deepcopy(student_model), lora_preset, r=lora_r, alpha=lora_alpha)
    proj = RiemannianProjector(d_student, d_teacher)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if kind in ("B", "C"):
        for p in frozen:
            p.grad = torch.zeros_like(p)  # what zero_grad(set_to_none=False) leaves after a full stage
    if kind == "C":
        optimizer = build_optimizer([model, proj], lr=lr, weight_decay=weight_decay)
    else:
        everything = list(model.parameters()) + list(proj.parameters())
        optimizer = torch.optim.AdamW(everything, lr=lr, weight_decay=weight_decay)
    watch = model.base_model.model.model.decoder.layers[0].fc1.weight  # a frozen weight
    before = watch.detach().clone()
    losses, step_s = [], []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=False)
        inputs = dict(input_features=features) if encoder_trains else dict(encoder_outputs=(student_encoder,))
        out_s = model(**inputs, decoder_input_ids=decoder_input_ids, output_hidden_states=True)
        loss = cross_entropy(out_s.logits, labels) + geodesic(proj(out_s.decoder_hidden_states[-1]), teacher_hidden)
        loss.backward()
        t0 = time.perf_counter()
        optimizer.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {
        "setup": kind, "model": model, "projector": proj,
        "tensors_in_optimizer": len(params), "tensors_with_state": len(optimizer.state),
        "state_bytes": optimizer_state_bytes(optimizer),
        "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in
                          list(model.parameters()) + list(proj.parameters()) if p.grad is not None),
        "frozen_rel_change": ((watch.detach() - before).abs().max() / before.abs().max()).item(),
        "losses": losses, "step_s": float(np.median(step_s)),
    }


setups = {}
for kind in ("A", "B", "C"):
    setups[kind] = run_setup(kind)
    if kind != "C":  # keep C's adapted model for merging; free the others
        setups[kind].pop("model")
print(f"{'setup':<34} {'tensors':>8} {'w/ state':>9} {'state MB':>10} {'grads MB':>10} "
      f"{'frozen Δ (rel)':>15} {'step s':>7}  losses")
labels_setup = {"A": "A plain AdamW, frozen grads None", "B": "B plain AdamW, frozen grads zero",
                "C": "C build_optimizer, frozen grads 0"}
for kind, s in setups.items():
    print(f"{labels_setup[kind]:<34} {s['tensors_in_optimizer']:>8} {s['tensors_with_state']:>9} "
          f"{s['state_bytes'] / MB:10.2f} {s['grad_bytes'] / MB:10.2f} {s['frozen_rel_change']:15.2e} "
          f"{s['step_s']:7.3f}  " + ", ".join(f"{x:.3f}" for x in s["losses"]))
print(f"weight decay alone predicts a relative change of {1 - (1 - lr * weight_decay) ** steps:.2e} after {steps} steps")
results["optimizer"] = {k: {key: v for key, v in s.items() if key not in ("model", "projector")}
                        for k, s in setups.items()}

# %% [markdown]
# The table answers the thesis note precisely. In **A** the frozen tensors are in the optimizer's list
# (more tensors than in C) but only the adapters and the projector have state: a parameter that never
# gets a gradient costs AdamW nothing. In **B** every tensor has state: 2 × 4 bytes per parameter
# (428 MiB for distil-base; it would be 1.9 GB for whisper-small and 12 GB for large-v3), plus the
# zero gradients themselves (another 4 bytes per parameter), and the optimizer step now walks over
# the whole model: on this CPU its step takes far longer than A's and C's, which touch only the
# adapters (the step column; timings are noisy when other jobs share the CPU). The watched frozen
# weight moved by exactly
# the weight-decay prediction: "frozen" weights are slowly shrinking. In **C** the state and the
# losses are the same as in A and the frozen weight is bit-for-bit unchanged, although the zero
# gradients are still there: `build_optimizer` takes only parameters with `requires_grad`, so the
# frozen part cannot enter the optimizer whatever the training loop does with gradients.
#
# B is also worse than the note's "stale" state: if the frozen parameters were trained in an earlier
# stage *with the same optimizer*, their `exp_avg` is not zero, and a zero gradient still gives a
# nonzero Adam update, so the "frozen" weights keep moving for a while (exercise 2). kdlib's trainer
# runs each stage as its own run with a new optimizer from `build_optimizer`, and clears gradients
# with `zero_grad(set_to_none=True)`.

# %%
fig, ax = plt.subplots(figsize=(8.5, 3.8))
x = np.arange(3)
state = [setups[k]["state_bytes"] / MB for k in "ABC"]
grads = [setups[k]["grad_bytes"] / MB for k in "ABC"]
ax.bar(x - 0.2, state, 0.4, label="AdamW state (exp_avg, exp_avg_sq, step)")
ax.bar(x + 0.2, grads, 0.4, label="gradient tensors")
for xi, v in zip(x - 0.2, state):
    ax.annotate(f"{v:.2f}", (xi, v), ha="center", va="bottom", fontsize=8)
for xi, v in zip(x + 0.2, grads):
    ax.annotate(f"{v:.2f}", (xi, v), ha="center", va="bottom", fontsize=8)
ax.set_yscale("log")
ax.set_ylim(top=4 * max(state + grads))
ax.set_xticks(x, ["A: AdamW, frozen\ngrads None", "B: AdamW, frozen\ngrads zero", "C: build_optimizer,\nfrozen grads zero"])
ax.set_xlabel("optimizer set-up")
ax.set_ylabel("memory (MiB, log scale)")
ax.set_title(f"Optimizer memory after {steps} steps\n{student_bundle.name} + LoRA ({lora_preset}) + projector")
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
fig.savefig(out / "optimizer_state.png", dpi=120)

# %% [markdown]
# Note the log scale: B holds about 190 times the optimizer state of A and C. The gradient bar of C
# is as high as B's only because this experiment planted the zero gradients on purpose; in a kdlib
# run they are `None`.
#
# ## Merging an adapter back
#
# After training, an adapter can be kept separately (here about a hundred kilobytes, tens of
# megabytes at thesis scale; peft loads it onto the base model) or merged: `merge_and_unload()` adds (α/r)·B A into each W and removes the adapter
# modules, giving back a plain `WhisperForConditionalGeneration` of exactly the base size that runs
# as fast as the base model and that any Whisper tool can load (CTranslate2 conversion included). We
# take the adapter that setup C trained, save it, merge it, and compare the outputs on the clip.

# %%
trained = setups["C"]["model"]
trained.eval()
adapter_dir = out / "adapter"
trained.save_pretrained(adapter_dir)
adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir())
# the same input for all three; with a decoder-only preset the (unchanged) encoder output is reused
inputs = dict(decoder_input_ids=decoder_input_ids, **(
    dict(input_features=features) if encoder_trains else dict(encoder_outputs=(student_encoder,))))
with torch.no_grad():
    base_logits = student_model(**inputs).logits  # (1, tokens, vocab)
    adapted_logits = trained(**inputs).logits
    merged = trained.merge_and_unload()
    merged_logits = merged(**inputs).logits
merge_err = (merged_logits - adapted_logits).abs().max().item()
adapter_effect = (adapted_logits - base_logits).abs().max().item()
same_argmax = (merged_logits.argmax(-1) == adapted_logits.argmax(-1)).float().mean().item()
print(f"adapter on disk: {adapter_bytes / 1024:.0f} KiB in {sorted(p.name for p in adapter_dir.iterdir())}; "
      f"the whole student in float32: {count_parameters(student_model) * 4 / MB:.0f} MiB")
print(f"adapted vs base logits: max |Δ| = {adapter_effect:.3e} (what {steps} steps changed)")
print(f"merged vs adapted logits: max |Δ| = {merge_err:.3e}; same argmax token at {100 * same_argmax:.0f} % of positions")
print(f"merged: {type(merged).__name__}, {count_parameters(merged):,} params; base {count_parameters(student_model):,}; "
      f"LoRA modules left: {sum('lora_' in n for n, _ in merged.named_parameters())}")
assert torch.allclose(merged_logits, adapted_logits, atol=1e-4, rtol=1e-4), "merged model differs from the adapted one"
assert count_parameters(merged) == count_parameters(student_model), "merged model is not the base size"
results["merge"] = {"adapter_bytes": adapter_bytes, "adapted_vs_base_max_abs": adapter_effect,
                    "merged_vs_adapted_max_abs": merge_err, "same_argmax": same_argmax,
                    "merged_params": count_parameters(merged)}
(out / "results.json").write_text(json.dumps(results, indent=2, default=float))
print("wrote", sorted(p.name for p in out.iterdir()))

# %% [markdown]
# The adapter changed the logits (second line: 3 steps at this learning rate move them by several
# units), and the merged model reproduces the adapted one to float32 rounding (differences of order
# 10⁻⁵ on logits of order 10), with the same argmax token everywhere. The merged model has the
# base model's parameter count and no LoRA module left. Two cautions: merging into a float16 or
# quantised base adds that format's rounding to W + ΔW, and a merged adapter cannot be switched off
# again, so keep the saved adapter next to the merged model.
#
# ## Summary
#
# * LoRA trains h = W x + (α/r)·B A x with B = 0 at start: r·(d_in + d_out) numbers per adapted matrix
#   instead of d_in·d_out, and the adapted model starts as the pretrained one.
# * `kdlib`'s presets: `dec_self_qv`, `dec_cross_qv` and `decoder_all` stay in the decoder; `qkv_all`, `qkvo_all` and
#   `ffn` reach into the encoder (on the student, most of their parameters sit there). At r = 8 every
#   preset trains under 1 % of whisper-base or distil-base; at thesis scale (r = 32) 0.3–3.1 %.
# * What trains is adapters *plus* the projector; `trainable_report(model, [projector])` counts both in
#   peft's format. The report quoted in the thesis notes most likely left the projector out.
# * AdamW allocates state only for parameters that receive a gradient. Frozen parameters with `None`
#   gradients cost nothing; with zero gradient tensors they cost 8 bytes of state + 4 of gradient per
#   parameter and are shrunk by weight decay. `build_optimizer` takes trainable parameters only, so
#   neither can happen.
# * `merge_and_unload()` folds the adapter into W: same outputs (to float32 rounding), base size, a plain
#   Whisper model for deployment.
#
# ## Exercises
#
# 1. Run the preset table with `lora_r = 32` and check that every count is 4 × the r = 8 one. At which
#    r does `qkvo_all` train as many parameters as full fine-tuning of the adapted matrices?
# 2. Make the thesis note's "stale state" real: train the student fully for one step with a plain AdamW,
#    then freeze the base, add adapters, keep the *same* optimizer and clear gradients with
#    `zero_grad(set_to_none=False)`. How far do the frozen weights move in the next 10 steps, and why
#    (look at `exp_avg`)?
# 3. Set `lora_preset = "qkv_all"` (the config's default). How do the optimizer state of setup C and the
#    time per step change now that the encoder's adapters train and the encoder can no longer be run
#    once and reused?
