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
# # 10 · The latent space: PCA, t-SNE, UMAP and DTW
#
# Losses tell us *how much* a student differs from its teacher; pictures tell us *where*. This
# chapter looks at the last encoder layer of the teacher and of the student, on the same clips.
#
# ## What this chapter teaches
#
# How to answer three questions with pictures and numbers:
#
# 1. Do teacher and student put the same speech in the same place? We project every model's
#    states onto **one** 2-D map (PCA, t-SNE and UMAP, each fitted on the union of all models),
#    once per utterance (masked mean over its frames) and once per frame.
# 2. What does each projection method keep of the high-dimensional geometry: the global layout
#    (far stays far) or the local neighbourhoods (near stays near)? We measure both and write
#    the answer down as a table.
# 3. Does the student follow the teacher *in time*? Dynamic time warping (DTW, cosine cost) aligns
#    the teacher's frame sequence with the projected student's, per utterance, before and after
#    distillation, and we draw the alignment path of one clip.
#
# ## What it needs
#
# Chapter 07's stage-III run folder (`run_dir`, the student after the three stages) when it exists:
# the student *before* KD is then that run's own student as the run built it, untrained. Without
# the run, "before" and "after" are both a fresh, untrained `student` (`distil-base`), and the
# chapter says so in its output. It loads the offline whisper-base teacher (the `offline-whisper` extra) and uses the
# `dev` split of the embedded Italian corpus. With `preset = "smoke"` it runs on a tiny random
# teacher/student pair and 4 clips (`"thesis-tiny"`: one shaped like large-v3 → small, its student
# merging 3 encoder frames into one), so the pictures then mean nothing; the prose describes `demo`.

# %% tags=["parameters"]
preset = "demo"  # "smoke": tiny random pair, 4 clips (seconds); "demo": whisper-base on CPU, < 5 min
teacher = "whisper-base"  # thesis: "openai/whisper-large-v3"
student = "distil-base"  # the student before KD when run_dir holds no finished run; thesis: "openai/whisper-small"
run_dir = "../runs/07_stage3_decoder/stage3"  # chapter 07's stage3/ run folder, the student after KD; thesis: the same
data_root = None  # None: embedded Italian corpus; thesis: "/data/mls/mls_italian_opus"
split = "dev"  # thesis: "dev"
max_utterances = 20  # thesis: 500
frames_per_utterance = 30  # evenly spaced frames per clip in the frame-level maps; thesis: 30
batch_size = 8  # clips per encoder forward; thesis: 32 (on a GPU)
seed = 0  # clip sample, fresh projector, t-SNE and UMAP; thesis: 0
out_dir = "../runs/10_latent_space"  # figures, tables and runs of this chapter; thesis: the same

# %%
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from kdlib import viz
from kdlib.config import make_config
from kdlib.data import embedded_corpus, load_audio, read_speakers, scan_mls
from kdlib.files import shown
from kdlib.models import (TINY_RANDOM, RiemannianProjector, load_student, load_whisper, placement, resolve_device,
                          same_encoder, tiny_random_named)

chapter_start = time.perf_counter()
torch.manual_seed(seed)
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
tiny = make_config(preset).teacher in TINY_RANDOM  # smoke, thesis-tiny: the preset's tiny random pair
if tiny:
    max_utterances = 4
results = {"preset": preset, "teacher": teacher, "student": student, "split": split}

# %% [markdown]
# ## The clips
#
# We take `max_utterances` clips of the split (a seeded sample when the split holds more) and
# decode them to 16 kHz. Each clip is labelled with its speaker; in the embedded corpus a speaker
# is one espeak-ng voice, so "speaker" here means "voice".

# %%
root = Path(data_root) if data_root else embedded_corpus("it")
scan = scan_mls(root, split)
pool = scan.utterances
if len(pool) > max_utterances:
    keep = np.sort(np.random.default_rng(seed).choice(len(pool), max_utterances, replace=False))
    pool = [pool[i] for i in keep]
