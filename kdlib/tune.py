"""Hyperparameter search (Optuna), the ablation protocol as code, and the objective-overfitting
monitor.

The ICML protocol the thesis follows: the **main experiment** may be tuned on the dev split;
**ablations** may not. Each ablation takes the frozen main configuration and changes one component
(a loss term, a module, a modelling assumption), with the same seed, data and steps. Here:

1. `run_study` searches the main configuration: Optuna's TPE sampler (seeded), a `MedianPruner`
   fed with the dev metric at every evaluation, and a SQLite file inside the study folder
   (``sqlite:///<study_dir>/study.db``, ``load_if_exists=True``), so a study that is killed
   continues where it stopped: finished trials are kept and a trial that was running is run
   again with the same parameters, resuming its training from the last checkpoint. The best
   parameters go to ``best_params.json``; `load_best_params` turns them into overrides for
   `kdlib.config.make_config` (the main experiment).
2. `ABLATIONS` lists the ablations, each a declared config diff (`Ablation`); `apply_ablation`
   builds the ablated pipeline and `run_ablations` trains main + ablations, evaluates them on dev
   and test and writes the ablation table (CSV, markdown, bar chart).
3. `OverfitMonitor` watches for *objective overfitting*: the auxiliary (surrogate) losses keep
   falling while the dev metric stopped improving, i.e. the student gets better at imitating the
   teacher's representations without decoding any better. It logs the event and suggests a decay
   factor for the auxiliary weights.

A *pipeline* is the list of stage configs a run goes through (e.g. stages I → II → III), each
stage starting from the previous stage's folder (``init_from``); `pipeline` builds one from a
preset. Trainer and evaluation come from `kdlib.train` and `kdlib.evaluate`; this module is the
top layer and nothing in kdlib imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from kdlib.config import STAGE_TERMS, TERM_WEIGHTS, TrainConfig, make_config, replace
from kdlib.evaluate import evaluate_run_dir, write_csv
from kdlib.files import atomic_write_json, atomic_write_text
from kdlib.progress import progress_bar
from kdlib.runs import load_history
from kdlib.train import TrainingDiverged, run_stage as train_run_stage, train


log = logging.getLogger("kdlib.tune")

BEST_PARAMS = "best_params.json"
STUDY_DB = "study.db"
OBJECTIVES = ("dev_loss", "dev_wer")
# Fields that say where a run lives, not what it does: ignored when configs are compared.
LOCATION_FIELDS = ("run_dir", "init_from")


# ================================================================================================
# Pipelines of stages
# ================================================================================================


def stage_overrides(overrides: dict[str, Any], stage: int) -> dict[str, Any]:
    """`overrides` without the loss weights of terms that `stage` switches off.

    `make_config` sets the weight of every term a stage does not use to 0, and an explicit
    override switches it back on (that is how a deliberate "KL in stage II" would be written).
    Tuned parameters must not do that by accident: a ``geo_weight`` found for stage II is not
    meant to add a geodesic term to stage I. So weights of terms outside
    `kdlib.config.STAGE_TERMS` ``[stage]`` are dropped; every other field passes unchanged.
    """
    off = {weight for term, weight in TERM_WEIGHTS.items() if term not in STAGE_TERMS[stage]}
    return {name: value for name, value in overrides.items() if name not in off}


def pipeline(preset: str = "demo", stages: Sequence[int] = (1, 2, 3),
             overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> list[TrainConfig]:
    """One `TrainConfig` per stage: ``make_config(preset, stage, stage_overrides(overrides, stage))``.

    The configs carry no folders yet: the runners give each stage its folder and point
    ``init_from`` at the previous stage's. ``sets`` (``"field=value"`` strings) apply to every stage
    as they are.
    """
    if not stages:
        raise ValueError("pipeline: give at least one stage")
    return [make_config(preset, stage=s, overrides=stage_overrides(overrides or {}, s), sets=sets)
            for s in stages]


def config_diff(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two configs (``to_dict()`` compared), as
    ``{field: (a_value, b_value)}``; the folder fields (``run_dir``, ``init_from``) are ignored."""
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db[k]) for k in da if k not in LOCATION_FIELDS and da[k] != db[k]}


def _identity(config: TrainConfig, upstream: str | None = None) -> dict[str, Any]:
    values = config.to_dict()
    values["run_dir"] = None
    values["init_from"] = upstream
    return values


