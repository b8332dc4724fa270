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
# # 08 · Evaluation: WER, CER, speed and memory, teacher against students
#
# Every earlier chapter printed a dev WER in passing. This chapter is the measurement itself,
# done once and the same way for every model: the same clips, the same decoding (greedy,
# language and task tokens forced, KV cache on), the same text normaliser, the same clock.
#
# ## What this chapter teaches
#
# 1. how text is **normalised** before it is scored, and why the normaliser must be named next to
#    every WER;
# 2. what **WER** and **CER** count (substitutions, deletions, insertions), per utterance, per
#    voice and over the corpus;
# 3. the **real-time factor** (RTF) and **peak memory**, and the deployment reference: the
#    teacher in the CTranslate2 engine (the engine of faster-whisper), float32 and int8;
# 4. what happens to **bad input** (an empty reference, an empty hypothesis).
#
# The models, one row each: the teacher (whisper-base), the teacher adapted to the domain
# (stage 0), the student before KD (whisper-base cut to a 10 s encoder window, chapter 02), the
# student fine-tuned with CE only, the student after KD (stage I) and after all
# three stages.
#
# ## What it needs
#
# The trained models as run folders, one parameter each: chapter 05's `stage0`, `ce_only` and
# `stage1`, chapter 07's `stage3` (`scripts/build_book.py` passes the book's own runs). A run
# left at `None`, missing, or trained with another `preset` is trained here first, under
# `out_dir`, the way chapters 05-07 train it. The offline whisper-base (the
# `offline-whisper` extra) and `ctranslate2`. **Writes** `out_dir/comparison.{json,csv,md,png}`,
# the per-voice table and one `metrics_<split>_<model>.json` per row. With `preset = "smoke"` (or
# `"thesis-tiny"`, the thesis pair's shapes) the models are a tiny random pair and 3 clips: the
# numbers then mean nothing, the prose describes the demo.

# %% tags=["parameters"]
preset = "demo"  # "smoke": tiny random pair, 3 clips, seconds; "demo": whisper-base on CPU, minutes; "thesis"
split = "dev"  # embedded corpus split (20 clips); thesis: "test"
limit = None  # None: all clips of the split (demo: 20); thesis: None, all 1262 test clips
max_new_tokens = 64  # greedy decoding cap (embedded clips need < 50 tokens); thesis: 224
stage0_run = None  # adapted teacher (chapter 05's stage0/); None: trained here; thesis: chapter 05's
ce_only_run = None  # student fine-tuned with CE only (chapter 05's ce_only/); None: trained here
stage1_run = None  # student after KD (chapter 05's stage1/); None: trained here; thesis: chapter 05's
stage3_run = None  # student after stages I-III (chapter 07's stage3/); None: trained here; thesis: chapter 07's
out_dir = "../runs/08_evaluation"  # figures, tables and runs of this chapter; thesis: the same

# %%
import gc
import json
import re
import time
from pathlib import Path

import jiwer
import matplotlib.pyplot as plt
import numpy as np
import torch

from kdlib import ct2, decode, evaluate
from kdlib.config import make_config
from kdlib.data import embedded_corpus, load_audio, read_speakers
from kdlib.files import shown
from kdlib.models import TINY_RANDOM, load_whisper, tiny_random_named
from kdlib.runs import finished_run, untrained_student
from kdlib.train import run_stage

chapter_start = time.perf_counter()
config = make_config(preset, stage=1)
tiny = config.teacher in TINY_RANDOM  # smoke, thesis-tiny: the preset's tiny random pair
if tiny:
    limit, max_new_tokens = 3, 8
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
print(f"preset {preset}, split {split}, limit {limit}, max_new_tokens {max_new_tokens}, "
      f"torch threads {torch.get_num_threads()}")

