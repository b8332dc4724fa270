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
# # 01 · The data loader
#
# Before a teacher can teach anything, speech has to reach it as Whisper expects: 16 kHz mono
# audio, turned into a log-mel spectrogram of exactly 3000 frames (30 s), and a transcript turned
# into tokens that start with the language and task.
#
# ## What this chapter teaches
#
# How one clip travels through the five stages of `kdlib.data`:
#
# 1. **scan files**: read a Multilingual LibriSpeech (MLS) folder, check every line and every
#    audio header, skip and *count* what is broken;
# 2. **pairs**: audio-text records with speaker, duration and language;
# 3. **Dataset**: decode, resample, log-mel features and token labels, one item at a time;
# 4. **DataLoader**: where padding happens, and how grouping clips by length cuts it;
# 5. **batches**: the tensors a training step receives, also for a mixed Italian + Spanish batch.
#
# ## What it needs
#
# No earlier chapter's output. By default it reads the small corpus shipped inside `kdlib`
# (Italian and Spanish sentences spoken by espeak-ng with several voices; see
# `scripts/make_corpus.py`). At thesis scale, set `data_root` to a real MLS language folder, e.g.
# one extracted with `kdlib.data.extract_mls_archive` (end of the chapter).

# %% tags=["parameters"]
preset = "demo"  # "smoke": a few clips, seconds; "demo": the whole embedded corpus, < 2 min on CPU
data_root = None  # None: embedded corpus; thesis: "/data/mls/mls_italian_opus"
language = "italian"  # thesis: "italian"
second_language = "spanish"  # for the mixed batch; thesis: "spanish" (data_root of it: see below)
second_root = None  # None: embedded corpus; thesis: "/data/mls/mls_spanish_opus"
batch_size = 8  # thesis: 64
bucket_factor = 50  # megabatch size in batches; thesis: 50
min_duration = 1.0  # seconds; thesis: 1.0
max_duration = 30.0  # seconds; thesis: 30.0
num_workers = 0  # DataLoader worker processes; thesis: 8 (one per CPU core you can spare)
out_dir = "../runs/01_data_loader"  # figures, tables and runs of this chapter; thesis: the same

# %%
import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import WhisperFeatureExtractor

from kdlib import data
from kdlib.files import shown
from kdlib.models import real_tokenizer

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
smoke = preset == "smoke"
root = Path(data_root) if data_root else data.embedded_corpus(language)
code = data.language_code(language)
results = {"preset": preset, "root": str(root), "language": code}
print(f"reading {shown(root)}  (language {language} -> Whisper code <|{code}|>)")

# %% [markdown]
# ## 1 · Scan the files
#
# An MLS language folder has one folder per split. Each holds `transcripts.txt`, one line per
# utterance, `<speaker>_<book>_<utterance><TAB><text>`, and the audio at
# `audio/<speaker>/<book>/<id>.opus`. `scan_mls` reads the lines, finds the files, and reads only
# each file's *header* (`soundfile.info`) to get its duration: cheap enough for the 135,000 files
# of it+pt+pl.

# %%
scans = {split: data.scan_mls(root, split, min_duration=min_duration, max_duration=max_duration,
                              language=code) for split in ("train", "dev", "test")}
for split, result in scans.items():
    print(f"[{split}] {result.report()}")
results["kept"] = {split: r.n_kept for split, r in scans.items()}

# %% [markdown]
# Every split of the embedded corpus is clean: all lines kept. Real data is not. In a long run a
# broken file must not crash the job halfway, and it must not disappear silently either. So the
# scan *skips and counts* each problem by reason, with a message that names the file and the
# line. Let us break a small copy of the dev split on purpose: copy twelve clips, damage two audio files,
# delete one, add an audio file that has no transcript line, blank one transcript and add a malformed line.

# %%
broken = out / "broken_copy" / root.name
if broken.exists():
    shutil.rmtree(broken)