def _config_key(config: TrainConfig, upstream: str | None) -> str:
    text = json.dumps(_identity(config, upstream), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_stage(config: TrainConfig, run_dir: str | Path, *, train_fn: Callable | None = None,
              on_eval: Callable | None = None, quiet: bool = True, progress: bool = False) -> dict:
    """`kdlib.train.run_stage` with the runners' defaults: quiet (the trainer's printout goes to
    ``<run_dir>/train.log``), no progress bar, and the folder fields (``run_dir``,
    ``init_from``) left out of the same-config check, since pipeline folders are keyed by their
    upstream. A folder holding another config raises (a `ValueError` naming the fields)."""

    return train_run_stage(config, run_dir, train_fn=train_fn or train, on_eval=on_eval,
                           quiet=quiet, progress=progress, ignore=LOCATION_FIELDS)


def run_pipeline(configs: Sequence[TrainConfig], root: str | Path, *, train_fn: Callable | None = None,
                 monitor: Optional["OverfitMonitor"] = None, quiet: bool = True,
                 progress: bool = False) -> list[tuple[Path, dict]]:
    """Train the stages in order, each in ``<root>/stage<k>-<hash>``; returns ``[(run_dir, summary)]``.

    Folders are named by a hash of the stage's config and of the folder it starts from, so two
    pipelines that share their first stages (main and "no geodesic" share stage I) train those
    stages once, and a rerun after an interruption trains only what is missing.

    With a `monitor`, the stage schedule reacts to objective overfitting: each finished stage's
    history is fed to the monitor, and the auxiliary weights of the stages after it are multiplied
    by ``monitor.factor`` (see `OverfitMonitor.decayed`). The ablation protocol never passes one:
    its configs are frozen.
    """
    root = Path(root)
    results: list[tuple[Path, dict]] = []
    upstream: Optional[Path] = None
    for config in configs:
        if monitor is not None:
            config = monitor.decayed(config)
        key = _config_key(config, upstream.name if upstream else None)
        run_dir = root / f"stage{config.stage}-{key}"
        config = replace(config, init_from=str(upstream.resolve()) if upstream else None, run_dir=None)
        summary = run_stage(config, run_dir, train_fn=train_fn, quiet=quiet, progress=progress)
        if monitor is not None:
            monitor.reset()
            monitor.observe_history(load_history(run_dir, missing_ok=True), label=run_dir.name)
        results.append((run_dir, summary))
        upstream = run_dir
    return results


# ================================================================================================
# 1. Search: Optuna study
# ================================================================================================


@dataclass
class SearchSpace:
    """What a study searches. Ranges follow the thesis pilot (seed notes: loss weights
    log-uniform 1e-3..1e1, lr log-uniform 1e-5..1e-3, batch sizes 4-32).

    A parameter is suggested only when a stage of the study uses it: ``kl_weight`` and
    ``temperature`` with stage I or III (the KD term), ``geo_weight`` with stage II; ``lr``,
    ``lora_r`` and ``batch_size`` always. ``lora_alpha`` follows the rank (α = 2r, the presets'
    ratio) so that the rank changes the adapter's capacity, not the size of its update.
    """

    kl_weight: tuple[float, float] = (1e-3, 10.0)  # log-uniform
    geo_weight: tuple[float, float] = (1e-3, 10.0)  # log-uniform
    # Uniform in [1, 5]: above T = 5 the teacher's distribution is over-smoothed (nearly flat over
    # the vocabulary), and the soft labels stop carrying which tokens the teacher confuses.
    temperature: tuple[float, float] = (1.0, 5.0)
    lr: tuple[float, float] = (1e-5, 1e-3)  # log-uniform
    lora_r: tuple[int, ...] = (4, 8, 16, 32)
    batch_size: tuple[int, ...] = (4, 8, 16, 32)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}


def suggest(trial, space: SearchSpace, stages: Sequence[int]) -> dict[str, Any]:
    """Ask `trial` (an `optuna.Trial`) for the parameters that matter to `stages`."""
    terms = {t for s in stages for t in STAGE_TERMS[s]}
    params: dict[str, Any] = {}
    if "kl" in terms:
        params["kl_weight"] = trial.suggest_float("kl_weight", *space.kl_weight, log=True)
        params["temperature"] = trial.suggest_float("temperature", *space.temperature)
    if "geo" in terms:
        params["geo_weight"] = trial.suggest_float("geo_weight", *space.geo_weight, log=True)
    params["lr"] = trial.suggest_float("lr", *space.lr, log=True)
    params["lora_r"] = trial.suggest_categorical("lora_r", list(space.lora_r))
    params["batch_size"] = trial.suggest_categorical("batch_size", list(space.batch_size))
    return params


def params_to_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled parameters → config overrides (adds ``lora_alpha = 2 * lora_r``)."""
    overrides = dict(params)
    if "lora_r" in overrides:
        overrides["lora_alpha"] = 2 * int(overrides["lora_r"])
    return overrides


def default_objective(preset: str) -> str:
    """``dev_loss`` for smoke/demo, ``dev_wer`` for thesis runs.

    At smoke/demo size a trial is a few steps and the dev split 4-20 synthetic clips: every
    student still decodes mostly wrong words, so WER is coarse (a few values, often above 100 %
    from repetitions) and ties between trials; the pruner cannot rank trials on it early in a run.
    Dev loss (student token cross-entropy on dev, teacher forcing) moves smoothly from the first
    steps and is cheap (no decoding). At thesis scale (thousands of dev clips, 8,000 steps) WER is
    fine-grained and is what we report, so we select on it.
    """
    return "dev_wer" if preset == "thesis" else "dev_loss"


def storage_url(study_dir: str | Path) -> str:
    """``sqlite:///<absolute study_dir>/study.db``."""
    return f"sqlite:///{(Path(study_dir).resolve() / STUDY_DB)}"