# %% [markdown]
# Every model decodes with `torch.get_num_threads()` threads (two on the book's CPU), and the
# CTranslate2 engine gets the same number, so their speeds are comparable.
#
# ## Text normalisation: what is compared
#
# A WER compares words, so both sides first pass through the same normaliser. For every
# language but English, Whisper's authors use the **basic** normaliser (`decode.basic_normalize`):
# lower-case, spans in `[...]`, `<...>` and `(...)` dropped, punctuation and symbols turned into
# spaces, whitespace collapsed; accents are kept. Three examples:

# %%
examples = [
    "L'Università è CHIUSA, oggi!",  # case, apostrophe, comma, exclamation mark
    "[musica] Che cosa ne pensi?",  # a bracketed annotation is not speech
    "perche\u0301 no",  # "perché" typed as e + combining accent (two code points)
]
for text in examples:
    print(f"{text!r:36} -> {decode.basic_normalize(text)!r}")
print("'perché' typed two ways, same after normalisation:",
      decode.basic_normalize("perche\u0301") == decode.basic_normalize("perché"))
ref, hyp = "L'acqua è fredda.", "l'acqua è fredda"
print(f"WER of {hyp!r} against {ref!r}: raw {decode.wer_cer([ref], [hyp], normalize=False)['wer']:.2f}, "
      f"normalised {decode.wer_cer([ref], [hyp])['wer']:.2f}")

# %% [markdown]
# Case and punctuation are not errors after normalisation; the apostrophe becomes a space on
# both sides ("l acqua"), and an accent typed two ways is one letter. Without the normaliser the
# same correct transcript scores a WER of 2/3 (two of three words differ in case or
# punctuation). Accents still count: "perche" for "perché" is a substitution. Whisper's
# *English* normaliser would also spell numbers and rewrite English spellings, which is wrong for
# Italian; distil-whisper's users could not reproduce its multilingual numbers until they
# switched to the basic one. So every WER below says `normalizer: whisper-basic`.
#
# ## The clips

# %%
data_root = embedded_corpus(config.language)
utterances, scan_skipped = evaluate.load_utterances(data_root, split, limit=limit)
clips = [evaluate.EvalUtterance(u.id, u.text, u.speaker, u.path, load_audio(u.path, 16_000).numpy())
         for u in utterances]
voices = read_speakers(data_root)
audio_seconds = sum(len(c.audio) for c in clips) / 16_000
print(f"{len(clips)} clips of {data_root.name}/{split}, {audio_seconds:.1f} s of audio, "
      f"{len({c.speaker for c in clips})} voices; skipped by the scan: "
      f"{ {k: len(v) for k, v in scan_skipped.items()} or 'none'}")

# %% [markdown]
# The audio is read and resampled once; every model below sees these very waveforms. Reading
# files is not part of any model's timing.
#
# ## The models
#
# A run given as a parameter is used only if its folder holds `adapter_final/` and was trained
# with this chapter's preset (`training_config.json`): a demo table must not mix in a thesis run,
# or the other way round. Any other run is trained here, the way chapters 05-07 train it
# (`run_stage` reuses a finished run of the same config, so a second execution trains nothing).
# The scores come from `evaluate.dev_scores`, told to decode (this chapter times every model):
# `load_trained` rebuilds the base model and merges the LoRA adapter into plain weights, so a
# trained student decodes exactly as fast as an untrained one.

# %%
given = {"stage0": stage0_run, "ce_only": ce_only_run, "stage1": stage1_run, "stage3": stage3_run}


def run_for(key: str) -> Path:
    """The run folder of ``key``: the parameter's, if it is a finished run of this preset, else
    trained here (stage 0 → I → II → III, as chapters 05-07 do)."""
    if given[key] is not None and finished_run(given[key], preset):
        return Path(given[key])
    if given[key] is not None:
        print(f"{given[key]}: missing or trained with another preset; training {key} here")

    def train_here(name, stage, **fields):
        run_stage(make_config(preset, stage=stage, overrides=fields), out / name, progress=False)
        return out / name

    if key == "stage0":
        return train_here("stage0", 0)
    if key == "ce_only":
        return train_here("ce_only", 1, kl_weight=0.0)
    teacher = str(run_for("stage0"))
    if key == "stage1":
        return train_here("stage1", 1, teacher_from=teacher)
    stage2 = train_here("stage2", 2, teacher_from=teacher, init_from=str(run_for("stage1")))
    return train_here("stage3", 3, teacher_from=teacher, init_from=str(stage2))


