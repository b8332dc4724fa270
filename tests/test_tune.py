"""kdlib.tune: the search space, pruning callback, a study that survives SIGKILL (real smoke
training, the only training runs in this file), best parameters feeding make_config, ablation
diffs, the ablation runner (stub trainer) and the objective-overfitting monitor."""

from __future__ import annotations

import csv
import json
import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from kdlib import tune
from kdlib.config import TrainConfig, make_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- search space and stage-safe overrides ----------------------------------------------------


@pytest.mark.parametrize("stages", [[1], [1, 2], [2]])
def test_search_space_bounds_and_stage_relevance(stages):
    space = tune.SearchSpace()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(40):
        params = tune.suggest(study.ask(), space, stages)
        assert 1e-5 <= params["lr"] <= 1e-3
        assert params["lora_r"] in (4, 8, 16, 32) and params["batch_size"] in (4, 8, 16, 32)
        assert ("kl_weight" in params) == (1 in stages) == ("temperature" in params)
        assert ("geo_weight" in params) == (2 in stages)
        if 1 in stages:
            assert 1.0 <= params["temperature"] <= 5.0 and 1e-3 <= params["kl_weight"] <= 10
        overrides = tune.params_to_overrides(params)
        assert overrides["lora_alpha"] == 2 * params["lora_r"]
        make_config("smoke", stage=stages[0], overrides=tune.stage_overrides(overrides, stages[0]))


def test_log_uniform_weights_spread_over_decades():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = [tune.suggest(study.ask(), tune.SearchSpace(), [1])["kl_weight"] for _ in range(200)]
    below = sum(v < 1e-2 for v in values)
    assert 25 < below < 75, f"log-uniform over 4 decades puts ~1/4 below 1e-2, got {below}/200"


def test_tuned_weights_never_switch_on_a_term_the_stage_has_off():
    p = tune.pipeline("smoke", [1, 2, 3], overrides={"kl_weight": 0.3, "geo_weight": 0.7, "lr": 2e-4})
    assert [(c.stage, c.kl_weight, c.geo_weight) for c in p] == [(1, 0.3, 0.0), (2, 0.0, 0.7), (3, 0.3, 0.0)]
    assert all(c.lr == 2e-4 for c in p)


# ---- pruning callback --------------------------------------------------------------------------


def test_eval_callback_reports_global_steps_and_prunes_below_median():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    reported: set[int] = set()
    cb = tune._eval_callback(good, "dev_loss", offset=10, reported=reported)
    cb(2, {"dev_loss": 1.0})
    cb(4, {"dev_loss": 0.8, "dev_wer": 0.9})
    cb(4, {"dev_loss": 0.8})  # a repeated step (history backfill) is reported once
    study.tell(good, 0.8)
    assert study.trials[0].intermediate_values == {12: 1.0, 14: 0.8}
    bad = study.ask()
    cb = tune._eval_callback(bad, "dev_loss", offset=10, reported=set())
    with pytest.raises(optuna.TrialPruned):
        cb(2, {"dev_loss": 5.0})
    cb_wer = tune._eval_callback(study.ask(), "dev_wer", offset=0, reported=set())
    cb_wer(2, {"dev_loss": 5.0})  # no dev_wer in these metrics: nothing reported, no pruning


# ---- the study: resumes after SIGKILL; best params feed the main experiment -------------------

STUDY_SCRIPT = textwrap.dedent("""
    import sys
    from kdlib import tune
    base = tune.pipeline("smoke", [1], overrides={"max_steps": 2, "eval_every": 1, "save_every": 1})
    space = tune.SearchSpace(batch_size=(2, 4))
    tune.run_study(base, sys.argv[1], n_trials=int(sys.argv[2]), space=space, seed=0, startup_trials=5)
""")


def _study(study_dir: Path):
    return optuna.load_study(study_name="kdlib", storage=tune.storage_url(study_dir))