@contextlib.contextmanager
def _study_lock(study_dir: Path):
    """One process per study folder. The lock dies with its process (also on SIGKILL), so a
    trial still marked RUNNING when the lock is free was left by a killed process."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; run one process per folder by hand
        yield
        return
    path = study_dir / "study.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"{path}: another process is running this study; wait for it to "
                               "finish or use another folder") from None
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _eval_callback(trial, objective: str, offset: int, reported: set[int]) -> Callable:
    """The trainer's ``on_eval(step, metrics)``: report the dev metric at global step
    ``offset + step`` and raise `optuna.TrialPruned` when the pruner says so."""
    import optuna

    def on_eval(step: int, metrics: dict) -> None:
        value = metrics.get(objective)
        if value is None or not math.isfinite(float(value)):
            return
        at = offset + int(step)
        if at not in reported:
            trial.report(float(value), at)
            reported.add(at)
        if trial.should_prune():
            raise optuna.TrialPruned(f"trial {trial.number}: {objective} {float(value):.4f} at step "
                                     f"{at} is worse than the median of earlier trials")

    return on_eval


def _study_identity(base: Sequence[TrainConfig], objective: str, space: SearchSpace) -> dict[str, Any]:
    return {"pipeline": [_identity(c) for c in base], "objective": objective, "space": space.to_dict()}


def _check_identity(study, wanted: dict[str, Any], study_dir: Path) -> None:
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", json.loads(json.dumps(wanted, default=str)))
        return
    wanted = json.loads(json.dumps(wanted, default=str))
    if stored == wanted:
        return
    problems = []
    if stored["objective"] != wanted["objective"]:
        problems.append(f"objective {stored['objective']!r} there, {wanted['objective']!r} now")
    if stored["space"] != wanted["space"]:
        problems.append("another search space")
    old, new = stored["pipeline"], wanted["pipeline"]
    if [c["stage"] for c in old] != [c["stage"] for c in new]:
        problems.append(f"stages {[c['stage'] for c in old]} there, {[c['stage'] for c in new]} now")
    else:
        for a, b in zip(old, new):
            problems += [f"stage {a['stage']} {k}: {a[k]!r} there, {b[k]!r} now"
                         for k in a if a[k] != b.get(k)]
    raise ValueError(f"{study_dir / STUDY_DB}: this study was made with other settings ("
                     + "; ".join(problems) + "); use another study folder")


def _finished(study) -> tuple[int, int]:
    from optuna.trial import TrialState

    complete = sum(t.state == TrialState.COMPLETE for t in study.trials)
    pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
    return complete, pruned


def _revive_stale_trials(study) -> list[int]:
    """Trials left RUNNING by a killed process: marked FAIL, their parameters queued again (the
    new trial runs in the old trial's folder, so its training resumes from the checkpoint)."""
    from optuna.trial import TrialState

    revived = []
    for t in study.trials:
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
            origin = t.user_attrs.get("resumes", t.number)
            study.enqueue_trial(t.params, user_attrs={"resumes": origin})
            revived.append(t.number)
    return revived


def write_best_params(study, path: str | Path, *, stages: Sequence[int] | None = None) -> Optional[dict]:
    """Write the best finished trial to ``best_params.json`` (atomically); returns what was
    written, or None while no trial has finished."""

    complete, pruned = _finished(study)
    if complete == 0:
        return None
    best = study.best_trial
    payload = {
        "study": study.study_name,
        "objective": study.user_attrs.get("identity", {}).get("objective"),
        "value": best.value,
        "trial": best.number,
        "params": best.params,
        "overrides": params_to_overrides(best.params),
        "stages": list(stages) if stages is not None else None,
        "n_complete": complete,
        "n_pruned": pruned,
        "run_dir": best.user_attrs.get("run_dir"),
    }
    atomic_write_json(Path(path), payload)
    return payload


def load_best_params(path: str | Path, stage: int | None = None) -> dict[str, Any]:
    """Overrides from a study's ``best_params.json`` (or the study folder holding it), ready for
    ``make_config(preset, stage, overrides=...)`` or `pipeline`.

    With `stage`, the weights of loss terms that stage switches off are left out (see
    `stage_overrides`): pass it when you call `make_config` yourself; `pipeline` does it for you.
    """
    path = Path(path)
    if path.is_dir():
        path = path / BEST_PARAMS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no best parameters yet; run the study first (tune.run_study)")
    try:
        payload = json.loads(path.read_text())
        overrides = dict(payload["overrides"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a best_params.json written by tune.run_study ({err})") from None
    return stage_overrides(overrides, stage) if stage is not None else overrides


def run_study(base: TrainConfig | Sequence[TrainConfig], study_dir: str | Path, *, n_trials: int = 20,
              space: SearchSpace | None = None, objective: str = "auto", seed: int = 0,
              startup_trials: int = 5, warmup_steps: int = 0, study_name: str = "kdlib",
              train_fn: Callable | None = None, quiet: bool = True, progress: bool = False):
    """Search `space` around the `base` pipeline until `n_trials` trials have finished.

    Args:
        base: the stage config(s) each trial starts from (`pipeline` or one `TrainConfig`); a
            trial changes only the sampled parameters (weights of terms a stage switches off stay 0).
        study_dir: the study's folder: ``study.db`` (Optuna's SQLite storage), ``trial_NNN/stage<k>``
            (each trial's run folders), ``best_params.json``, ``trials.csv``.
        n_trials: trials to *finish* (complete or pruned) in total, counting earlier runs of the
            same study: rerunning the same call after a kill completes the study, it does not add
            n_trials more.
        objective: ``"dev_loss"``, ``"dev_wer"`` or ``"auto"`` (`default_objective` of the preset);
            minimised. The trials evaluate dev WER only when it is the objective.
        seed: TPE's seed. A resumed study reseeds with ``seed + trials so far`` so that it does not
            replay the first trials' random draws; an uninterrupted study is reproducible.
        startup_trials, warmup_steps: `optuna.pruners.MedianPruner`'s ``n_startup_trials`` (trials
            before pruning starts) and ``n_warmup_steps`` (steps of a trial before it can be
            pruned); thesis pilot: 5 and 100.

    Pruning: the trainer calls back after every dev evaluation (``train(..., on_eval=)``); the
    callback reports the objective at the pipeline's global step (stage offsets added) and raises
    `optuna.TrialPruned` when the trial is below the median of earlier ones at that step. After
    each stage the stage's ``training_history.json`` fills in anything not yet reported (a trainer
    without the callback, a trial resumed after a kill) and the pruner is asked again, so a trial
    can also be stopped between stages. A trial whose training diverges
    (`kdlib.train.TrainingDiverged`) is marked failed and the search goes on.

    Returns the `optuna.Study`.
    """
    import optuna
    from optuna.trial import TrialState

    configs = [base] if isinstance(base, TrainConfig) else list(base)
    if not configs:
        raise ValueError("run_study: base pipeline is empty")
    space = space or SearchSpace()
    if objective == "auto":
        objective = default_objective(configs[0].preset)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: {objective!r} is not one of {OBJECTIVES}")
    configs = [replace(c, eval_wer=(objective == "dev_wer"), run_dir=None, init_from=None) for c in configs]
    stages = [c.stage for c in configs]
    offsets = [sum(c.max_steps for c in configs[:i]) for i in range(len(configs))]
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    if quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    with _study_lock(study_dir):
        study = optuna.create_study(
            study_name=study_name, storage=storage_url(study_dir), load_if_exists=True,
            direction="minimize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps),
        )
        _check_identity(study, _study_identity(configs, objective, space), study_dir)
        revived = _revive_stale_trials(study)
        if revived:
            print(f"study {study_dir}: trial(s) {revived} were interrupted; running them again "
                  "(their training resumes from the last checkpoint)")
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))

        def trial_objective(trial) -> float:
            started = time.perf_counter()
            params = suggest(trial, space, stages)
            overrides = params_to_overrides(params)
            number = int(trial.user_attrs.get("resumes", trial.number))
            trial_dir = study_dir / f"trial_{number:03d}"
            trial.set_user_attr("run_dir", str(trial_dir))
            reported: set[int] = set()
            upstream: Optional[Path] = None
            summary: dict = {}
            for config, offset in zip(configs, offsets):
                config = replace(config, **stage_overrides(overrides, config.stage),
                                 init_from=str(upstream.resolve()) if upstream else None)
                run_dir = trial_dir / f"stage{config.stage}"
                on_eval = _eval_callback(trial, objective, offset, reported)
                summary = run_stage(config, run_dir, train_fn=train_fn, on_eval=on_eval, quiet=quiet,
                                    progress=progress)
                for record in load_history(run_dir, missing_ok=True):  # what the callback did not see
                    on_eval(record["step"], record)
                upstream = run_dir
            value = summary.get(objective)
            if value is None:
                raise RuntimeError(f"{upstream}: the run has no {objective} (no dev evaluation?)")
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
            trial.set_user_attr("final_ce", summary.get("final_ce"))
            return float(value)

        def after_trial(study, trial) -> None:
            write_best_params(study, study_dir / BEST_PARAMS, stages=stages)
            _write_trials_csv(study, study_dir / "trials.csv")
            if quiet:
                value = f"{trial.value:.4f}" if trial.value is not None else "-"
                shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
                took = trial.user_attrs.get("seconds")
                if took is None and trial.datetime_start and trial.datetime_complete:
                    took = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)
                at = f" at step {max(trial.intermediate_values)}" if trial.state == TrialState.PRUNED \
                    and trial.intermediate_values else ""
                print(f"trial {trial.number}: {trial.state.name.lower()}{at}, {objective} {value} "
                      f"({shown}), {took} s")

        complete, pruned = _finished(study)
        remaining = max(0, n_trials - complete - pruned)
        if remaining:
            study.optimize(trial_objective, n_trials=remaining, callbacks=[after_trial],
                           catch=(TrainingDiverged,))
        write_best_params(study, study_dir / BEST_PARAMS, stages=stages)
        _write_trials_csv(study, study_dir / "trials.csv")
    failed = sum(t.state == TrialState.FAIL for t in study.trials)
    complete, pruned = _finished(study)
    print(f"study {study_dir.name}: {complete} complete, {pruned} pruned, {failed} failed or interrupted")
    return study


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _write_trials_csv(study, path: Path) -> None:
    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     **{f"param_{k}": v for k, v in t.params.items()},
                     "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                     "resumes": t.user_attrs.get("resumes"), "seconds": t.user_attrs.get("seconds")})
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    write_csv(path, rows, columns)