RUNS = [(name, run_for(key)) for name, key in (
    ("teacher, adapted (stage 0)", "stage0"), ("student, CE only", "ce_only"),
    ("student, KD (stage I)", "stage1"), ("student, stages I+II+III", "stage3"))]
for name, run in RUNS:
    print(f"{name:<28} {shown(run)}")

# %% [markdown]
# Every trained row has its run folder now, given or trained here.
#
# ## Decoding and scoring every model
#
# One model is loaded, decoded, scored and freed before the next, so the process holds one model
# at a time. `evaluate.evaluate_model` times only the decoding (features, `generate`,
# detokenisation) and samples the process' resident memory every 5 ms meanwhile.

# %%
def score(name, source):
    """Decode and score the clips with ``source`` (a run folder, or a function that loads a
    model), then free the model."""
    t0 = time.perf_counter()
    if callable(source):
        model, tokenizer, feature_extractor = source()[:3]
        source = (model, feature_extractor, tokenizer)
    metrics = evaluate.dev_scores(
        source, config, name=name, reuse_summary=False, utterances=clips, data_root=data_root, split=split,
        max_new_tokens=max_new_tokens, reuse_encoder_states=False, limit=None)
    metrics["status"] = "measured"
    del source
    gc.collect()
    print(f"{name:<30} WER {metrics['wer']:.3f}  CER {metrics['cer']:.3f}  RTF {metrics['rtf']:.3f}  "
          f"({time.perf_counter() - t0:.0f} s with loading)")
    return metrics


def load_teacher():
    bundle = tiny_random_named(config.teacher)[0] if tiny else load_whisper(config.teacher)
    return bundle.model, bundle.tokenizer, bundle.feature_extractor


rows = [score(f"teacher ({config.teacher})", load_teacher)]
rows.append(score(*RUNS[0]))  # the adapted teacher
rows.append(score("student, before KD", lambda: untrained_student(config)))
rows += [score(name, run) for name, run in RUNS[1:]]
n_teacher_parameters = rows[0]["n_parameters"]

# %% [markdown]
# Each line is one model on the same clips: its corpus WER and CER, its real-time factor and the
# seconds it took to load and decode. The students read a 10 s window (500 encoder frames
# instead of 1500), which is where their speed comes from: the encoder is most of a
# transcription's time on a CPU. Decoding time also grows with the tokens generated, so a student
# that loops (repeats words up to the token cap) loses that advantage: compare the RTF column with
# the insertion rate.
#
# ## The deployment reference: CTranslate2
#
# A user who deploys whisper-base on a CPU would run it in CTranslate2, not in transformers. We
# decode the same clips with the original whisper-base weights in that engine, in float32 and
# with int8 weights, and put both rows in the table; its parameter count is the teacher's. (At
# smoke size this is skipped: the tiny random models have no CTranslate2 counterpart.)

# %%
if tiny:
    print(f"{preset} preset: CTranslate2 rows skipped (tiny random models)")
else:
    ct2_dir = ct2.offline_ct2_dir(config.teacher)
    for compute_type in ("float32", "int8"):
        t0 = time.perf_counter()
        metrics = evaluate.evaluate_ct2(
            ct2_dir, clips, data_root=data_root, split=split, language=config.language,
            compute_type=compute_type, max_new_tokens=max_new_tokens,
            name=f"teacher, CTranslate2 {compute_type}", n_parameters=n_teacher_parameters,
            progress=False)
        metrics["status"] = "measured"
        rows.append(metrics)
        print(f"{metrics['name']:<30} WER {metrics['wer']:.3f}  CER {metrics['cer']:.3f}  "
              f"RTF {metrics['rtf']:.3f}  ({time.perf_counter() - t0:.0f} s)")