def test_study_resumes_after_sigkill_and_best_params_feed_make_config(tmp_path):
    from optuna.trial import TrialState

    study_dir = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-c", STUDY_SCRIPT, str(study_dir), "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    # Kill during trial 1, after trial 0 finished and trial 1 saved a checkpoint.
    while time.time() < deadline and proc.poll() is None:
        if (study_dir / "best_params.json").exists() and (study_dir / "trial_001/stage1/checkpoint.pt").exists():
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the study ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    before = _study(study_dir)
    states = [t.state for t in before.trials]
    assert states == [TrialState.COMPLETE, TrialState.RUNNING], states
    first = before.trials[0]
    assert first.intermediate_values, "the pruner was fed no dev values"
    assert set(first.intermediate_values) == {1, 2}

    study = tune.run_study(tune.pipeline("smoke", [1], overrides={"max_steps": 2, "eval_every": 1, "save_every": 1}),
                           study_dir, n_trials=2, space=tune.SearchSpace(batch_size=(2, 4)), seed=0,
                           startup_trials=5)  # no pruning here: the callback test covers it
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].params == first.params and trials[0].value == first.value  # kept as it was
    assert trials[2].user_attrs["resumes"] == 1 and trials[2].params == before.trials[1].params
    assert "resumed from" in (study_dir / "trial_001/stage1/train.log").read_text()
    assert not (study_dir / "trial_002").exists(), "the rerun should continue in the killed trial's folder"

    best = json.loads((study_dir / "best_params.json").read_text())
    assert best["value"] == min(t.value for t in trials if t.state == TrialState.COMPLETE)
    assert best["n_complete"] == 2
    overrides = tune.load_best_params(study_dir)
    config = make_config("smoke", stage=1, overrides=overrides)
    assert config.lr == pytest.approx(best["params"]["lr"])
    assert config.lora_r == best["params"]["lora_r"] and config.lora_alpha == 2 * config.lora_r
    assert config.kl_weight == pytest.approx(best["params"]["kl_weight"])
    assert tune.pipeline("smoke", [2], overrides=overrides)[0].kl_weight == 0.0
    assert "kl_weight" not in tune.load_best_params(study_dir / "best_params.json", stage=2)
    with open(study_dir / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 3

    # The same folder with another base config is refused before any training.
    other = tune.pipeline("smoke", [1], overrides={"max_steps": 3, "eval_every": 1, "save_every": 1})
    with pytest.raises(ValueError, match="max_steps: 2 there, 3 now"):
        tune.run_study(other, study_dir, n_trials=3, space=tune.SearchSpace(batch_size=(2, 4)))


def test_load_best_params_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="best_params.json: no best parameters yet"):
        tune.load_best_params(tmp_path)
    (tmp_path / "best_params.json").write_text("{}")
    with pytest.raises(ValueError, match="not a best_params.json"):
        tune.load_best_params(tmp_path)


# ---- ablations: declared diffs -----------------------------------------------------------------


def test_the_seven_ablations_are_declared():
    assert set(tune.ABLATIONS) == {"no_kl", "no_geodesic", "no_contrastive", "mse_not_geodesic",
                                   "curve_not_point", "no_stage_2", "taid_not_kl"}


@pytest.mark.parametrize("name", sorted(tune.ABLATIONS))
def test_each_ablation_differs_from_main_in_exactly_its_declared_fields(name):
    main = tune.pipeline("smoke", [1, 2, 3], overrides={"kl_weight": 0.2, "geo_weight": 0.9})
    ablation = tune.ABLATIONS[name]
    ablated = tune.apply_ablation(main, name)
    by_stage = {c.stage: c for c in ablated}
    assert sorted(by_stage) == [s for s in (1, 2, 3) if s not in ablation.drop_stages]
    changed: set[str] = set()
    for config in main:
        if config.stage not in by_stage:
            continue
        a, b = config.to_dict(), by_stage[config.stage].to_dict()
        diff = {k for k in a if a[k] != b[k]}
        assert diff <= ablation.fields, f"stage {config.stage}: {diff - ablation.fields} changed too"
        changed |= diff
    # every field that changes is declared, and something changes; a declared field may already
    # hold its ablated value in the main pipeline (no_contrastive's contrastive_final_weight: stage
    # III has no contrastive term while its encoder is frozen, issue 16 item 6)
    assert changed <= ablation.fields and (changed or not ablation.fields)
    assert all(c.seed == main[0].seed and c.max_steps == main[0].max_steps for c in ablated)


def test_ablations_that_change_nothing_are_refused():
    only_kd = tune.pipeline("smoke", [1])
    for name in ("no_geodesic", "mse_not_geodesic", "curve_not_point", "no_contrastive", "no_stage_2"):
        with pytest.raises(tune.AblationError, match=name):
            tune.apply_ablation(only_kd, name)
    assert tune.apply_ablation(only_kd, "no_kl")[0].kl_weight == 0.0


# ---- the ablation runner, with a stub trainer and evaluator -------------------------------------


def _stub_train(calls):
    def train(config: TrainConfig, run_dir, progress=False):
        run_dir = Path(run_dir)
        calls.append((config, run_dir))
        config.to_json(run_dir / "training_config.json")
        loss = 3.0 - 0.5 * (config.init_from is not None) + 0.3 * (config.kl_weight == 0 and config.stage == 1) \
            + 0.2 * (config.stage == 2 and config.geo_weight == 0) + 0.02 * config.seed
        history = [{"step": 1, "ce": 4.0, "kl": 1.0, "w_kl": config.kl_weight},
                   {"step": 2, "ce": 3.5, "kl": 0.5, "w_kl": config.kl_weight, "dev_loss": loss}]
        (run_dir / "training_history.json").write_text(json.dumps(history))
        summary = {"stage": config.stage, "dev_loss": loss, "final_ce": 3.5}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary
    return train


