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
# # 09 · Search and ablations
#
# A distillation paper makes two kinds of claims: *the method works* (main experiment) and *each
# part of it matters* (ablations). Reviewers accept them only under a protocol that keeps the two
# apart. The thesis follows the ICML practice:
#
# | | main experiment | ablations |
# |---|---|---|
# | purpose | best-performing full model | contribution of each component |
# | hyperparameter search | allowed, on the dev split | none |
# | settings | tuned to one configuration | frozen to the main configuration |
# | what changes | loss weights, temperature, learning rate… | one component at a time |
# | fairness | best achievable under dev tuning | same seed, data and steps |
#
# ## What this chapter teaches
#
# How to turn that table into code with `kdlib.tune`:
#
# 1. an **Optuna study** (TPE sampler, median pruner, SQLite storage that survives a kill) tunes
#    the main configuration and writes `best_params.json`;
# 2. the **main pipeline** reads those parameters and is frozen;
# 3. each **ablation** is a declared config diff from it; the runner trains and evaluates main and
#    ablations with the same seed, data and steps and writes the ablation table;
# 4. an **overfitting monitor** watches for the failure the thesis calls *objective overfitting*:
#    auxiliary losses that keep falling while dev WER does not.
#
# ## What it needs
#
# No earlier chapter's output: every run here is trained from scratch, with the trainer
# of `kdlib.train` and the evaluation of `kdlib.evaluate` (chapter 08). At the default `demo` size
# (real whisper-base teacher, the student built from it with a 10 s encoder window, embedded
# Italian corpus, CPU) the runs are a
# couple of steps long, so the numbers show the *machinery*, not which component wins; the
# parameters cell gives the thesis-scale values. With `preset = "smoke"` the models are tiny and
# random.

# %% tags=["parameters"]
preset = "demo"  # "smoke": tiny random models, seconds per run; "demo": whisper-base on CPU; thesis: "thesis"
n_trials = 3  # trials of the study; thesis: 50 (the pilot's warm-up; 50-100 for a production search)
steps = 2  # training steps per stage in every run; thesis: None (the preset's 8,000)
search_stages = [1]  # stages each trial trains; thesis: [1, 2] (KD and alignment weights together)
stages = [1, 2]  # the main pipeline; thesis: [1, 2, 3]
seeds = [0]  # seeds per ablation row (mean ± std when several); thesis: [0, 1, 2]
ablations = ["no_geodesic", "no_stage_2"]  # thesis: all seven, list(tune.ABLATIONS)
batch_sizes = [2, 4]  # the search's batch-size choices; thesis: [4, 8, 16, 32]
max_train_utterances = 8  # thesis: None (all of MLS Italian)
max_dev_utterances = 4  # dev clips for the dev loss during training; thesis: None (whole dev split)
eval_limit = 4  # dev/test clips decoded per row of the ablation table; thesis: None (whole splits)
max_new_tokens = 48  # decoding cap per clip (our clips have at most 20 words); thesis: 224 (Whisper's)
startup_trials = 1  # median pruner: finished trials before it prunes; thesis: 5
out_dir = "../runs/09_search_and_ablations"  # figures, tables and runs of this chapter; thesis: the same

# %%
import json
import logging
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display
from matplotlib.ticker import MaxNLocator
from optuna.trial import TrialState