# %% [markdown]
# Same weights, same greedy search: the float32 row's WER should equal the transformers
# teacher's (tiny differences would come from the numerics). Its RTF need not be lower: on this
# CPU the float32 engine decodes whisper-base at about the transformers teacher's speed, so the
# engine alone buys little here, and the int8 row is where it gains. The
# facts page measured this engine at an RTF of about 0.33<!-- cited --> on this 2-core CPU when the machine
# was otherwise idle; when other jobs share the cores every row's RTF grows together, so compare
# rows of one run, never numbers from different runs. int8 stores the weights in 8 bits: a
# quarter of the memory traffic, faster on a CPU, at a small cost in accuracy that the WER
# column shows.
#
# ## The comparison table

# %%
columns = ("name", "status", *evaluate.COMPARISON_COLUMNS[1:])
paths = evaluate.write_comparison(rows, out, columns=columns)
for row in rows:
    if row["status"] == "measured":
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", row["name"]).strip("_")
        evaluate.write_metrics(out, f"{split}_{safe}", row)
show = ("name", "status", "engine", "compute_type", "wer", "cer", "rtf", "n_parameters",
        "peak_memory_mb", "peak_memory_delta_mb", "n_utterances", "n_skipped")
print(f"{data_root.name}/{split}, {len(clips)} clips, greedy, text normaliser: {decode.NORMALIZER}\n")
print(evaluate.markdown_table(rows, show))
print("written:", ", ".join(shown(p) for p in paths.values()))
# results.json: the measured rows by key (what the prose's markers name), and how many clips.
row_keys = ["teacher", "teacher_adapted", "student_untrained", "ce_only", "stage1", "stage3"]
results = {"preset": preset, "split": split, "clips": len(clips), "rows": {}}
for i, row in enumerate(r for r in rows if r["status"] == "measured"):
    key = row_keys[i] if i < len(row_keys) else re.sub(r"[^A-Za-z0-9_-]+", "_", row["name"]).strip("_")
    results["rows"][key] = {k: row.get(k) for k in ("name", "wer", "cer", "rtf", "n_parameters", "n_utterances", "n_skipped")}
(out / "results.json").write_text(json.dumps(results, indent=2))

# %% [markdown]
# The table is saved as JSON and CSV (raw values: rates as fractions, parameters as counts,
# memory in MiB) and as markdown (WER/CER in %, parameters in millions). How to read it:
#
# - **WER / CER**: corpus-level, (S + D + I) / N over all words (characters) of all scored clips,
#   after the basic normaliser. CER is the gentler measure: a word with one wrong letter is a
#   whole word error but one character error.
# - **RTF**: see below. **Parameters**: distinct weights of the model (tied embeddings once).
# - **Peak memory**: the highest resident set size of this whole process while the model decoded
#   (weights, activations, Python and libraries included), sampled every 5 ms; "memory added by
#   decoding" is that peak minus the size before decoding started (activations and KV cache).
#   Earlier models are freed before the next loads, but an allocator does not always give memory
#   back, so compare the added column, or run one model per process for absolute numbers.
#
# ## The figure

# %%
measured = [r for r in rows if r["status"] == "measured"]
fig = evaluate.plot_comparison(rows, out / "comparison.png",
                               title=f"{len(measured)} models on {data_root.name}/{split} ({len(clips)} clips, greedy)")
plt.show()

# %% [markdown]
# The students keep every layer of the teacher and drop only the encoder position rows beyond
# their 10 s window (72.1<!-- results: rows.stage3.n_parameters *1e-6 --> M parameters against the teacher's 72.6<!-- results: rows.teacher.n_parameters *1e-6 --> M). Their speed comes
# from the encoder reading 500 frames instead of 1500: the encoder is most of the decoding time
# (chapter 02 and the facts page: about 76 % for whisper-base), so cutting decoder layers alone
# would give at most about 1.3x. On a CPU, speed comes from the encoder side (fewer frames or
# layers), or from the engine: the CTranslate2 bars.
#
# ## The real-time factor
#
# $$\mathrm{RTF} = \frac{\text{wall-clock seconds spent decoding}}{\text{seconds of audio decoded}}$$
#
# An RTF below 1 is faster than real time; 1/RTF says how many seconds of speech one second of
# compute transcribes. It depends on the machine, the threads, the batch size, the clip lengths
# (every Whisper clip is padded to 30 s, so short clips are expensive per second of audio) and
# the number of generated tokens, which is why every row here is measured on the same clips with
# the same settings.