def _stub_evaluate(run_dir, split, **kwargs):
    assert kwargs["limit"] == 3
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    wer = summary["dev_loss"] / 10 + (0.05 if split == "test" else 0.0)
    return {"wer": wer, "cer": wer / 2, "n_utterances": 3}


def test_ablation_runner_table_seeds_and_shared_stages(tmp_path):
    main = tune.pipeline("smoke", [1, 2])
    calls = []
    result = tune.run_ablations(main, tmp_path, ablations=["no_kl", "no_geodesic", "no_stage_2", "no_contrastive"],
                                seeds=[0, 1], eval_kwargs={"limit": 3}, train_fn=_stub_train(calls),
                                evaluate_fn=_stub_evaluate, progress=False)
    rows = {r["ablation"]: r for r in result.rows}
    assert list(rows) == ["main", "no_kl", "no_geodesic", "no_stage_2", "no_contrastive"]
    # same seed, data and steps in every row; stage II starts from stage I
    for config, run_dir in calls:
        assert config.max_steps == main[0].max_steps and config.max_train_utterances == main[0].max_train_utterances
        assert (config.init_from is None) == (config.stage == 1)
    # shared stages train once: main {1, 2}; no_kl {1', 2'}; no_geodesic {2''}; no_stage_2 {} (main's
    # stage 1); no_contrastive {2'''}: 6 runs per seed instead of 9
    assert len(calls) == 2 * 6
    assert rows["no_stage_2"]["stages"] == "1" and rows["no_stage_2"]["change"] == "stage 2 removed"
    assert rows["no_kl"]["change"] == "kl_weight 1.0 → 0.0 (stage 1)"
    # mean ± std over the two seeds, deltas against main
    assert rows["main"]["n_seeds"] == 2
    assert rows["main"]["dev_loss"] == pytest.approx(2.51)
    assert rows["main"]["dev_loss_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert rows["no_geodesic"]["delta_dev_loss"] == pytest.approx(0.2)
    assert rows["no_stage_2"]["delta_dev_loss"] == pytest.approx(0.5)
    assert rows["no_geodesic"]["delta_test_wer"] == pytest.approx(0.02)
    assert rows["main"]["delta_dev_wer"] == 0.0
    # the files
    for key in ("csv", "markdown", "figure", "runs"):
        assert result.paths[key].is_file() and result.paths[key].stat().st_size > 0
    md = result.markdown()
    assert "| no geodesic | geo_weight 1.0 → 0.0 (stage 2) | 1+2 | 2 |" in md
    assert "| main | – | 1+2 | 2 | 25.1 ± 0.1 | 30.1 ± 0.1 |" in md  # WER in %, mean ± std
    with open(result.paths["runs"]) as f:
        assert len(list(csv.DictReader(f))) == 10
    # rerun: nothing is trained or evaluated again
    again = tune.run_ablations(main, tmp_path, ablations=["no_kl"], seeds=[0, 1], eval_kwargs={"limit": 3},
                               train_fn=_stub_train(calls), evaluate_fn=_stub_evaluate, progress=False)
    assert len(calls) == 12 and again.rows[1]["dev_loss"] == rows["no_kl"]["dev_loss"]
    # the main configuration is frozen for this folder
    with pytest.raises(ValueError, match="frozen"):
        tune.run_ablations(tune.pipeline("smoke", [1, 2], overrides={"lr": 1e-4}), tmp_path, ablations=[],
                           train_fn=_stub_train(calls), evaluate_fn=_stub_evaluate)


def test_ablation_runner_skips_and_counts_what_does_not_apply(tmp_path, capsys):
    calls = []
    result = tune.run_ablations(tune.pipeline("smoke", [1]), tmp_path, ablations=["no_geodesic", "no_kl"],
                                eval_kwargs={"limit": 3}, train_fn=_stub_train(calls),
                                evaluate_fn=_stub_evaluate, progress=False)
    assert [r["ablation"] for r in result.rows] == ["main", "no_kl"]
    assert list(result.skipped) == ["no_geodesic"]
    assert "ablations skipped (1)" in capsys.readouterr().out


def test_finished_run_folder_with_another_config_is_refused(tmp_path):
    calls = []
    config = make_config("smoke", stage=1)
    tune.run_stage(config, tmp_path / "r", train_fn=_stub_train(calls))
    assert len(calls) == 1
    tune.run_stage(config, tmp_path / "r", train_fn=_stub_train(calls))
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"holds a run of another config \(lr: 0.001 there, 0.0002 now\)"):
        tune.run_stage(make_config("smoke", stage=1, overrides={"lr": 2e-4}), tmp_path / "r",
                       train_fn=_stub_train(calls))


