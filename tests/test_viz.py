"""kdlib.viz on small synthetic arrays: masks, pooling, frame sampling, 2-D maps (shapes and
determinism), preservation scores, DTW against a plain double-loop DP, and the figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlib import models, viz


def _states(name="teacher", n=3, frames=12, dim=8, lengths=(12, 7, 3), seed=0) -> viz.EncoderStates:
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, frames, dim)).astype(np.float32)
    mask = np.arange(frames)[None, :] < np.array(lengths)[:, None]
    return viz.EncoderStates(name, hidden, mask, [f"u{i}" for i in range(n)], ["a", "b", "a"][:n])


def dtw_loop(cost):
    """The textbook DTW: two nested loops over a (n+1, m+1) table, then the same traceback."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    i, j, path = n, m, [(n - 1, m - 1)]
    while (i, j) != (1, 1):
        options = [(acc[i - 1, j - 1], i - 1, j - 1), (acc[i - 1, j], i - 1, j), (acc[i, j - 1], i, j - 1)]
        best = min(o[0] for o in options)
        _, i, j = next(o for o in options if o[0] == best)
        path.append((i - 1, j - 1))
    return acc[n, m], np.array(path[::-1])


# --- states, pooling, frames ----------------------------------------------------------------

def test_pool_is_masked_mean_and_ignores_padding():
    s = _states()
    pooled = viz.pool_states(s)
    assert pooled.shape == (3, 8)
    np.testing.assert_allclose(pooled[1], s.hidden[1, :7].mean(0), rtol=1e-5)
    s.hidden[1, 7:] = 1e6  # garbage in padded frames must not move the mean
    np.testing.assert_allclose(viz.pool_states(s)[1], pooled[1], rtol=1e-5)


def test_pool_rejects_utterance_without_frames():
    s = _states(lengths=(12, 0, 3))
    with pytest.raises(ValueError, match="u1"):
        viz.pool_states(s)


def test_sample_frames_only_valid_and_evenly_spaced():
    s = _states()
    points, utt, frame = viz.sample_frames(s, per_utterance=4)
    assert points.shape == (4 + 4 + 3, 8)  # the third clip has only 3 valid frames
    assert s.mask[utt, frame].all()
    np.testing.assert_array_equal(frame[utt == 0], [0, 4, 7, 11])
    np.testing.assert_array_equal(points, s.hidden[utt, frame])


def test_sequence_honours_a_non_prefix_mask():
    s = _states()
    s.mask[0] = False
    s.mask[0, [2, 5]] = True
    np.testing.assert_array_equal(s.sequence(0), s.hidden[0, [2, 5]])


def test_states_checks_shapes():
    with pytest.raises(ValueError, match="mask"):
        viz.EncoderStates("x", np.zeros((2, 5, 3)), np.ones((2, 4), bool), ["a", "b"], ["s", "s"])


def test_extract_states_masks_and_shapes_on_tiny_model():
    from kdlib.models import tiny_random_pair

    teacher, student = tiny_random_pair()
    waves = [np.random.default_rng(i).normal(scale=0.1, size=n).astype(np.float32)
             for i, n in enumerate((16000, 4000))]  # 1.0 s and 0.25 s
    s = viz.extract_states(teacher, teacher.feature_extractor, waves, name="t", batch_size=1, progress=False)
    # 16000 samples -> 100 log-mel frames -> 50 encoder frames; 4000 -> 25 -> 13
    assert s.hidden.shape == (2, 50, 128) and s.lengths.tolist() == [50, 13]
    assert (s.hidden[1, 13:] == 0).all()
    d = viz.extract_states(student, student.feature_extractor, waves, name="s", frame_factor=3, progress=False)
    assert d.lengths.tolist() == [17, 5] and d.dim == 64 and d.frame_seconds == pytest.approx(0.06)
    from kdlib.models import RiemannianProjector

    torch.manual_seed(0)
    p = viz.project_states(d, RiemannianProjector(64, 128), name="p")
    assert p.dim == 128
    np.testing.assert_allclose(np.linalg.norm(p.sequence(0), axis=1), 1.0, rtol=1e-5)
    assert (p.hidden[1, 5:] == 0).all()