utterances = pool
voices = read_speakers(root)
ids = [u.id for u in utterances]
speakers = [f"{u.speaker} ({voices[u.speaker]})" if u.speaker in voices else u.speaker for u in utterances]
waves = [load_audio(u.audio).numpy() for u in utterances]
seconds = np.array([len(w) / 16000 for w in waves])
print(f"{len(utterances)} of {scan.n_kept} clips in {root.name}/{split}; {len(set(speakers))} speakers; "
      f"{seconds.min():.1f}-{seconds.max():.1f} s, {seconds.sum():.0f} s in all")
results["clips"] = len(utterances)
results["clip_seconds"] = {"min": float(seconds.min()), "max": float(seconds.max())}

# %% [markdown]
# Clips of a few seconds (1.6<!-- results: clip_seconds.min --> to 9.3<!-- results: clip_seconds.max --> s in the demo): at 20 ms per encoder frame a 5 s clip fills
# 250 of Whisper's 1500 frames, the rest sees padding. The valid-frame masks below keep the
# padding out of every mean, map and alignment.
#
# ## Teacher, student before KD, student after KD
#
# The student *after* KD comes from chapter 07's run folder (LoRA merged into the weights, plus
# the trained projector) when that run exists and was distilled from the same teacher. The
# student *before* KD is the same run's student as the run built it before its first step
# (`viz.before_kd_student`): the same shape (on the demo whisper-base with a 10 s encoder window,
# all six decoder layers), none of the training. So whatever differs between the two is what
# training changed.

# %%
if tiny:
    teacher_name = make_config(preset).teacher
    teacher_bundle, fallback_student = tiny_random_named(teacher_name, seed=seed)
else:
    teacher_bundle, teacher_name = load_whisper(teacher), teacher
after = viz.after_kd_student(run_dir, teacher_name)
have_kd = after.model is not None
AFTER = "student after KD" if have_kd else "student after KD (unavailable: fresh student)"
frame_factor = after.frame_factor if have_kd else 1
if have_kd:  # "before" = the run's own student, untrained: its window, layers and frame merge
    before_model, before_fe = viz.before_kd_student(after)
    before_source = f"{after.config['student']} as the run built it (untrained, same shape)"
    print(f"after KD: {after.reason}; student frames downsampled {frame_factor}:1")
else:
    fallback_student = fallback_student if tiny else load_student(student)
    before_model, before_fe = fallback_student.model, fallback_student.feature_extractor
    before_source = f"{fallback_student.name} (the `student` parameter)"
    print(f"after KD is UNAVAILABLE ({after.reason}).\nThe 'after KD' student below is a fresh, untrained "
          f"{fallback_student.name}: the same model as 'before KD'. Run chapter 07 to see distillation.")
d_teacher, d_student = teacher_bundle.config.d_model, before_model.config.d_model
torch.manual_seed(seed)
fresh_projector = RiemannianProjector(d_student, d_teacher)  # identity + normalise when widths agree
trained_projector = after.projector if have_kd and after.projector is not None else fresh_projector
print(f"teacher {teacher_bundle.name}: d_model {d_teacher}; student before KD: {before_source}, d_model "
      f"{d_student}; projector after KD: {'trained' if trained_projector is not fresh_projector else 'fresh (untrained)'}")
# The run's device (the GPU at thesis scale): every encoder below runs there.
device = resolve_device(after.config.get("device", "auto") if have_kd else "auto")
for part in (teacher_bundle.model, before_model, after.model, fresh_projector, trained_projector):
    if part is not None:
        part.to(device)
results.update(after_kd=have_kd, after_kd_source=after.reason, before_kd_source=before_source,
               frame_factor=frame_factor, device=str(device),
               placement=placement(teacher=teacher_bundle.model, student_before_kd=before_model,
                                   student_after_kd=after.model, projector=trained_projector))