for u in scans["dev"].utterances[:12]:   # a 12-clip copy of dev, same layout
    target = broken / u.audio.relative_to(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(u.audio, target)
(broken / "dev" / "transcripts.txt").write_text(
    "".join(f"{u.id}\t{u.text}\n" for u in scans["dev"].utterances[:12]), encoding="utf-8")
dev_utts = data.scan_mls(broken, "dev", language=code).utterances
dev_utts[0].audio.write_bytes(b"OggS" + bytes(200))                       # corrupt
dev_utts[1].audio.write_bytes(dev_utts[1].audio.read_bytes()[:40])       # truncated download
dev_utts[2].audio.unlink()                                                # missing audio
shutil.copy(dev_utts[3].audio, dev_utts[3].audio.with_name("9_9_999999.opus"))  # orphan audio
lines = (broken / "dev" / "transcripts.txt").read_text(encoding="utf-8").splitlines()
lines[4] = lines[4].split("\t")[0] + "\t"                                 # empty text
lines.append("this line has no tab")                                      # malformed
(broken / "dev" / "transcripts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
broken_scan = data.scan_mls(broken, "dev", language=code)
print(broken_scan.report())
results["broken_copy_skips"] = broken_scan.counts()

# %% [markdown]
# The report lists each reason with a count and the first examples, with the file and the line:
# two corrupt files, one line without audio, one audio without a line, one empty text, one
# malformed line. Clips shorter than `min_duration` or longer than `max_duration` are skipped the
# same way; Whisper sees at most 30 s, so a longer clip would be cut and no longer match its
# transcript.

# %% [markdown]
# ## 2 · Pairs
#
# What the scan keeps is a list of `Utterance` records: id, speaker, book, audio path, text,
# duration in seconds and the Whisper language code. In the embedded corpus a "speaker" is one
# espeak-ng voice (`speakers.tsv`), so we can later report WER per voice.

# %%
train = scans["train"].utterances
if smoke:
    train = train[:16]
voices = data.read_speakers(root)
for u in train[:5]:
    print(f"{u.id}  {voices.get(u.speaker, u.speaker):7s} {u.duration:5.2f} s  {u.text}")
by_voice = {voices.get(s, s): sum(u.speaker == s for u in train) for s in sorted({u.speaker for u in train})}
print("clips per voice (train):", by_voice)

# %% [markdown]
# Each line is one pair: the id carries speaker and book, the voice comes from `speakers.tsv`.
# Every voice appears in every split, so the test set measures how a model copes with voices it
# has heard, spoken at other speeds, on sentences it has never seen.

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.hist([[u.duration for u in r.utterances] for r in scans.values()], bins=20, stacked=True,
        label=list(scans))
ax.axvline(min_duration, color="k", ls="--", lw=1, label="min_duration")
if max_duration <= 2 * max(u.duration for r in scans.values() for u in r.utterances):
    ax.axvline(max_duration, color="k", ls=":", lw=1, label="max_duration")
ax.set(title=f"Clip durations, {root.name}", xlabel="duration (s)", ylabel="clips")
ax.legend()
fig.tight_layout()
fig.savefig(out / "durations.png", dpi=120)
hours = {split: round(r.hours, 3) for split, r in scans.items()}
print("hours per split:", hours)
results["hours"] = hours

# %% [markdown]
# The embedded clips are single sentences: most last 3 to 5 seconds, a few short ones about
# 2 s and a few long ones 6 to 9 s, all far below Whisper's 30 s window and above
# `min_duration`, so nothing is dropped. MLS segments are longer (mostly 10 to 20 s). Either way every clip is padded to 30 s
# before the encoder sees it, which is why the next stage keeps track of how many frames are real.

# %% [markdown]
# ## 3 · Dataset: features and labels
#
# `MLSDataset` turns one pair into what Whisper trains on. The feature extractor and tokenizer
# are passed in (`kdlib.data` never loads a model): here the real multilingual Whisper tokenizer
# and an 80-mel feature extractor (whisper-base; large-v3 uses 128 mels, which works the same).

# %%
tokenizer = real_tokenizer("whisper-base")
feature_extractor = WhisperFeatureExtractor(feature_size=80)
dataset = data.MLSDataset(train, feature_extractor, tokenizer, safe=True)
item = dataset[0]
print("input_features", tuple(item["input_features"].shape), "| num_frames", item["num_frames"],
      f"| duration {item['duration']:.2f} s")
print("labels", item["labels"].tolist()[:8], "...")
print(tokenizer.decode(item["labels"]))

# %% [markdown]
# One item: features of shape (80 mels, 3000 frames), of which only `num_frames` (one per 10 ms
# of audio) hold speech; the rest is the padding up to 30 s. The labels start with the language
# token and the task, `<|it|><|transcribe|><|notimestamps|>`, then the text, then
# `<|endoftext|>`. They leave out `<|startoftranscript|>` on purpose: the model shifts labels
# one step right and puts that token in front to build its decoder input, so the decoder reads
# `<|startoftranscript|>` and must predict `<|it|>`, and so on.

# %%
fig, ax = plt.subplots(figsize=(9, 3))
frames = item["num_frames"]
shown = min(3000, int(frames * 1.3) + 50)
im = ax.imshow(item["input_features"][:, :shown].numpy(), origin="lower", aspect="auto",
               cmap="magma", extent=[0, shown / 100, 0, 80])
ax.axvline(frames / 100, color="w", ls="--", lw=1)
ax.text(frames / 100, 75, " padding ->", color="w", va="top")
ax.set(title=f"Log-mel spectrogram of {item['id']}", xlabel="time (s)", ylabel="mel bin")
fig.colorbar(im, ax=ax, label="log-mel (normalised)")
fig.tight_layout()
fig.savefig(out / "spectrogram.png", dpi=120)

# %% [markdown]
# Speech shows as bright harmonic stripes. The dark stretch just before the dashed line is the
# synthesiser's own trailing silence; after the line the extractor has padded with zeros up to
# 30 s (a flat, low value). Whisper's encoder processes all 3000 frames regardless, so the
# `feature_mask` built in the next stage is what tells a frame-level loss which frames are real.

# %% [markdown]
# ## 4 · DataLoader: where padding happens
#
# Items have label sequences of different lengths. `collate` stacks the features (already all
# 3000 frames long), pads the labels to the longest in the batch with -100 (ignored by
# cross-entropy), and builds two masks: `decoder_attention_mask` for real label positions and
# `feature_mask` for real audio frames.

# %%
loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                    collate_fn=data.WhisperCollator())
batch = next(iter(loader))
for key, value in batch.items():
    print(f"{key:24s}", tuple(value.shape) if torch.is_tensor(value) else value)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [1, 2]})