from kdlib import tune
from kdlib.config import make_config
from kdlib.files import atomic_write_json
from kdlib.models import TINY_RANDOM

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
timings: dict[str, float] = {}
# Everything a run needs that is not searched: the same for every trial and every ablation row.
run_overrides = {} if steps is None else {
    "max_steps": steps, "warmup_steps": max(1, steps // 4), "eval_every": max(1, steps // 2),
    "save_every": steps, "max_train_utterances": max_train_utterances,
    "max_dev_utterances": max_dev_utterances,
    "eval_wer": False,  # no decoding during training: the table decodes dev and test at the end
}
# Tiny random models (smoke, thesis-tiny) never emit end-of-text, so every clip runs to the cap:
# keep it tiny there.
decode_tokens = min(max_new_tokens, 8) if make_config(preset).teacher in TINY_RANDOM else max_new_tokens
print(f"preset {preset}; per run: {run_overrides or 'the preset as it is'}")

# %% [markdown]
# ## 1 · The search space
#
# The study starts from a base pipeline (here stage I only: knowledge distillation) and samples,
# per trial, the parameters the thesis pilot searched. Loss weights and the learning rate are
# sampled **log-uniformly**: a weight of 0.01 and one of 0.1 are as different as 1 and 10. The
# temperature is uniform in [1, 5]: above T = 5 the teacher's distribution is over-smoothed, close
# to flat over 51 865 tokens, and stops saying which tokens it confuses. The LoRA rank comes
# with α = 2r so that it changes capacity, not the size of the update. A parameter is sampled
# only if a stage of the study uses it: `geo_weight` needs stage II, so it is absent here and
# present with `search_stages = [1, 2]`.

# %%
base = tune.pipeline(preset, search_stages, overrides=run_overrides)
space = tune.SearchSpace(batch_size=tuple(batch_sizes))
objective = tune.default_objective(preset)
for name, values in space.to_dict().items():
    print(f"{name:12s} {values}")
print(f"\nobjective: {objective} (minimised); trials train stages {search_stages}")

# %% [markdown]
# The objective is **dev loss** (student token cross-entropy on the dev clips, teacher forcing) at
# smoke and demo size, and dev WER at thesis size (`tune.default_objective`). After two steps
# WER on four synthetic clips takes only a handful of values (one word moves it by a few points)
# and ties between trials, so neither TPE nor the pruner could rank trials on it. Dev loss moves smoothly from the first step and needs no
# decoding. On thousands of MLS dev clips WER is fine-grained, and it is the number we report, so
# the thesis selects on it.
#
# ## 2 · The study
#
# `run_study` keeps everything in one folder: `study.db` (Optuna's SQLite storage,
# `load_if_exists=True`), one `trial_NNN/stage<k>` run folder per trial, `trials.csv` and
# `best_params.json`, rewritten after every finished trial. If the process is killed, rerunning
# the same call keeps the finished trials, runs the interrupted one again with the same
# parameters in the same folder (its training resumes from the last checkpoint) and stops when
# `n_trials` trials have finished in total. The trainer calls back after every dev evaluation;
# the callback reports the dev loss to the median pruner, which stops a trial that is worse than
# the median of the earlier trials at the same step.

# %%
study_dir = out / f"study_{preset}"
started = time.perf_counter()
study = tune.run_study(base, study_dir, n_trials=n_trials, space=space, objective=objective, seed=0,
                       startup_trials=startup_trials)
timings["study_s"] = round(time.perf_counter() - started, 1)
print(f"{timings['study_s']} s; files: {sorted(p.name for p in study_dir.iterdir())}")

# %% [markdown]
# One line per trial: its state, its dev loss and the parameters TPE chose. The first trials of a
# TPE study are random draws (TPE needs a few observations before it can model good and bad
# regions), so with three trials this is a seeded random search; the model-based part starts to
# matter after about ten. Run the cell again and nothing trains: the study already has its
# `n_trials` finished trials.
#
# The pruner sees the dev loss at every evaluation of every trial. On the left, each trial's
# curve; on the right, the objective of each trial and the best so far.

# %%
fig, (ax_curves, ax_best) = plt.subplots(1, 2, figsize=(11, 4))
for t in study.trials:
    if t.intermediate_values:
        xs, ys = zip(*sorted(t.intermediate_values.items()))
        ax_curves.plot(xs, ys, marker="o", label=f"trial {t.number} ({t.state.name.lower()})")
ax_curves.set_xlabel("training step")
ax_curves.set_ylabel(f"{objective} (nats per token)" if objective == "dev_loss" else "dev WER (fraction)")
ax_curves.set_title("What the pruner sees: dev metric at each evaluation")
ax_curves.legend(fontsize=8)
done = [t for t in study.trials if t.state == TrialState.COMPLETE]
numbers = [t.number for t in done]
values = [t.value for t in done]
ax_best.plot(numbers, values, "o", label="trial")
ax_best.step(numbers, np.minimum.accumulate(values), where="post", label="best so far")
ax_best.set_xlabel("trial number")
ax_best.set_ylabel(f"final {objective}")
ax_best.set_title("Objective per finished trial")
ax_best.legend()
for ax in (ax_curves, ax_best):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
fig.tight_layout()
fig.savefig(out / "study.png", dpi=120)
plt.show()

# %% [markdown]
# Each curve is one trial's dev loss over its steps (with `steps = 2`, one evaluation at step 1 and
# one at step 2). In our demo run trial 1 was pruned at its first evaluation: its dev loss at step
# 1 (0.789<!-- results: trials.1.first_eval -->) was above the median of the finished trials at that step (trial 0 alone: 0.774<!-- results: trials.0.first_eval -->), so its
# second step was never trained. Trial 2<!-- results: best_trial -->, with the largest learning rate (9e-4) and KL weight
# (1.3<!-- results: trials.2.params.kl_weight -->), ended lowest (0.738<!-- results: trials.2.value --> against 0.749<!-- results: trials.0.value -->) and is the best trial. Two steps are far too few to
# trust such a ranking; the point is that the pruner acts on every evaluation, which at thesis
# scale (one evaluation every 500 steps) stops a bad trial thousands of steps early.
#
# ## 3 · The main experiment reads the best parameters
#
# `best_params.json` holds the best trial's parameters and the config overrides they become.
# `tune.pipeline` applies them stage by stage, and leaves the weight of a term that a stage
# switches off at zero: a KL weight found for stage I does not switch KL on in stage II.

# %%
best = json.loads((study_dir / "best_params.json").read_text())
print(f"best trial {best['trial']}: {best['objective']} {best['value']:.4f}")
print(json.dumps(best["overrides"], indent=1))
best_overrides = tune.load_best_params(study_dir)
main = tune.pipeline(preset, stages, overrides={**run_overrides, **best_overrides})
for config in main:
    print(f"stage {config.stage}: kl_weight {config.kl_weight:.4g}, geo_weight {config.geo_weight:.4g}, "
          f"T {config.temperature:.3g}, lr {config.lr:.3g}, lora_r {config.lora_r}, batch {config.batch_size}")

# %% [markdown]
# Stage I carries the tuned KL weight and temperature; stage II keeps its KL weight at 0 and its
# preset geodesic weight (the study did not train stage II; with `search_stages = [1, 2]` it
# would tune that weight too). Learning rate, rank and batch size apply to every stage.
#
# From here on this pipeline is **frozen**. The ablation runner writes it to `protocol.json` in its
# folder and refuses to run a different main configuration there, so one table never mixes the
# ablations of two mains.
#
# ## 4 · Ablations are config diffs
#
# Every ablation changes one component, declared in `tune.ABLATIONS`. The change is applied to the
# stages where the component is on (KL lives in stages I and III, the geodesic term in stage II);
# "no stage II" removes the stage, and stage III then starts from stage I's adapter. Here are all
# seven, against the full thesis pipeline (I → II → III) and against the pipeline of this run
# (no training, just the diffs):

# %%
full = tune.pipeline(preset, [1, 2, 3], overrides={**run_overrides, **best_overrides})
for name, ablation in tune.ABLATIONS.items():
    diff = tune.describe_diff(tune.ablation_diff(full, tune.apply_ablation(full, name)))
    try:
        here = tune.describe_diff(tune.ablation_diff(main, tune.apply_ablation(main, name)))
    except tune.AblationError as err:
        here = f"does not apply ({str(err).split(': ', 1)[1]})"
    print(f"{ablation.label:25s} I→II→III: {diff}\n{'':25s} stages {stages}: {here}")

# %% [markdown]
# Each row names exactly the field it changes, and `tests/test_tune.py` checks that every
# ablated config differs from the main one in exactly its declared fields. One ablation needs two
# fields: stage III decays the contrastive weight linearly towards `contrastive_final_weight`
# (0.1), so "no contrastive" with only `contrastive_weight = 0` would make that weight *rise*
# from 0 to 0.1; its end point goes too. An ablation that changes nothing in a pipeline (no
# geodesic term without stage II) is skipped and reported, never run as a copy of main.
#
# ## 5 · The ablation table
#
# `run_ablations` trains main and each ablation with every seed, then decodes dev and test with
# the final stage of each (greedy, Whisper's basic normaliser). Run folders are named by a hash of
# their config and of the run they start from, so pipelines that share stages share runs: "no
# geodesic" reuses main's stage I, and "no stage II" *is* main's stage I. A rerun trains nothing
# that exists.

# %%
started = time.perf_counter()
result = tune.run_ablations(
    main, out / f"ablations_{preset}", ablations=ablations, seeds=seeds,
    eval_kwargs={"limit": eval_limit, "max_new_tokens": decode_tokens},
)
timings["ablations_s"] = round(time.perf_counter() - started, 1)
print(f"{timings['ablations_s']} s; {len(result.runs)} pipelines, "
      f"{len({r['run_dir'] for r in result.runs})} distinct final runs; skipped: {result.skipped or 'none'}")
display(Markdown(result.markdown()))

# %% [markdown]
# WER and CER are in %, Δ is the row minus main (percentage points; for the dev loss, nats per
# token), and with several seeds each cell reads mean ± std. At this size, two steps per stage on
# eight clips, the table says little about the components. In our demo run main decodes the dev
# clips at 36<!-- results: ablations.main.dev_wer *100 --> % WER, "no geodesic" at 41<!-- results: ablations.no_geodesic.dev_wer *100 --> % and "no stage II" at 51<!-- results: ablations.no_stage_2.dev_wer *100 --> %, but on the test clips "no stage
# II" is the best row, 73<!-- results: ablations.no_stage_2.test_wer *100 ~1 --> % against main's 80<!-- results: ablations.main.test_wer *100 ~1 --> %: a few clips and a few steps, and the ranking
# flips between splits. The dev loss moves little: "no geodesic" ends 0.02<!-- results: ablations.no_geodesic.delta_dev_loss *-1 --> nats below main, and
# "no stage II" ends 0.11<!-- results: ablations.no_stage_2.delta_dev_loss --> higher, because its pipeline stops after stage I. Its dev loss,
# 0.738<!-- results: ablations.no_stage_2.dev_loss --><!-- results: trials.2.value ~0.0005 -->, is also exactly the best trial's: same config, seed and data give the same run. What the
# table shows is the protocol: same seed, data and steps per stage in every row, one declared
# change per row, Δ against the frozen main. The chart draws the same numbers:

# %%
display(Image(filename=str(result.paths["figure"])))

# %% [markdown]
# Dev and test WER per row with error bars (one seed here: zero-length bars), main's dev WER as a
# dashed line; on the right the dev loss at the end of each pipeline, main's as a dashed line.
#
# ## 6 · Objective overfitting
#
# In plain supervised training the dev loss guards against memorising the training set. In
# multilingual KD the thesis names a second risk: the student gets ever better at the *surrogate*
# objectives (KL to the teacher, geodesic and contrastive alignment) while decoding does not get
# better. `tune.OverfitMonitor` flags that: after `patience` evaluations without a dev
# improvement, if the auxiliary losses have still fallen since the best evaluation, it logs a
# warning and halves a suggested factor for the auxiliary weights. A synthetic history shows the
# rule (our two-step runs have too few evaluations for it to say anything):

# %%
monitor = tune.OverfitMonitor(patience=3, decay=0.5)
evals = np.arange(1, 16)
dev_wer = np.concatenate([0.9 - 0.08 * evals[:6], 0.42 + 0.01 * np.abs(np.sin(evals[6:]))])  # improves, then stalls
aux = 3.0 * np.exp(-0.15 * evals)  # surrogate losses keep falling
# In a run the monitor logs each flag as a warning; for this synthetic history the flags are
# printed as plain lines below instead
tune_log = logging.getLogger(tune.__name__)
saved_level = tune_log.level
tune_log.setLevel(logging.ERROR)
events = [monitor.observe(int(s * 100), float(d), float(a)) for s, d, a in zip(evals, dev_wer, aux)]
tune_log.setLevel(saved_level)
for event in filter(None, events):
    print(event["message"])
flags = [e["step"] for e in events if e]
fig, ax = plt.subplots(figsize=(7, 3.8))
ax.plot(evals * 100, 100 * dev_wer, "o-", label="dev WER (%)")
ax.set_xlabel("training step")
ax.set_ylabel("dev WER (%)")
ax2 = ax.twinx()
ax2.plot(evals * 100, aux, "s--", color="tab:red", label="auxiliary losses")
ax2.set_ylabel("auxiliary loss (nats)")
for step in flags:
    ax.axvline(step, color="k", lw=0.8, ls=":")
ax.set_title("Objective overfitting: flags (dotted) on a synthetic history")
ax.legend(ax.get_lines()[:1] + ax2.get_lines(), ["dev WER (%)", "auxiliary losses"], loc="upper right")
fig.tight_layout()
fig.savefig(out / "overfit_monitor.png", dpi=120)
plt.show()
print(f"flagged at steps {flags}; suggested auxiliary weight factor {monitor.factor}")
monitor_result = {"flags": flags, "factors": [e["factor"] for e in events if e], "floor": monitor.min_factor}

# %% [markdown]
# Dev WER stops improving at step 600 while the auxiliary losses keep falling: the monitor flags
# three evaluations later (step 900<!-- results: monitor.flags.0 -->) and again every three evaluations while this goes on; the
# suggested factor halves each time, 1 → 0.5<!-- results: monitor.factors.0 --> → 0.25<!-- results: monitor.factors.1 --> → 0.125<!-- results: monitor.factors.2 -->, down to its floor of 0.1<!-- results: monitor.floor -->.
# `tune.run_pipeline(..., monitor=monitor)` applies it to the stages that follow
# (`monitor.decayed(config)`), which is the stage-wise reweighting the thesis proposes; the
# ablation runner never does, because its configs are frozen, but it replays every run's
# `training_history.json` through a monitor and counts the flags in the table's `overfit_flags`
# column. Finally, what this run took:

# %%
timings["total_s"] = round(timings["study_s"] + timings["ablations_s"], 1)
atomic_write_json(out / f"timings_{preset}.json", timings)
print(timings)
# results.json: the study's trials and the ablation rows, what the prose above states.
results = {
    "preset": preset, "steps": steps, "seeds": seeds,
    "trials": {str(t.number): {"state": t.state.name.lower(), "value": t.value, "params": t.params,
                               "first_eval": t.intermediate_values[min(t.intermediate_values)] if t.intermediate_values else None}
               for t in study.trials},
    "best_trial": study.best_trial.number,
    "ablations": {row["ablation"]: {k: v for k, v in row.items() if k not in ("ablation", "change")} for row in result.rows},
    "dev_clips": eval_limit,
    "monitor": monitor_result,
}
atomic_write_json(out / "results.json", results)

# %% [markdown]
# ## Summary
#
# * Main experiment and ablations follow different rules: search only for the main configuration,
#   on dev; ablations run the frozen main configuration with one declared change, same seed,
#   data and steps.
# * `tune.run_study`: TPE (seeded), median pruner on dev values reported after every evaluation,
#   SQLite storage inside the study folder; a killed study resumes, keeps its finished trials and
#   reruns the interrupted one from its checkpoint. The objective is dev loss at demo size (WER on
#   a few synthetic clips is too coarse) and dev WER at thesis size.
# * Loss weights and learning rate are searched log-uniformly, T in [1, 5] (above 5 the teacher's
#   distribution is over-smoothed), the LoRA rank with α = 2r.
# * `best_params.json` → `tune.load_best_params` → `tune.pipeline`: the main experiment reads the
#   search's result, stage by stage, without switching on terms a stage has off.
# * `tune.ABLATIONS` are config diffs; the runner shares identical stages between rows, writes
#   CSV, markdown and a bar chart, with mean ± std when several seeds are asked for.
# * `tune.OverfitMonitor` flags auxiliary losses that fall while dev does not improve, and
#   suggests a decay factor for the auxiliary weights.
#
# ## Exercises
#
# 1. Kill the study cell while a trial is running (interrupt the kernel, or run `run_study` from a
#    terminal and `kill -9` it), then run the cell again. Which trials does `trials.csv` list, in
#    which states, and which folder does the rerun train in?
# 2. Set `search_stages = [1, 2]` and `n_trials = 6`. Which new parameter appears, how much longer
#    does a trial take, and does the best `kl_weight` change?
# 3. Run all seven ablations with `seeds = [0, 1, 2]` and `steps = 20`. Which rows differ from main
#    by more than one standard deviation? Which would you still call noise?