# %% [markdown]
# When chapter 07 has not been run, the output above says so in capitals: "before" and "after"
# are then the same model and every comparison below between them shows no change. The projector
# maps student states into the teacher's space and onto the unit sphere; a fresh projector between
# equal widths starts as the identity, so it only normalises.
#
# ## Encoder states with valid-frame masks
#
# `viz.extract_states` runs each encoder once over the clips (batches, `torch.no_grad`), keeps the
# last layer and the mask of valid frames: a clip of `n` samples gives `ceil(n / 160)` log-mel
# frames and `ceil(mel / 2)` encoder frames. Two models whose encoders hold identical weights
# (`kdlib.models.same_encoder`) give identical states, so the second one costs no forward; the projected
# students are the student states sent through a projector, so they cost none either.

# %%
start = time.perf_counter()
kw = dict(ids=ids, speakers=speakers, batch_size=batch_size)
extracted = []  # (model, frame_factor, states) of every encoder run so far


def encoder_states(model, feature_extractor, name, factor=1):
    for other, other_factor, states in extracted:
        if other_factor == factor and same_encoder(other, model):
            print(f"{name}: encoder weights equal to the {states.name}'s, so are its states (no second forward)")
            return states.renamed(name)
    states = viz.extract_states(model, feature_extractor, waves, name=name, frame_factor=factor, **kw)
    extracted.append((model, factor, states))
    return states


teacher_states = encoder_states(teacher_bundle, teacher_bundle.feature_extractor, "teacher")
before_states = encoder_states(before_model, before_fe, "student before KD", frame_factor)
if have_kd:
    after_states = encoder_states(after.model, after.feature_extractor, AFTER, frame_factor)
else:  # the fallback student is the same model
    after_states = before_states.renamed(AFTER)
projected_before = viz.project_states(before_states, fresh_projector, name="projected student before KD")
projected_after = viz.project_states(after_states, trained_projector, name="projected " + AFTER)
extract_seconds = time.perf_counter() - start
for s in (teacher_states, before_states, after_states, projected_before, projected_after):
    print(f"{s.name:52s} hidden {str(s.hidden.shape):16s} valid frames {int(s.lengths.sum()):6d} "
          f"({s.frame_seconds * 1000:.0f} ms each)")
print(f"encoder states in {extract_seconds:.1f} s")
results["extract_seconds"] = round(extract_seconds, 1)

# %% [markdown]
# Each array is cut after the longest clip's last valid frame instead of keeping all 1500 frames:
# the masks say which of the remaining frames are padding. The valid-frame counts of teacher and
# student agree whenever the student keeps Whisper's frame rate (`frame_factor` 1).
#
# Before any picture, one number: how far are the student's states from the teacher's at the same
# frame? The mean cosine similarity over valid frames (1 = same direction).

# %%
def same_frame_cosine(a: viz.EncoderStates, b: viz.EncoderStates) -> float | None:
    if a.hidden.shape[1:] != b.hidden.shape[1:] or not (a.mask == b.mask).all():
        return None  # other frame rate or width: only DTW can compare them
    ua, ub = viz.unit_rows(a.hidden[a.mask]), viz.unit_rows(b.hidden[b.mask])
    return float((ua * ub).sum(1).mean())


for s in (before_states, after_states, projected_before, projected_after):
    c = same_frame_cosine(teacher_states, s)
    print(f"teacher vs {s.name:52s} " + (f"mean cosine {c:.4f}" if c is not None else "not comparable frame by frame"))
    results[f"cosine_teacher_vs_{s.name}"] = c
results["cosine"] = {key: same_frame_cosine(teacher_states, s) for key, s in (
    ("before", before_states), ("after", after_states), ("projected_before", projected_before),
    ("projected_after", projected_after))}