axes[0].imshow(batch["decoder_attention_mask"].numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1,
               interpolation="nearest")
axes[0].set(title="Labels: real (green) vs -100 padding", xlabel="label position (tokens)",
            ylabel="clip in batch")
axes[1].imshow(batch["feature_mask"].numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1,
               interpolation="nearest", extent=[0, 30, batch["feature_mask"].shape[0] - 0.5, -0.5])
axes[1].set(title="Feature frames: real audio (blue) vs padding", xlabel="time (s)", ylabel="clip in batch")
fig.tight_layout()
fig.savefig(out / "batch_masks.png", dpi=120)
label_waste = 1 - batch["decoder_attention_mask"].float().mean().item()
frame_waste = 1 - batch["feature_mask"].float().mean().item()
print(f"padding in this batch: labels {label_waste:.0%}, feature frames {frame_waste:.0%}")

# %% [markdown]
# Two different kinds of padding. Feature frames are mostly padding (short clips in a 30 s
# window); that is Whisper's design and a batch sampler cannot change it. Label padding depends
# on which clips share a batch: a long sentence next to short ones forces every row to its
# length. That is what length grouping cuts.
#
# `LengthGroupedBatchSampler` uses the megabatch recipe: shuffle, cut into megabatches of
# `bucket_factor * batch_size`, sort each by length, cut into batches, shuffle the batches. The
# batches stay random from step to step, but their members are similar in length.

# %%
label_lengths = [len(dataset.labels_for(u.text, u.language)) for u in train]
durations = [u.duration for u in train]
rng = np.random.default_rng(0)
mls_like = rng.uniform(10.0, 20.0, size=2000).tolist()  # MLS segment lengths (s), for comparison
cases = {"embedded: label tokens": label_lengths, "embedded: audio seconds": durations,
         "MLS-like 10-20 s: audio seconds": mls_like}
waste = {}
for name, lengths in cases.items():
    bs = min(batch_size, len(lengths))
    random_w = np.mean([data.padding_waste(lengths, data.random_batches(len(lengths), bs, seed=s))
                        for s in range(5)])
    grouped_w = np.mean([data.padding_waste(lengths, data.LengthGroupedBatchSampler(
        lengths, bs, seed=s, bucket_factor=bucket_factor)) for s in range(5)])
    waste[name] = (random_w, grouped_w)
    print(f"{name:34s} random batches {random_w:6.1%}   length-grouped {grouped_w:6.1%}")
results["padding_waste"] = {k: {"random": v[0], "grouped": v[1]} for k, v in waste.items()}

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
x = np.arange(len(waste))
ax.bar(x - 0.2, [v[0] * 100 for v in waste.values()], 0.4, label="random batches")
ax.bar(x + 0.2, [v[1] * 100 for v in waste.values()], 0.4, label="length-grouped")
ax.set_xticks(x, list(waste), fontsize=8)
ax.set(title=f"Padding waste, batch size {batch_size}, bucket factor {bucket_factor}",
       ylabel="padded positions (%)")
ax.legend()
fig.tight_layout()
fig.savefig(out / "padding_waste.png", dpi=120)

# %% [markdown]
# With random batches a good share of every batch is padding; grouping by length removes most
# of it. With the embedded corpus the whole split fits in one megabatch, so grouping is close to
# sorting; on a real MLS split the megabatches keep the order random while still cutting the
# waste. The saving is in decoder tokens (and any loss over real frames); the encoder input stays
# 30 s per clip in every case.

# %%
sampler = data.LengthGroupedBatchSampler(durations, batch_size, seed=0, bucket_factor=bucket_factor)
grouped_loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                            collate_fn=data.WhisperCollator())
n_batches = 1 if smoke else 3
for k, b in zip(range(n_batches), grouped_loader):
    print(f"batch {k}: {len(b['ids'])} clips, durations {b['durations'].min():.2f}-{b['durations'].max():.2f} s, "
          f"labels {tuple(b['labels'].shape)}, dropped {b['n_dropped']}")