# ================================================================================================
# 2. Ablations: the ICML protocol as code
# ================================================================================================


class AblationError(ValueError):
    """An ablation does not apply to a pipeline (it would change nothing, or removes a stage the
    pipeline does not have)."""


@dataclass(frozen=True)
class Ablation:
    """One ablation: a declared diff from the frozen main configuration.

    ``changes`` are applied to every stage whose main config has ``acts_where`` > 0 (the stages
    where the component is on; all stages when None); ``drop_stages`` removes whole stages (the
    next stage then starts from the one before the gap).
    """

    label: str
    changes: dict[str, Any] = field(default_factory=dict)
    acts_where: Optional[str] = None
    drop_stages: tuple[int, ...] = ()
    why: str = ""

    @property
    def fields(self) -> set[str]:
        return set(self.changes)


ABLATIONS: dict[str, Ablation] = {
    "no_kl": Ablation(
        "no KL", {"kl_weight": 0.0}, acts_where="kl_weight",
        why="the student learns from the reference tokens (CE) only, no soft labels"),
    "no_geodesic": Ablation(
        "no geodesic", {"geo_weight": 0.0}, acts_where="geo_weight",
        why="stage II aligns nothing point-wise; CE and contrastive remain"),
    "no_contrastive": Ablation(
        "no contrastive", {"contrastive_weight": 0.0, "contrastive_final_weight": None},
        acts_where="contrastive_weight",
        why="two fields: stage III decays the contrastive weight linearly towards "
            "contrastive_final_weight (0.1); with contrastive_weight=0 alone it would *rise* from "
            "0 to 0.1, so the end point goes too (None: constant)"),
    "mse_not_geodesic": Ablation(
        "MSE instead of geodesic", {"geo_kind": "mse"}, acts_where="geo_weight",
        why="L2 on hidden states instead of the angle on the unit sphere (radial collapse)"),
    "curve_not_point": Ablation(
        "curve instead of point", {"alignment": "curve"}, acts_where="geo_weight",
        why="align the trajectory of hidden states (velocity, curvature), not each state"),
    "no_stage_2": Ablation(
        "no stage II", drop_stages=(2,),
        why="the pipeline without stage II: stage III (if any) starts from stage I's adapter; "
            "no config field changes"),
    "taid_not_kl": Ablation(
        "TAID instead of KL", {"kd_kind": "taid"}, acts_where="kl_weight",
        why="the KD weight moves to TAID's interpolated target (logit space, adaptive t)"),
}