# %%
for row in measured:
    print(f"{row['name']:<30} {row['decode_seconds']:6.1f} s decoding / {row['audio_seconds']:5.1f} s audio"
          f" = RTF {row['rtf']:.3f}  ({1 / row['rtf']:.1f}x real time)")

# %% [markdown]
# Same audio seconds in every line; only the decoding time differs.
#
# ## Errors up close: two clips
#
# A corpus WER hides which words go wrong. Below, the teacher and the most trained student we
# have, on the clip the teacher gets most right and the one it gets most wrong. The alignment
# marks each word: S substitution, D deletion (a reference word missing from the hypothesis),
# I insertion (a word that was not said).

# %%
teacher_row = measured[0]
students = [r for r in measured if r["name"].startswith("student")]
final_row = students[-1]  # the last trained stage that exists (the untrained student at worst)
by_id = {name: {u["id"]: u for u in r["per_utterance"]} for name, r in
         (("teacher", teacher_row), ("student", final_row))}
ranked = sorted(teacher_row["per_utterance"], key=lambda u: (u["wer"], u["id"]))
picked = [ranked[0]["id"], ranked[-1]["id"]] if len(ranked) > 1 else [ranked[0]["id"]]
print(f"teacher = {teacher_row['name']}; student = {final_row['name']}\n")
for uid in picked:
    t, s = by_id["teacher"][uid], by_id["student"][uid]
    print(f"--- clip {uid} (voice {voices.get(t['speaker'], '?')}), reference: {t['ref']!r}")
    for who, u in (("teacher", t), ("student", s)):
        print(f"{who}: WER {u['wer']:.2f} (S {u['substitutions']}, D {u['deletions']}, "
              f"I {u['insertions']} of {u['n_words']} words)")
        alignment = jiwer.process_words(u["ref_norm"], u["hyp_norm"])
        print(jiwer.visualize_alignment(alignment, show_measures=False, skip_correct=False)
              .split("\n", 2)[2].rstrip())
    print()

# %% [markdown]
# REF and HYP are the normalised texts, aligned word by word. On the synthetic voices the
# teacher's errors are mostly substitutions of similar-sounding words (and split or merged
# words: one reference word heard as two is a substitution plus an insertion), which is what a
# weak acoustic match looks like. A student that outputs nothing shows a row of deletions (chapter
# 11's untrained four-layer student, for one); one that loops on words shows long runs of insertions.
#
# ## WER per voice
#
# The embedded corpus has one espeak-ng voice per speaker. The facts page measured the teacher
# from about 0.5<!-- cited --> WER (default voice) to 0.9<!-- cited --> (`+f4`): a single corpus WER averages over very
# different difficulties, so we report it per voice, for the teacher and the final student.

# %%
per_voice = evaluate.per_speaker_table([teacher_row, final_row])
names = [teacher_row["name"], final_row["name"]]
print(f"{'speaker':<9}{'voice':<8}" + "".join(f"{n[:28]:>30}" for n in names))
for r in per_voice:
    print(f"{r['speaker']:<9}{r['voice'] or '?':<8}" + "".join(
        f"{(100 * r[n] if r[n] is not None else float('nan')):>29.1f}%" for n in names))

fig, ax = plt.subplots(figsize=(8, 3.6))
x = np.arange(len(per_voice))
for i, n in enumerate(names):
    values = [100 * r[n] if r[n] is not None else 0.0 for r in per_voice]
    ax.bar(x + (i - 0.5) * 0.4, values, width=0.4, label=n)