# %% [markdown]
# Each grouped batch holds clips of similar duration, so its label tensor is barely wider than
# its longest sentence. The first batch is the one holding the longest clip, on purpose: if a
# batch size is too big for the GPU's memory, the run fails at step 1, not hours later. `n_dropped` counts items whose audio broke after the scan (with
# `safe=True` the Dataset returns `None` for them and `collate` leaves them out), so a long run
# keeps going and the loop can add the drops to its report.

# %% [markdown]
# ## 5 · Batches in two languages
#
# Whisper is multilingual, and MLS has eight languages. `scan_many` scans several folders and
# keeps each utterance's language code, so every sample gets its own language token even when
# Italian and Spanish share a batch.

# %%
second = Path(second_root) if second_root else data.embedded_corpus(second_language)
mixed_scan = data.scan_many([(root, "dev", code), (second, "dev", data.language_code(second_language))],
                            min_duration=min_duration, max_duration=max_duration)
print(mixed_scan.report())
per_lang = 2 if smoke else max(2, batch_size // 2)
pick = [u for u in mixed_scan.utterances if u.language == code][:per_lang] + \
       [u for u in mixed_scan.utterances if u.language != code][:per_lang]
mixed = data.collate([data.MLSDataset(pick, feature_extractor, tokenizer)[i] for i in range(len(pick))])
for row, lang in zip(mixed["labels"], mixed["languages"]):
    tokens = tokenizer.convert_ids_to_tokens(row[row != -100].tolist())
    print(f"{lang}: {''.join(tokens[:3])} {tokenizer.decode(row[3:][row[3:] != -100][:-1]).strip()[:60]}")
results["mixed_languages"] = mixed["languages"]

# %% [markdown]
# Each row begins with its own language token (`<|it|>` or `<|es|>`), followed by the task and
# `<|notimestamps|>`. A model trained on this batch learns to transcribe each language in that
# language, rather than translating Spanish into Italian because the batch was "Italian".

# %% [markdown]
# ## At thesis scale: getting MLS onto the disk
#
# MLS comes as one `.tar.gz` per language (e.g. `mls_italian_opus.tar.gz`). `extract_mls_archive`
# streams through it once and writes only the chosen languages and splits, after printing how
# much disk that needs: it + pt + pl in OPUS is about 511 h, ~135,000 files, 15-20 GB; adding
# Spanish makes it about 1,429 h, ~363,000 files, 45-60 GB. Keep 2.5 times that free. Members
# that would land outside the output folder (absolute paths, `..`, links) are refused.
#
# ```python
# data.extract_mls_archive("mls_italian_opus.tar.gz", "/data/mls", splits=("train", "dev", "test"))
# data.scan_mls("/data/mls/mls_italian_opus", "train", progress=True)
# ```
#
# The same from a shell: `python -m kdlib extract ...`. Here is the estimate that extraction
# would print for this machine (no archive is read):

# %%
print(data.storage_estimate(out, languages=["it", "pt", "pl"]))
(out / "results.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
print("wrote", out / "results.json")

# %% [markdown]
# The table gives the reference sizes, the hours of training audio for the languages you chose,
# and how much space is free where the files would go.
#
# ## Summary
#
# * `scan_mls` turns an MLS folder into audio-text pairs, reading only audio headers; every bad
#   line or file is skipped, counted by reason, and named in `report()`.
# * `MLSDataset` decodes (soundfile), mixes to mono, resamples to 16 kHz (torchaudio, cached
#   kernels) and returns 3000-frame log-mel features plus labels
#   `<|lang|><|task|><|notimestamps|> text <|endoftext|>` (no `<|startoftranscript|>`: the model's
#   shift adds it).
# * Padding happens in `collate`: labels with -100, `decoder_attention_mask`, and a
#   `feature_mask` of real audio frames. Whisper's encoder always sees 30 s; length grouping cuts
#   the label padding.
# * `scan_many` mixes languages with the right language token per sample;
#   `extract_mls_archive` gets chosen languages and splits out of the MLS archives by streaming.
#
# ## Exercises
#
# 1. Set `batch_size = 32` and `bucket_factor = 1`, then `bucket_factor = 100`. How does the
#    padding waste change, and what do you give up as the megabatches grow?
# 2. Convert one embedded clip to 44.1 kHz stereo FLAC with `soundfile`, scan a folder holding it
#    and check with `load_audio` that you get the same number of 16 kHz samples back.
# 3. Build a `WhisperFeatureExtractor(feature_size=128)` (the large-v3 front end) and look at the
#    spectrogram again. What changes in the features, and what stays the same in the labels?