def apply_ablation(main: Sequence[TrainConfig], ablation: str | Ablation) -> list[TrainConfig]:
    """The main pipeline with one ablation applied; raises `AblationError` if it changes nothing."""
    ab = ABLATIONS[ablation] if isinstance(ablation, str) else ablation
    name = ablation if isinstance(ablation, str) else ab.label
    stages = [c.stage for c in main]
    missing = [s for s in ab.drop_stages if s not in stages]
    if missing:
        raise AblationError(f"{name}: the main pipeline (stages {stages}) has no stage {missing}")
    out = []
    for config in main:
        if config.stage in ab.drop_stages:
            continue
        if ab.changes and (ab.acts_where is None or getattr(config, ab.acts_where) > 0):
            config = replace(config, **ab.changes)
        out.append(config)
    if not ab.drop_stages and all(not config_diff(a, b) for a, b in zip(main, out)):
        where = f"no stage has {ab.acts_where} > 0" if ab.acts_where else "the values are already set"
        raise AblationError(f"{name}: changes nothing in the pipeline of stages {stages} ({where})")
    if not out:
        raise AblationError(f"{name}: removes every stage of the pipeline {stages}")
    return out


def ablation_diff(main: Sequence[TrainConfig], ablated: Sequence[TrainConfig]) -> dict[str, Any]:
    """What an ablated pipeline changes: ``{"fields": {field: [(stage, main, ablated), ...]},
    "stages_removed": [...]}`` (stages matched by number)."""
    by_stage = {c.stage: c for c in ablated}
    fields: dict[str, list] = {}
    for config in main:
        if config.stage in by_stage:
            for k, (a, b) in config_diff(config, by_stage[config.stage]).items():
                fields.setdefault(k, []).append((config.stage, a, b))
    return {"fields": fields, "stages_removed": [c.stage for c in main if c.stage not in by_stage]}


def _show(value: Any) -> str:
    """A config value for people: floats to 4 significant digits (``1.296``, ``0.0``)."""
    if isinstance(value, float):
        text = f"{value:.4g}"
        return text if any(c in text for c in ".en") else text + ".0"
    return repr(value)


def describe_diff(diff: dict[str, Any]) -> str:
    """``"kl_weight 1.0 → 0.0 (stages 1, 3)"``-style text for the table."""
    parts = []
    for name, changes in diff["fields"].items():
        values = {(_show(a), _show(b)) for _, a, b in changes}
        stages = ", ".join(str(s) for s, _, _ in changes)
        text = "; ".join(f"{a} → {b}" for a, b in sorted(values))
        parts.append(f"{name} {text} (stage{'s' if len(changes) > 1 else ''} {stages})")
    if diff["stages_removed"]:
        parts.append("stage " + ", ".join(str(s) for s in diff["stages_removed"]) + " removed")
    return "; ".join(parts) or "–"


def _default_evaluate(run_dir, split, **kwargs) -> dict:

    return evaluate_run_dir(run_dir, split, **kwargs)


def _evaluate_cached(evaluate_fn: Callable, run_dir: Path, split: str, kwargs: dict) -> dict:
    """Evaluate once per (run folder, split, settings): ``ablation_eval_<split>.json`` keeps it."""
    cache = run_dir / f"ablation_eval_{split}.json"
    key = json.loads(json.dumps(kwargs, sort_keys=True, default=str))
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("kwargs") == key:
            return stored["metrics"]
    metrics = evaluate_fn(run_dir, split, **kwargs)
    keep = {k: metrics.get(k) for k in ("wer", "cer", "n_utterances", "n_skipped", "normalizer")}
    atomic_write_text(cache, json.dumps({"kwargs": key, "metrics": keep}, indent=2) + "\n")
    return keep


def _mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


METRICS = ("dev_wer", "test_wer", "dev_cer", "test_cer", "dev_loss")


@dataclass
class AblationResult:
    """What `run_ablations` produced: ``rows`` (one per ablation, mean ± std over seeds),
    ``runs`` (one per ablation and seed), ``skipped`` (``{name: reason}``) and the written files."""

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    skipped: dict[str, str]
    paths: dict[str, Path]

    def markdown(self) -> str:
        return self.paths["markdown"].read_text()