ax.set_xticks(x)
ax.set_xticklabels([f"{r['speaker']}\n{r['voice'] or '?'}" for r in per_voice])
ax.set(title=f"WER per voice, {data_root.name}/{split} (Whisper basic normaliser, greedy)",
       xlabel="speaker and espeak-ng voice", ylabel="WER (%)")
ax.legend()
fig.tight_layout()
fig.savefig(out / "wer_per_voice.png", dpi=120)
plt.show()

# %% [markdown]
# With 20 dev clips each voice has only three or four clips (25 to 45 words), so one word moves a
# voice's WER by 2 to 4 points; read the pattern (which voices are hard for both models), not the decimals.
# If the student is better than the teacher on every voice, training adapted it to the
# synthetic domain; if it is better only on the voices the teacher already handles, it learned
# the teacher's strengths and weaknesses together. The full table for all models is in
# `comparison_per_speaker.csv`.
#
# ## Bad input: skipped and counted, never divided by zero
#
# In a long evaluation some transcripts are empty (a bad line in a file) and some models
# output nothing. A made-up example with both:

# %%
bad = decode.wer_cer(
    references=["il gatto dorme sul divano", "", "...!?", "buongiorno a tutti"],
    hypotheses=["il gatto dorme sul divano", "qualcosa", "ciao", ""],
    ids=["ok", "empty_ref", "punctuation_only_ref", "empty_hyp"],
)
print(f"scored {bad['n_utterances']}, skipped {bad['n_skipped']}: {bad['skip_reasons']}")
for u in bad["per_utterance"]:
    print(f"  {u['id']:<10} WER {u['wer']:.2f}  S {u['substitutions']} D {u['deletions']} I {u['insertions']}")
print(f"corpus WER {bad['wer']:.3f} = (S+D+I) {bad['substitutions'] + bad['deletions'] + bad['insertions']}"
      f" / N {bad['n_words']} reference words")
print("all references empty:", decode.wer_cer([""], ["qualcosa"])["wer"])

# %% [markdown]
# A reference that is empty after normalisation (the empty line, and "...!?" which is only
# punctuation) has no words to divide by: the clip is skipped and counted with its reason, and
# every metrics file carries `n_skipped` and `skip_reasons`. An empty hypothesis is scored: all
# three reference words are deletions, WER 1 for that clip, and the corpus WER is 3 errors over
# 8 words. When nothing can be scored the rate is `None`, not a crash and not a zero. Clips
# that cannot be read, or are longer than Whisper's 30 s window, are skipped and counted the
# same way by `evaluate_model`.

# %%
print(f"chapter wall time: {time.perf_counter() - chapter_start:.0f} s")

# %% [markdown]
# ## Summary
#
# - Every WER here is computed after Whisper's **basic** normaliser (lower-case, punctuation and
#   bracketed spans removed, accents kept); say so next to any WER you report.
# - WER and CER are corpus-level (S + D + I) / N; per-utterance and per-voice views show where the
#   errors are. An empty reference is skipped and counted, an empty hypothesis is all deletions.
# - RTF = decode seconds / audio seconds on one fixed machine and setting; CTranslate2 (float32
#   and int8) is the deployment reference for the teacher.
# - The demo students keep every layer of whisper-base and read a 10 s window: hardly smaller, but
#   more than twice as fast (compare the RTF column), because the encoder dominates a
#   transcription's time on a CPU; cutting decoder layers alone would barely change the RTF.
#   The comparison table, figure and per-voice table are in `out_dir`.
#
# ## Exercises
#
# 1. Rerun with `split = "test"` (the split nobody tuned on). Do the rows keep their order?
# 2. Score the teacher with `normalize=False` (`decode.wer_cer` on its `per_utterance` refs and
#    hyps). How much of its WER was case and punctuation?
# 3. Evaluate the teacher with beam search (`evaluate.evaluate_model(..., num_beams=5)`): what do
#    WER and RTF do? The facts page measured beam 5 lowering the mixed-voice WER from 0.65<!-- cited --> to 0.57<!-- cited -->.