if results["cosine"]["after"] is not None:
    before, after_kd = results["cosine"]["before"], results["cosine"]["after"]
    # the share of the before-KD gap (1 - cosine) that training closed; negative: it moved away
    results["cosine_gap_closed_percent"] = 100 * (after_kd - before) / (1 - before) if before < 1 else None
    print(f"training closed {results['cosine_gap_closed_percent']:.0f} % of the before-KD gap (1 - cosine)"
          if before < 1 else "before KD the student's states are the teacher's")
else:  # other widths or frame rates: no frame-by-frame cosine
    results["cosine_gap_closed_percent"] = None

# %% [markdown]
# The demo student has whisper-base's encoder weights, but reads a 10 s window: its encoder never
# saw one that short, so before KD its states already differ from the teacher's at the same
# frame (mean cosine 0.974<!-- results: cosine.before -->). After the three stages (chapter 07's run as `run_dir`) the cosine
# rose to 0.985<!-- results: cosine.after --> for the raw student and 0.986<!-- results: cosine.projected_after --> through the trained projector: training closed
# 45<!-- results: cosine_gap_closed_percent ~3 --> % of the gap that the window cut opened. Stage II did most of that: it trains encoder LoRA
# to follow the teacher through the projector (chapter 06). The teacher here is the unadapted
# whisper-base; the run's stage-0 teacher adapted only its decoder, so its encoder states are
# these. With the thesis student
# (whisper-small under whisper-large-v3, widths 768 and 1280) nothing lines up before the projector
# is trained, and the comparisons below start from a real gap.
#
# ## One map for all models, one point per utterance
#
# A map is only comparable across models when it is fitted on all of them at once: fitting PCA on
# the teacher and again on the student gives two coordinate systems that cannot be overlaid. So
# `viz.joint_map` stacks the points of every model, scales each to unit length (directions are what
# a cosine cost and the unit-norm projector see), fits PCA, t-SNE or UMAP on the union and splits
# the 2-D result back per model. A student whose width differs from the teacher's enters the map
# only through its projector.

# %%
students = [(before_states, projected_before)] + ([(after_states, projected_after)] if have_kd else [])
map_states = [teacher_states] + [raw if raw.dim == d_teacher else projected for raw, projected in students]
projected_student = students[-1][1]  # after KD when there is a run; else before (the fallback is that model)
if all(s is not projected_student for s in map_states):
    map_states.append(projected_student)
print("on the map: " + "; ".join(s.name for s in map_states))
pooled = {s.name: viz.pool_states(s) for s in map_states}
pooled_maps = [viz.joint_map(pooled, m, seed=seed) for m in viz.METHODS]
pooled_labels = {s.name: s.speakers for s in map_states}
viz.plot_maps(pooled_maps, colour_by="model",
              title=f"Utterances (masked mean of encoder frames), coloured by model — {len(ids)} clips",
              path=out / "utterance_maps_by_model.png")
plt.show()
viz.plot_maps(pooled_maps, colour_by="speaker", labels=pooled_labels,
              title="Utterances, coloured by speaker (marker = model)", path=out / "utterance_maps_by_speaker.png")
plt.show()

# %% [markdown]
# What the maps showed in our demo runs:
#
# * **PCA** places equal states on equal points, and small changes as small shifts: each clip's
#   before-KD square sits off the teacher's circle, and the after-KD markers sit closer to it. Its
#   two axes hold about half of the variance of the 20 utterance means (the share is printed on
#   the axes).
# * **t-SNE** *magnifies* small differences: each clip's teacher and student states are each
#   other's nearest neighbours, and t-SNE spreads every neighbourhood to a visible size, so a
#   cosine of 0.99<!-- results: cosine.after --> looks like a clear gap, and the before and after markers no longer show
#   which one is nearer the teacher.
# * **UMAP** does not keep close points together either: it moves every point on its own, with
#   random pushes away from other points, so a clip's markers scatter around one place.
#   Distances *within* a small group on a UMAP map mean nothing.
#
# Coloured by speaker, the utterance means do not gather by voice: the mean of the last encoder
# layer over a clip is dominated by *what* is said (every clip of the split is a different
# sentence), and the six voices of one synthesiser differ less than the sentences do.
#
# ## One point per frame
#
# Utterance means hide the inside of a clip. With `frames_per_utterance` evenly spaced valid frames
# per clip (`viz.sample_frames`; the same frames for every model at the same frame rate), the maps
# show how the encoder arranges the moments of speech inside the clips. Sampling keeps t-SNE and UMAP cheap: their cost
# grows with the number of points, not with the clip length.