def _freeze(out_dir: Path, main: Sequence[TrainConfig]) -> None:
    """The protocol: one main configuration per ablation folder. ``protocol.json`` records it
    (seed aside: seeds are rows' repetitions); a different main config in the same folder is
    refused, so no table ever mixes ablations of two mains."""
    frozen = [dict(_identity(c), seed=None) for c in main]
    frozen = json.loads(json.dumps(frozen, default=str))
    path = out_dir / "protocol.json"
    if path.is_file():
        stored = json.loads(path.read_text())["main"]
        if stored != frozen:
            problems = []
            if [c["stage"] for c in stored] != [c["stage"] for c in frozen]:
                problems.append(f"stages {[c['stage'] for c in stored]} there, {[c['stage'] for c in frozen]} now")
            else:
                for a, b in zip(stored, frozen):
                    problems += [f"stage {a['stage']} {k}: {a[k]!r} there, {b[k]!r} now" for k in a if a[k] != b.get(k)]
            raise ValueError(f"{path}: the main configuration is frozen for this folder and differs ("
                             + "; ".join(problems) + "); ablate a new main in a new folder")
        return
    atomic_write_text(path, json.dumps({"main": frozen}, indent=2) + "\n")


def run_ablations(main: Sequence[TrainConfig], out_dir: str | Path, *,
                  ablations: Iterable[str] | None = None, seeds: Sequence[int] | None = None,
                  splits: Sequence[str] = ("dev", "test"), eval_kwargs: dict[str, Any] | None = None,
                  train_fn: Callable | None = None, evaluate_fn: Callable | None = None,
                  quiet: bool = True, progress: bool = True) -> AblationResult:
    """Train and evaluate the main pipeline and each ablation; write the ablation table.

    Every row uses the main configs with only its declared diff (`ABLATIONS`), and every row runs
    with each seed in `seeds` (default: the main config's seed): same seed, data and steps. Runs
    live in ``<out_dir>/runs/`` (`run_pipeline`: shared stages are trained once; a rerun trains
    only what is missing). The last stage of each pipeline is evaluated on `splits` with
    `kdlib.evaluate.evaluate_run_dir` (``eval_kwargs``: e.g. ``limit``, ``max_new_tokens``,
    ``num_beams``). An ablation that does not apply to the pipeline (e.g. "no geodesic" without
    stage II) is skipped and counted.

    Writes ``ablation_runs.csv`` (one line per ablation and seed), ``ablation_table.csv`` and
    ``ablation_table.md`` (mean ± std over seeds; Δ = row − main, in WER/CER percentage points and
    dev-loss nats) and ``ablation_table.png`` (bar chart), and ``protocol.json`` (the frozen main).
    ``train_fn``/``evaluate_fn`` replace `kdlib.train.train`/`evaluate_run_dir` (same
    signatures), e.g. to submit jobs elsewhere.
    """

    main = [replace(c, run_dir=None, init_from=None) for c in main]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _freeze(out_dir, main)
    names = list(ABLATIONS) if ablations is None else list(ablations)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; known: {sorted(ABLATIONS)}")
    seeds = list(seeds) if seeds else [main[0].seed]
    evaluate_fn = evaluate_fn or _default_evaluate
    eval_kwargs = {"progress": False, **(eval_kwargs or {})}

    plans: dict[str, tuple[list[TrainConfig], str]] = {"main": (main, "–")}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            configs = apply_ablation(main, name)
        except AblationError as err:
            skipped[name] = str(err)
            continue
        plans[name] = (configs, describe_diff(ablation_diff(main, configs)))

    runs: list[dict[str, Any]] = []
    jobs = [(name, seed) for name in plans for seed in seeds]
    for name, seed in progress_bar(jobs, desc="ablations", disable=not progress):
        configs, change = plans[name]
        configs = [replace(c, seed=seed) for c in configs]
        results = run_pipeline(configs, out_dir / "runs", train_fn=train_fn, quiet=quiet)
        final_dir, summary = results[-1]
        record = {"ablation": name, "seed": seed, "stages": "+".join(str(c.stage) for c in configs),
                  "steps": sum(c.max_steps for c in configs), "run_dir": str(final_dir),
                  "dev_loss": summary.get("dev_loss")}
        for split in splits:
            metrics = _evaluate_cached(evaluate_fn, final_dir, split, eval_kwargs)
            record[f"{split}_wer"], record[f"{split}_cer"] = metrics.get("wer"), metrics.get("cer")
        flags = 0
        for run_dir, _ in results:
            monitor = OverfitMonitor(quiet=True)
            monitor.observe_history(load_history(run_dir, missing_ok=True))
            flags += len(monitor.events)
        record["overfit_flags"] = flags
        runs.append(record)

    rows = _aggregate(plans, runs, splits)
    paths = write_ablation_table(rows, runs, out_dir)
    if skipped:
        print(f"ablations skipped ({len(skipped)}): " + "; ".join(skipped.values()))
    return AblationResult(rows=rows, runs=runs, skipped=skipped, paths=paths)


def _aggregate(plans: dict[str, tuple[list[TrainConfig], str]], runs: list[dict], splits: Sequence[str]) -> list[dict]:
    metrics = [m for m in METRICS if m == "dev_loss" or m.split("_")[0] in splits]
    rows = []
    for name, (configs, change) in plans.items():
        mine = [r for r in runs if r["ablation"] == name]
        row: dict[str, Any] = {
            "ablation": name, "label": "main" if name == "main" else ABLATIONS[name].label,
            "change": change, "stages": "+".join(str(c.stage) for c in configs), "n_seeds": len(mine),
        }
        for m in metrics:
            row[m], row[f"{m}_std"] = _mean_std([r.get(m) for r in mine])
        row["overfit_flags"] = sum(r.get("overfit_flags", 0) for r in mine)
        rows.append(row)
    main_row = rows[0]
    for row in rows:
        for m in metrics:
            row[f"delta_{m}"] = (row[m] - main_row[m]) if row[m] is not None and main_row[m] is not None else None
    return rows


