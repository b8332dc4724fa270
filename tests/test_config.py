"""Config: presets, stage terms, JSON round trip, and clear errors before any work starts."""

from __future__ import annotations

import pytest

from kdlib.config import ConfigError, TrainConfig, make_config, parse_override


def test_json_round_trip(tmp_path):
    config = make_config("thesis", stage=2, sets=["lr=1e-4", "betas=[0.8, 0.95]"])
    path = tmp_path / "training_config.json"
    config.to_json(path)
    again = TrainConfig.from_json(path)
    assert again == config
    assert again.betas == (0.8, 0.95)


def test_thesis_preset_matches_the_pilot():
    config = make_config("thesis", stage=1)
    assert config.teacher == "openai/whisper-large-v3"
    assert (config.batch_size, config.max_steps, config.warmup_steps) == (64, 8000, 1000)
    assert config.lr == pytest.approx(2.6e-4) and config.min_lr == pytest.approx(1e-6)
    assert config.kl_weight == pytest.approx(0.020584) and config.kl_warmup_steps == 1000
    assert config.grad_clip == 1.0 and config.temperature == 2.0


@pytest.mark.parametrize(
    "stage, on, off",
    [
        (0, ["ce_weight"], ["kl_weight", "geo_weight", "contrastive_weight"]),
        (1, ["ce_weight", "kl_weight"], ["geo_weight", "contrastive_weight"]),
        (2, ["ce_weight", "geo_weight", "contrastive_weight"], ["kl_weight"]),
        (3, ["ce_weight", "kl_weight"], ["geo_weight", "contrastive_weight"]),  # encoder frozen: no contrastive
    ],
)
def test_stage_switches_terms(stage, on, off):
    config = make_config("demo", stage=stage)
    assert all(getattr(config, name) > 0 for name in on)
    assert all(getattr(config, name) == 0 for name in off)


def test_stage3_decays_contrastive_to_point_one():
    """Stage III keeps its contrastive term (decaying to 0.1) only where the encoder trains: with
    the encoder frozen the term's gradient would reach the projector alone (issue 16, item 6)."""
    frozen = make_config("demo", stage=3)
    assert frozen.train_encoder is False and frozen.contrastive_weight == 0.0
    assert frozen.contrastive_final_weight is None  # no rise from 0 to 0.1 either
    training = make_config("demo", stage=3, overrides={"train_encoder": True})
    assert training.contrastive_weight > 0 and training.contrastive_final_weight == pytest.approx(0.1)
    explicit = make_config("demo", stage=3, overrides={"contrastive_weight": 0.5})  # an ablation can still ask
    assert explicit.contrastive_weight == 0.5


def test_explicit_override_beats_stage_defaults():
    config = make_config("demo", stage=1, overrides={"geo_weight": 0.5})
    assert config.geo_weight == 0.5


@pytest.mark.parametrize(
    "text, message",
    [
        ("lrr=1e-3", "unknown config field 'lrr'"),
        ("batch_size=abc", "batch_size: expected an integer"),
        ("amp=fp8", "amp: 'fp8' is not one of"),
        ("temperature=-1", "temperature: must be positive"),
        ("betas=[0.9]", "betas: expected 2 values"),
        ("nonsense", "expected field=value"),
    ],
)
def test_bad_overrides_are_clear_errors(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        make_config("demo", stage=1, sets=[text])


def test_parse_override_reads_json_values():
    assert parse_override("lr=3e-4") == ("lr", 3e-4)
    assert parse_override("data_root=/data/mls") == ("data_root", "/data/mls")
    assert parse_override("init_from=none") == ("init_from", None)
    assert parse_override("projector=false") == ("projector", False)