# %%
frame_sets, frame_labels = {}, {}
for s in map_states:
    points, utt, _ = viz.sample_frames(s, frames_per_utterance)
    frame_sets[s.name] = points
    frame_labels[s.name] = [s.speakers[i] for i in utt]
frame_maps = [viz.joint_map(frame_sets, m, seed=seed) for m in viz.METHODS]
print(f"{sum(len(p) for p in frame_sets.values())} frame points; maps fitted in "
      + ", ".join(f"{m.title} {m.seconds:.1f} s" for m in frame_maps))
viz.plot_maps(frame_maps, colour_by="model", title=f"Encoder frames ({frames_per_utterance} per clip), coloured by model",
              path=out / "frame_maps_by_model.png")
plt.show()
viz.plot_maps(frame_maps, colour_by="speaker", labels=frame_labels,
              title="Encoder frames, coloured by speaker (marker = model)", path=out / "frame_maps_by_speaker.png")
plt.show()
results["map_seconds"] = {m.method: round(m.seconds, 1) for m in frame_maps}

# %% [markdown]
# With thirty frames per clip the picture changes. The teacher's and the students' markers sit
# inside each other on all three maps: at the scale of the frame structure, the differences between
# the students and the teacher (cosine 0.97<!-- results: cosine.before --> before KD, 0.99<!-- results: cosine.after --> after) are invisible, and only the
# utterance maps and the numbers show them. The three methods
# draw the same frames very differently: PCA a bent band with two dense ends (its two axes now hold
# only about a fifth of the variance, so most frames overlap); t-SNE an evenly filled disc of small
# groups with a few detached islands; UMAP thin strands and compact islands with wide empty gaps
# between them. Coloured by speaker, most regions mix all six voices: frames of similar sounds from
# different voices sit together, as they should in an encoder that abstracts from the speaker.
#
# ## What each method keeps
#
# Pictures can mislead, so we measure what each 2-D map kept of the unit-length points it was
# fitted on: the **k-nearest-neighbour overlap** (the share of each point's 10 nearest neighbours
# that are still among its 10 nearest on the map: local structure) and the **rank correlation of
# all pairwise distances** (Spearman: global structure).

# %%
stacked = np.concatenate(list(frame_sets.values()))
rows = []
for m in frame_maps:
    coords = np.concatenate([m.coords[name] for name in frame_sets])
    scores = viz.preservation(stacked, coords, k=10)
    rows.append((m.title, scores["knn_overlap"], scores["distance_correlation"]))
print(f"{'method':8s} {'10-NN overlap (local)':>24s} {'distance rank corr. (global)':>30s}")
for title, knn, dc in rows:
    print(f"{title:8s} {knn:24.2f} {dc:30.2f}")
print(f"(chance level of the 10-NN overlap: {10 / (len(stacked) - 1):.3f})")
results["preservation"] = {t: {"knn_overlap": round(k, 3), "distance_correlation": round(d, 3)} for t, k, d in rows}
results["frame_points"] = len(stacked)