def _fmt_pm(value, std, scale: float = 1.0, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value * scale:+.{digits}f}" if signed else f"{value * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


_HEADERS = {"dev_wer": "dev WER (%)", "test_wer": "test WER (%)", "dev_cer": "dev CER (%)",
            "test_cer": "test CER (%)", "dev_loss": "dev loss"}
_DELTA_HEADERS = {"dev_wer": "Δ dev WER (pp)", "test_wer": "Δ test WER (pp)", "dev_cer": "Δ dev CER (pp)",
                  "test_cer": "Δ test CER (pp)", "dev_loss": "Δ dev loss"}


def ablation_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The ablation table in markdown: WER/CER in %, Δ = row − main in percentage points, dev loss
    in nats per token; ``mean ± std`` when a row has several seeds. WER/CER use Whisper's basic
    normaliser (as `kdlib.evaluate` scores them)."""
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    head = ["ablation", "change", "stages", "seeds"] + [_HEADERS[m] for m in metrics] \
        + [_DELTA_HEADERS[m] for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["change"], r["stages"], str(r["n_seeds"])]
        for m in metrics:
            scale, digits = (1, 3) if m == "dev_loss" else (100, 1)
            cells.append(_fmt_pm(r[m], r[f"{m}_std"], scale, digits))
        for m in metrics:
            scale, digits = (1, 3) if m == "dev_loss" else (100, 1)
            cells.append("–" if r["ablation"] == "main" else
                         _fmt_pm(r[f"delta_{m}"], None, scale, digits, signed=True))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ablations(rows: Sequence[dict[str, Any]], path: str | Path | None = None):
    """Bar chart of the ablation table: WER (dev, test) per row with ± std error bars, main's dev
    WER as a dashed line; dev loss in a second panel. Returns the figure (saved to `path`)."""
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax_wer, ax_loss) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.2))
    width = 0.38
    for i, (split, colour) in enumerate((("dev", "tab:blue"), ("test", "tab:orange"))):
        key = f"{split}_wer"
        if not any(r.get(key) is not None for r in rows):
            continue
        values = [100 * (r.get(key) or 0.0) for r in rows]
        errors = [100 * (r.get(f"{key}_std") or 0.0) for r in rows]
        ax_wer.bar(x + (i - 0.5) * width, values, width, yerr=errors, capsize=3, label=split, color=colour)
    if rows and rows[0].get("dev_wer") is not None:
        ax_wer.axhline(100 * rows[0]["dev_wer"], color="k", ls="--", lw=1, label="main (dev)")
    top = max([100 * ((r.get(k) or 0.0) + (r.get(f"{k}_std") or 0.0)) for r in rows
               for k in ("dev_wer", "test_wer")] + [1.0])
    ax_wer.set_ylim(0, 1.3 * top)  # headroom for the legend above the bars
    ax_wer.set_xticks(x, labels, rotation=30, ha="right")
    ax_wer.set_ylabel("WER (%)")
    ax_wer.set_title("WER per ablation (mean ± std over seeds)")
    ax_wer.legend(loc="upper center", ncol=3, fontsize=8)
    losses = [r.get("dev_loss") for r in rows]
    if any(v is not None for v in losses):
        ax_loss.bar(x, [v or 0.0 for v in losses], 0.6, yerr=[r.get("dev_loss_std") or 0.0 for r in rows],
                    capsize=3, color=["tab:gray"] + ["tab:green"] * (len(rows) - 1))
        if losses[0] is not None:
            ax_loss.axhline(losses[0], color="k", ls="--", lw=1, label="main")
            ax_loss.legend()
        low = min(v for v in losses if v is not None)
        high = max(v for v in losses if v is not None)
        pad = max(0.05 * (high - low), 0.01 * abs(high))
        ax_loss.set_ylim(low - 3 * pad, high + 3 * pad)
    ax_loss.set_xticks(x, labels, rotation=30, ha="right")
    ax_loss.set_ylabel("dev loss (nats per token)")
    ax_loss.set_title("Dev cross-entropy at the end of the last stage")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def write_ablation_table(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]],
                         out_dir: str | Path) -> dict[str, Path]:
    """Write ``ablation_table.csv``/``.md``/``.png`` and ``ablation_runs.csv``; returns the paths."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = {"csv": out_dir / "ablation_table.csv", "markdown": out_dir / "ablation_table.md",
             "figure": out_dir / "ablation_table.png", "runs": out_dir / "ablation_runs.csv"}
    columns = list(rows[0]) if rows else ["ablation"]
    write_csv(paths["csv"], list(rows), columns)
    run_columns: list[str] = []
    for r in runs:
        run_columns += [k for k in r if k not in run_columns]
    write_csv(paths["runs"], list(runs), run_columns or ["ablation"])
    atomic_write_text(paths["markdown"], ablation_markdown(rows))
    fig = plot_ablations(rows, paths["figure"])
    plt.close(fig)
    return paths


# ================================================================================================
# 3. Objective overfitting
# ================================================================================================

AUX_TERMS = ("kl", "taid", "geo", "curve", "contrastive")


def aux_loss(record: dict[str, Any]) -> Optional[float]:
    """Sum of the auxiliary (surrogate) loss terms that are on in a training record: every term
    but CE whose weight ``w_<term>`` is > 0 (records without weights: every term present).
    Unweighted, so a weight schedule (KL warm-up, contrastive decay) does not look like learning."""
    values = [float(record[t]) for t in AUX_TERMS
              if record.get(t) is not None and record.get(f"w_{t}", 1.0) > 0]
    return sum(values) if values else None