# ---- objective overfitting -----------------------------------------------------------------------


def test_monitor_flags_falling_aux_with_stalled_dev(caplog):
    monitor = tune.OverfitMonitor(patience=3, decay=0.5)
    dev = [2.0, 1.5, 1.4, 1.41, 1.42, 1.40, 1.45, 1.44, 1.43]
    aux = [5.0, 4.0, 3.0, 2.6, 2.2, 1.9, 1.6, 1.4, 1.2]
    with caplog.at_level(logging.WARNING, logger="kdlib.tune"):
        events = [monitor.observe(10 * (i + 1), d, a) for i, (d, a) in enumerate(zip(dev, aux))]
    flagged = [e["step"] for e in events if e]
    assert flagged == [60, 90]  # 3 evaluations after the best (step 30), then 3 more
    assert monitor.factor == pytest.approx(0.25)
    assert "objective overfitting at step 60" in caplog.text
    assert events[5]["aux_at_reference"] == 3.0 and events[5]["aux_now"] == 1.9


def test_monitor_quiet_when_dev_improves_or_aux_does_not_fall():
    improving = tune.OverfitMonitor(patience=2)
    for i in range(10):
        assert improving.observe(i, 2.0 - 0.1 * i, 5.0 - 0.4 * i) is None
    plateau = tune.OverfitMonitor(patience=2)  # both stalled: not objective overfitting
    for i, d in enumerate([1.0, 1.1, 1.05, 1.2, 1.1, 1.3]):
        assert plateau.observe(i, d, 3.0 + 0.01 * (i % 2)) is None
    assert improving.factor == plateau.factor == 1.0 and not plateau.flagged


def test_monitor_reads_a_trainer_history_and_decays_aux_weights():
    history = []
    for step in range(1, 41):
        record = {"step": step, "ce": 3.0, "kl": 2.0 - 0.04 * step, "w_kl": 1.0, "geo": 0.5, "w_geo": 0.0}
        if step % 5 == 0:
            record["dev_loss"] = max(2.0, 3.0 - 0.1 * step)  # stops improving at step 10
        history.append(record)
    monitor = tune.OverfitMonitor(patience=3, decay=0.5, quiet=True)
    events = monitor.observe_history(history, label="stage1")
    assert [e["step"] for e in events] == [25, 40]
    assert events[0]["aux_now"] == pytest.approx(statistics_mean([2.0 - 0.04 * s for s in range(21, 26)]))
    config = make_config("smoke", stage=3, overrides={"train_encoder": True})  # contrastive on, decaying
    decayed = monitor.decayed(config)
    assert decayed.kl_weight == pytest.approx(0.25 * config.kl_weight)
    assert decayed.contrastive_final_weight == pytest.approx(0.25 * config.contrastive_final_weight)
    assert decayed.lr == config.lr and decayed.ce_weight == config.ce_weight
    # the trainer callback form: dev_wer preferred, aux from the step's parts
    live = tune.OverfitMonitor(patience=1, quiet=True)
    live.on_eval(1, {"dev_loss": 1.0, "dev_wer": 0.5, "kl": 2.0, "w_kl": 1.0})
    assert live.on_eval(2, {"dev_loss": 0.5, "dev_wer": 0.6, "kl": 1.0, "w_kl": 1.0})["dev_now"] == 0.6


def statistics_mean(values):
    return sum(values) / len(values)


def test_pipeline_with_monitor_decays_the_next_stage(tmp_path):
    calls = []

    def train(config, run_dir, progress=False):
        run_dir = Path(run_dir)
        calls.append(config)
        config.to_json(run_dir / "training_config.json")
        history = [{"step": s, "ce": 3.0, "kl": 2.0 - 0.1 * s, "w_kl": 1.0,
                    **({"dev_loss": 1.0} if s % 2 == 0 else {})} for s in range(1, 11)]
        (run_dir / "training_history.json").write_text(json.dumps(history))
        (run_dir / "summary.json").write_text(json.dumps({"dev_loss": 1.0}))
        return {"dev_loss": 1.0}

    monitor = tune.OverfitMonitor(patience=2, decay=0.5, quiet=True)
    tune.run_pipeline(tune.pipeline("smoke", [1, 3]), tmp_path, train_fn=train, monitor=monitor)
    assert monitor.flagged
    after_stage1 = [e for e in monitor.events if e["label"].startswith("stage1-")][-1]["factor"]
    assert after_stage1 == pytest.approx(0.25)  # two flags in stage I's history
    assert calls[0].kl_weight == 1.0 and calls[1].kl_weight == pytest.approx(0.25)
    assert calls[1].contrastive_weight == 0.0  # stage III with a frozen encoder has no contrastive term