# %% [markdown]
# Measured on the frame maps of the demo (2,400<!-- results: frame_points --> points), the two scores tell the methods apart on
# one axis only. **Local:** t-SNE and UMAP keep
# about 0.6–0.65<!-- results: preservation.t-SNE.knn_overlap --><!-- results: preservation.UMAP.knn_overlap --> of every frame's ten nearest neighbours, PCA about 0.2–0.3<!-- results: preservation.PCA.knn_overlap --> (chance is below 0.01).
# **Global:** all three reach a rank correlation of about 0.6 (PCA 0.65<!-- results: preservation.PCA.distance_correlation -->, UMAP 0.65<!-- results: preservation.UMAP.distance_correlation -->, t-SNE 0.58<!-- results: preservation.t-SNE.distance_correlation -->):
# two dimensions cannot hold the far-field layout of a 512-dimensional cloud, and no method is
# much better at it. UMAP's wide gaps between clusters look like far more global order than
# t-SNE's disc, and score only a little more. Together with the utterance maps above:
#
# | method | global variance / layout | local neighbourhoods | read it for |
# |---|---|---|---|
# | PCA | **yes**: linear, the axes are the directions of largest variance (share on the axes), equal points stay equal and small shifts stay small; still only a fifth of the frames' variance in 2-D | weak: 0.2–0.3 of the 10 nearest neighbours kept | how far apart groups (models, speakers) are, and in which direction a student drifts |
# | t-SNE | no: cluster sizes and gaps mean little, the layout changes with the seed, small differences are magnified | **yes**: 0.6–0.65 of the 10 nearest neighbours | whether teacher and student frames share the same neighbourhoods |
# | UMAP | partly: compact clusters with wide gaps, scoring about as PCA here | **yes**: as t-SNE | the same as t-SNE, with clearer clusters; never distances inside a cluster (close points are drawn apart) |
#
# So a student that "looks like the teacher" on a t-SNE or UMAP map has the same neighbourhoods;
# whether it is also in the same *place* is a question for PCA, the cosine above, or DTW below.
#
# ## DTW: does the student follow the teacher in time?
#
# Maps compare clouds of points and forget the order of frames. DTW keeps it: for every clip it
# finds the monotone alignment of the teacher's frames with the projected student's frames that
# minimises the summed cosine distance `1 − cos`, and we report the mean cost per step of the path
# (comparable across clips of different lengths). Before KD the student goes through the fresh
# projector; after KD through the trained one. A student with 3:1 fewer frames is aligned too: DTW
# does not need equal lengths.

# %%
start = time.perf_counter()
dtw_before = viz.dtw_distances(teacher_states, projected_before)
dtw_after = viz.dtw_distances(teacher_states, projected_after)
dtw_seconds = time.perf_counter() - start
before_values = np.array([r.normalized for r in dtw_before])
after_values = np.array([r.normalized for r in dtw_after])
viz.plot_dtw_distances({"before KD": before_values, AFTER: after_values}, ids,
                       title="DTW distance between teacher and projected student, per clip",
                       path=out / "dtw_per_utterance.png")
plt.show()
print(f"DTW for {2 * len(ids)} clip pairs in {dtw_seconds:.1f} s")
print(f"mean DTW distance per step: before KD {before_values.mean():.4f}, {AFTER} {after_values.mean():.4f}")
results["dtw_before"] = dict(zip(ids, np.round(before_values, 5).tolist()))
results["dtw_after"] = dict(zip(ids, np.round(after_values, 5).tolist()))
results["dtw"] = {"after_min": float(after_values.min()), "after_max": float(after_values.max()),
                  "after_mean": float(after_values.mean()), "before_mean": float(before_values.mean())}

# %% [markdown]
# The "before" bars measure what the 10 s window alone did to the encoder (a fresh projector
# between equal widths only normalises, which a cosine cost ignores): 0.027<!-- results: dtw.before_mean --> per step on
# average. After KD every clip's bar is lower: 0.005<!-- results: dtw.after_min --> to 0.035<!-- results: dtw.after_max --> per step, 0.013<!-- results: dtw.after_mean --> on average,
# about half, different for every clip. With the thesis student (whisper-small under
# whisper-large-v3) the "before" bars start much higher, and bringing them down is the point of
# stage II.
#
# ## The alignment path of one clip
#
# The clip whose distance changed most (the first clip when nothing changed): the cost matrix
# teacher frame × student frame, and the DTW path through it, before and after KD.