# --- maps -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", viz.METHODS)
def test_joint_map_shapes_and_determinism(method):
    rng = np.random.default_rng(0)
    sets = {"teacher": rng.normal(size=(30, 6)), "student": rng.normal(size=(25, 6))}
    a = viz.joint_map(sets, method, seed=3)
    b = viz.joint_map(sets, method, seed=3)
    assert {k: v.shape for k, v in a.coords.items()} == {"teacher": (30, 2), "student": (25, 2)}
    for name in sets:
        np.testing.assert_allclose(a.coords[name], b.coords[name])


def test_joint_map_is_fitted_on_the_union():
    """Identical points from two models land on identical places of the shared map."""
    x = np.random.default_rng(1).normal(size=(20, 5))
    m = viz.joint_map({"teacher": x, "copy": x.copy()}, "pca")
    np.testing.assert_allclose(m.coords["teacher"], m.coords["copy"], atol=1e-6)


def test_joint_map_refuses_mixed_widths():
    with pytest.raises(ValueError, match="project"):
        viz.joint_map({"t": np.zeros((5, 4)), "s": np.zeros((5, 3))}, "pca")


def test_umap_another_seed_gives_another_map():
    x = np.random.default_rng(2).normal(size=(40, 6))
    a = viz.embed_2d(x, "umap", seed=0)
    b = viz.embed_2d(x, "umap", seed=1)
    assert not np.allclose(a, b)


def test_preservation_scores():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    same = viz.preservation(x, x, k=5, normalize=False)
    assert same["knn_overlap"] == pytest.approx(1.0) and same["distance_correlation"] == pytest.approx(1.0)
    noise = viz.preservation(x, rng.normal(size=(60, 2)), k=5, normalize=False)
    assert noise["knn_overlap"] < 0.4 and abs(noise["distance_correlation"]) < 0.3


# --- DTW ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (7, 7), (9, 4), (4, 11), (23, 17)])
def test_dtw_equals_double_loop(shape):
    cost = np.random.default_rng(sum(shape)).random(shape)
    res = viz.dtw(cost)
    distance, path = dtw_loop(cost)
    assert res.distance == pytest.approx(distance, rel=1e-12)
    np.testing.assert_array_equal(res.path, path)
    assert res.normalized == pytest.approx(distance / len(path))
    assert cost[path[:, 0], path[:, 1]].sum() == pytest.approx(distance)


def test_dtw_path_is_monotone_and_complete():
    res = viz.dtw(np.random.default_rng(5).random((12, 8)))
    steps = np.diff(res.path, axis=0)
    assert tuple(res.path[0]) == (0, 0) and tuple(res.path[-1]) == (11, 7)
    assert set(map(tuple, steps)) <= {(1, 1), (1, 0), (0, 1)}


def test_dtw_finds_a_time_stretched_copy():
    """A student that says the same thing at half speed: zero cost along a non-diagonal path."""
    teacher = np.random.default_rng(0).normal(size=(10, 4))
    student = np.repeat(teacher, 2, axis=0)  # every frame twice
    res = viz.dtw(viz.cosine_cost(teacher, student))
    assert res.distance == pytest.approx(0.0, abs=1e-9)
    assert len(res.path) == 20


def test_cosine_cost_range_and_scale_invariance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
    c = viz.cosine_cost(a, b)
    assert c.shape == (4, 5) and (c >= 0).all() and (c <= 2).all()
    np.testing.assert_allclose(viz.cosine_cost(3 * a, b), c)
    np.testing.assert_allclose(np.diag(viz.cosine_cost(a, a)), 0, atol=1e-12)