class OverfitMonitor:
    """Flags *objective overfitting*: the auxiliary losses keep falling while the dev metric
    (dev WER, or dev loss where WER is missing) has not improved for `patience` evaluations.

    That is the failure the thesis names for multilingual KD: the student keeps getting better at
    the surrogate objectives (matching the teacher's distribution and hidden states) while decoding
    does not improve: the surrogates no longer help. The remedy is stage-wise reweighting: each
    flag multiplies `factor` by `decay` (floor `min_factor`), and `decayed` applies the factor to a
    config's auxiliary weights (``kl_weight``, ``geo_weight``, ``contrastive_weight``).

    Rule, at each evaluation: if dev improved on the best so far by more than `min_delta`, it is
    the new reference (dev, aux). Otherwise it counts as stale; after `patience` stale evaluations,
    if the auxiliary loss (mean over the steps since the previous evaluation) is below the
    reference's by more than `aux_drop` (relative), flag, log a warning, and start counting again
    from here. A plateau in which the auxiliary losses do not fall either is not flagged (that is
    a learning-rate or capacity question, not a surrogate one).

    Feed it with `observe` (numbers), `on_eval` (the trainer's callback signature; needs the
    step's loss parts in ``metrics``), or `observe_history` (a ``training_history.json`` list).
    """

    def __init__(self, patience: int = 3, *, min_delta: float = 0.0, aux_drop: float = 0.01,
                 decay: float = 0.5, min_factor: float = 0.1, metric: str = "auto", quiet: bool = False):
        if patience < 1:
            raise ValueError(f"patience: must be at least 1, got {patience}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay: must be in (0, 1], got {decay}")
        if metric not in ("auto", *OBJECTIVES):
            raise ValueError(f"metric: {metric!r} is not 'auto' or one of {OBJECTIVES}")
        self.patience, self.min_delta, self.aux_drop = patience, min_delta, aux_drop
        self.decay, self.min_factor, self.metric, self.quiet = decay, min_factor, metric, quiet
        self.factor = 1.0
        self.events: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the reference point (a new stage has other auxiliary terms); keep `factor`,
        `events` and `evaluations`."""
        self._best_dev: Optional[float] = None
        self._ref_aux: Optional[float] = None
        self._stale = 0
        self._aux_since: list[float] = []

    @property
    def flagged(self) -> bool:
        return bool(self.events)

    def observe(self, step: int, dev: float, aux: Optional[float], *, label: str = "") -> Optional[dict]:
        """One evaluation: `dev` (lower is better) and the auxiliary loss `aux` at `step`.
        Returns the event dict when this evaluation raises a flag, else None."""
        self.evaluations.append({"step": step, "dev": dev, "aux": aux, "label": label})
        if self._best_dev is None or dev < self._best_dev - self.min_delta:
            self._best_dev, self._ref_aux, self._stale = dev, aux, 0
            return None
        self._stale += 1
        if self._stale < self.patience or aux is None or self._ref_aux is None:
            return None
        if aux >= self._ref_aux * (1 - self.aux_drop):
            return None
        self.factor = max(self.min_factor, self.factor * self.decay)
        event = {"step": step, "label": label, "dev_best": self._best_dev, "dev_now": dev,
                 "aux_at_reference": self._ref_aux, "aux_now": aux, "stale_evaluations": self._stale,
                 "factor": self.factor}
        event["message"] = (
            f"{label + ': ' if label else ''}objective overfitting at step {step}: auxiliary losses "
            f"fell {self._ref_aux:.4g} → {aux:.4g} while dev stayed at best {self._best_dev:.4g} "
            f"for {self._stale} evaluations; suggest auxiliary weights × {self.factor:.3g}")
        self.events.append(event)
        if not self.quiet:
            log.warning(event["message"])
        self._ref_aux, self._stale = aux, 0
        return event

    def _dev_of(self, metrics: dict[str, Any]) -> Optional[float]:
        if self.metric == "auto":
            value = metrics.get("dev_wer")
            return value if value is not None else metrics.get("dev_loss")
        return metrics.get(self.metric)

    def on_eval(self, step: int, metrics: dict[str, Any]) -> Optional[dict]:
        """The trainer's callback signature. Uses ``metrics``' loss parts (``kl``, ``geo``, ...,
        with ``w_<term>``) as the auxiliary loss when present."""
        dev = self._dev_of(metrics)
        if dev is None:
            return None
        return self.observe(step, float(dev), aux_loss(metrics))

    def observe_history(self, history: Iterable[dict[str, Any]], *, label: str = "") -> list[dict]:
        """Replay a trainer history (per-step records; dev metrics at evaluation steps); the
        auxiliary loss of an evaluation is the mean over the steps since the previous one."""
        new = []
        for record in history:
            aux = aux_loss(record)
            if aux is not None and math.isfinite(aux):
                self._aux_since.append(aux)
            dev = self._dev_of(record)
            if dev is None:
                continue
            mean_aux = statistics.fmean(self._aux_since) if self._aux_since else None
            self._aux_since = []
            event = self.observe(int(record["step"]), float(dev), mean_aux, label=label)
            if event:
                new.append(event)
        return new

    def decayed(self, config: TrainConfig) -> TrainConfig:
        """`config` with its auxiliary weights multiplied by `factor` (unchanged while 1)."""
        if self.factor == 1.0:
            return config
        changes = {name: getattr(config, name) * self.factor for name in ("kl_weight", "geo_weight", "contrastive_weight")}
        if config.contrastive_final_weight is not None:
            changes["contrastive_final_weight"] = config.contrastive_final_weight * self.factor
        return replace(config, **changes)