# %%
change = np.abs(after_values - before_values)
i = int(np.argmax(change)) if change.max() > 0 else 0
panels = []
for label, proj, res in (("before KD", projected_before, dtw_before[i]), (AFTER, projected_after, dtw_after[i])):
    cost = viz.cosine_cost(teacher_states.sequence(i), proj.sequence(i))
    panels.append((label, cost, res))
viz.plot_dtw_paths(panels, frame_seconds=(teacher_states.frame_seconds, projected_after.frame_seconds),
                   title=f"DTW alignment of clip {ids[i]} ({speakers[i]}), cosine cost",
                   path=out / "dtw_path.png")
plt.show()
on_diagonal = [float(np.mean(r.path[:, 0] == r.path[:, 1])) for _, _, r in panels]
print(f"clip {ids[i]}: {teacher_states.lengths[i]} teacher frames; path steps on the diagonal: "
      f"before {on_diagonal[0]:.0%}, after {on_diagonal[1]:.0%}")
results["dtw_path_clip"] = ids[i]

# %% [markdown]
# The cost matrix shows the clip's own structure: a dark band along the diagonal (neighbouring
# frames are alike), darker blocks where the same sound lasts, and a dark square at the end where
# the trailing silence of the clip matches itself. A student that was late or early would pull the
# path off the dashed diagonal; here the path stays on it before KD and after KD (the share of
# its steps on the diagonal is printed above): the window student keeps the teacher's timing,
# and its DTW distance is the difference inside each frame, not a shift in time. A 3:1 student (`frame_factor` 3) would give a
# flatter matrix, three teacher frames per student frame, and a path of steps instead of a line.

# %%
results["total_seconds"] = round(time.perf_counter() - chapter_start, 1)
(out / "latent_space.json").write_text(json.dumps(results, indent=2) + "\n")
(out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # the book's check reads this name
print(f"figures and latent_space.json in {shown(out)}; chapter ran in {results['total_seconds']:.0f} s")

# %% [markdown]
# ## Summary
#
# * Encoder states are only comparable on their **valid frames**: a 5 s clip fills 250 of
#   Whisper's 1500 frames. `viz.extract_states` returns the mask with the states, and pooling,
#   frame sampling and DTW all use it.
# * A 2-D map compares models only when it is **fitted on the union** of their points; we map unit
#   vectors, so the map shows directions, as the cosine cost and the projector do.
# * **PCA keeps the global layout (and keeps equal points equal), t-SNE and UMAP the local
#   neighbourhoods**; the table rests on measured neighbour overlap and distance correlation, not
#   on the look of the pictures. t-SNE magnifies small differences, UMAP separates even close
#   points: neither shows how *far* a student is from its teacher.
# * **DTW** compares frame sequences in order and allows different lengths (a 3:1 student); on the
#   demo its path stays on the diagonal: the window changed the frames, not their timing.
# * "Before KD" is the run's own student before its first step, so before/after shows what
#   training changed. On the demo the 10 s window alone moved the encoder's states off the
#   teacher's, and distillation brought them back about half way (the cosine gap and the DTW
#   distance both about halved).
#
# ## Exercises
#
# 1. Run chapters 05–07 and then this chapter: which clips moved most under KD, and does the
#    trained projector bring the projected student closer to the teacher than the raw student?
# 2. Change `seed` and redraw the t-SNE and UMAP frame maps. Which features of the pictures survive
#    the new seed, and which do not? What does that say about reading cluster positions?
# 3. Build a student with its own, shallower encoder (`kdlib.models.student_from_teacher(teacher,
#    encoder_layers=2)`) and compare its DTW distances to the teacher with those of `distil-base`.