def test_dtw_distances_use_only_valid_frames():
    t = _states()
    s = _states(name="student", seed=1)
    results = viz.dtw_distances(t, s)
    assert [r.path[-1].tolist() for r in results] == [[11, 11], [6, 6], [2, 2]]
    s.hidden[~s.mask] = 1e3  # padding must not matter
    again = viz.dtw_distances(t, s)
    assert [r.distance for r in again] == pytest.approx([r.distance for r in results])
    same = viz.dtw_distances(t, t.renamed("copy"))
    assert [r.distance for r in same] == pytest.approx([0, 0, 0], abs=1e-9)


def test_dtw_distances_refuse_other_widths():
    with pytest.raises(ValueError, match="project"):
        viz.dtw_distances(_states(), _states(dim=4))


# --- figures --------------------------------------------------------------------------------

def test_figures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    sets = {"teacher": rng.normal(size=(12, 4)), "student": rng.normal(size=(12, 4))}
    maps = [viz.joint_map(sets, "pca")]
    fig = viz.plot_maps(maps, title="t", path=tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and fig.axes[0].get_xlabel().startswith("PC 1")
    viz.plot_maps(maps, colour_by="speaker", labels={k: ["x", "y"] * 6 for k in sets},
                  path=tmp_path / "b.png")
    cost = rng.random((6, 5))
    viz.plot_dtw_paths([("before", cost, viz.dtw(cost))], path=tmp_path / "c.png")
    viz.plot_dtw_distances({"before": [1, 2], "after": [0.5, 1]}, ["u0", "u1"], path=tmp_path / "d.png")
    assert all((tmp_path / f"{c}.png").exists() for c in "bcd")
    with pytest.raises(ValueError, match="labels"):
        viz.plot_maps(maps, colour_by="speaker")


def test_same_encoder_sees_weight_changes():
    from kdlib.models import tiny_random_pair

    teacher, student = tiny_random_pair()
    again, _ = tiny_random_pair()
    assert models.same_encoder(teacher, again.model)
    assert not models.same_encoder(teacher, student)
    with torch.no_grad():
        again.model.model.encoder.layers[0].fc1.weight[0, 0] += 1e-3
    assert not models.same_encoder(teacher, again)


def test_after_kd_student_explains_why_not(tmp_path):
    missing = viz.after_kd_student(tmp_path / "nothing", "whisper-base")
    assert missing.model is None and "no finished run" in missing.reason
    (tmp_path / "adapter_final").mkdir()
    (tmp_path / "training_config.json").write_text('{"teacher": "tiny-random", "stage": 2}')
    other = viz.after_kd_student(tmp_path, "whisper-base")
    assert other.model is None and "tiny-random" in other.reason


def test_before_kd_student_is_the_runs_student_untrained(tmp_path):
    """Chapter 10's "before KD": the finished run's own student as the run built it (same shape,
    window included), with none of the training; the run's trained student differs from it."""
    from kdlib.config import make_config
    from kdlib.runs import untrained_student
    from kdlib.train import run_stage

    config = make_config("smoke", stage=2, overrides={"max_steps": 2, "eval_every": 2, "eval_wer": False,
                                                       "student_window_seconds": 10, "from_untrained": True})
    run_stage(config, tmp_path / "run", progress=False)
    after = viz.after_kd_student(tmp_path / "run", config.teacher)
    assert after.model is not None, after.reason
    model, feature_extractor = viz.before_kd_student(after)
    assert model.config.to_dict() == after.model.config.to_dict()  # same shape: window, layers, widths
    assert feature_extractor.nb_max_frames == after.feature_extractor.nb_max_frames
    fresh, _, _ = untrained_student(config)
    assert models.same_encoder(model, fresh) and not models.same_encoder(model, after.model)
    with pytest.raises(ValueError, match="no finished run"):
        viz.before_kd_student(viz.after_kd_student(tmp_path / "nothing", config.teacher))
