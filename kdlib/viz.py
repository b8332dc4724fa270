"""Latent-space pictures: where teacher and student put the same speech.

What this module owns:

* `extract_states` — the last encoder layer of a Whisper model for a list of 16 kHz waveforms,
  with the valid-frame mask (a clip of ``n`` samples fills ``ceil(n / 160)`` log-mel frames and
  ``ceil(mel / 2)`` of the 1500 encoder frames; the rest is Whisper's zero padding), as an
  `EncoderStates`. `kdlib.models.same_encoder` tells when two models would give the same states (one
  forward then serves both). `project_states` sends student states through a projector into the teacher's
  space; `after_kd_student` loads a finished training run, or says why it cannot.
* `pool_states` (masked mean per utterance) and `sample_frames` (evenly spaced valid frames, so a
  frame-level map stays cheap).
* `joint_map` — a 2-D map (PCA, t-SNE or UMAP) fitted on the *union* of several models' points,
  so every model lands on the same map; `preservation` measures what a map kept (k-nearest
  neighbours for local structure, rank correlation of pairwise distances for global structure).
* `cosine_cost` and `dtw` — dynamic time warping between a teacher and a student frame sequence
  (cosine cost, the three classic steps), with its alignment path; `dtw_distances` per utterance.
* Figures: `plot_maps`, `plot_dtw_paths`, `plot_dtw_distances` (titles, labelled axes, legends;
  saved as PNG when given a path).

Shapes: ``hidden`` arrays are ``(utterances, frames, dim)`` float32 and masks ``(utterances,
frames)`` bool; a map is ``(points, 2)``. Everything returned is numpy; torch is only used to run
the models. This module is the top layer: it may import every other part of kdlib.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from kdlib import frames as F
from kdlib.config import TrainConfig
from kdlib.files import shown
from kdlib.models import encoder_of, merge_factor
from kdlib.progress import progress_bar
from kdlib.runs import load_trained, untrained_student


METHODS = ("pca", "tsne", "umap")
METHOD_TITLES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
_MARKERS = ("o", "s", "^", "D", "v", "P")


# --------------------------------------------------------------------------------------------
# Encoder states
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)  # arrays inside: compare by identity
class EncoderStates:
    """One model's last encoder layer for a list of utterances.

    ``hidden``: ``(utterances, frames, dim)`` float32, cut after the longest valid sequence of the
    set (Whisper's 1500 frames are mostly padding for short clips, and keeping them would cost
    ``utterances x 1500 x dim x 4`` bytes); ``mask``: ``(utterances, frames)`` bool, True for
    frames that see audio. ``frame_seconds``: time per frame (0.02 s; 0.06 s after 3:1
    downsampling).
    """

    name: str
    hidden: np.ndarray
    mask: np.ndarray
    ids: list[str]
    speakers: list[str]
    frame_seconds: float = F.ENCODER_FRAME_SECONDS

    def __post_init__(self):
        if self.hidden.ndim != 3 or self.mask.shape != self.hidden.shape[:2]:
            raise ValueError(f"{self.name}: hidden {self.hidden.shape} and mask {self.mask.shape} "
                             "must be (utterances, frames, dim) and (utterances, frames)")
        if not (len(self.ids) == len(self.speakers) == self.hidden.shape[0]):
            raise ValueError(f"{self.name}: {self.hidden.shape[0]} utterances but {len(self.ids)} ids "
                             f"and {len(self.speakers)} speakers")

    @property
    def dim(self) -> int:
        return self.hidden.shape[2]

    @property
    def lengths(self) -> np.ndarray:
        """Valid frames per utterance, ``(utterances,)``."""
        return self.mask.sum(1)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def sequence(self, i: int) -> np.ndarray:
        """The valid frames of utterance ``i``, ``(valid_frames, dim)``."""
        return self.hidden[i, self.mask[i]]

    def renamed(self, name: str) -> "EncoderStates":
        return EncoderStates(name, self.hidden, self.mask, self.ids, self.speakers, self.frame_seconds)


def _pad_cat(arrays: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Concatenate ``(b, t_i, ...)`` arrays along batch after zero-padding ``t_i`` to ``length``."""
    out = []
    for a in arrays:
        pad = [(0, 0)] * a.ndim
        pad[1] = (0, length - a.shape[1])
        out.append(np.pad(a, pad))
    return np.concatenate(out, axis=0)


@torch.no_grad()
def extract_states(model, feature_extractor, waves: Sequence[np.ndarray | torch.Tensor], *,
                   name: str, ids: Sequence[str] | None = None, speakers: Sequence[str] | None = None,
                   batch_size: int = 8, frame_factor: int = 1, progress: bool = True) -> EncoderStates:
    """Last encoder layer of ``model`` for 16 kHz mono ``waves``, with valid-frame masks.

    ``model``: a `kdlib.models.WhisperBundle`, a ``WhisperForConditionalGeneration`` (e.g. from
    `kdlib.runs.load_trained`) or its encoder; run in eval mode, batches of ``batch_size`` clips
    under ``torch.no_grad``, float32 out. ``frame_factor`` > 1: one state per that many 20 ms
    encoder frames (the thesis student's 3:1), the valid frames of each window averaged
    (`kdlib.frames.downsample`). A student that merges frames inside its encoder
    (`kdlib.models.merge_encoder_frames`) already delivers one state per k frames; only the rest
    of the factor is applied, so its states and a teacher's pooled by the same factor line up
    frame for frame, as in the trainer (`kdlib.frames.teacher_on_student_frames`).
    """

    encoder = encoder_of(model)
    encoder.eval()
    inner = merge_factor(encoder.config)  # frames merged inside the encoder (1: none)
    if frame_factor % inner:
        raise ValueError(f"frame_factor {frame_factor}: the model already merges {inner} frames into one; "
                         f"use a multiple of {inner}")
    frame_factor = max(frame_factor, inner)
    param = next(encoder.parameters())
    ids = list(ids) if ids is not None else [str(i) for i in range(len(waves))]
    speakers = list(speakers) if speakers is not None else ["unknown"] * len(waves)
    hidden_parts, mask_parts = [], []
    starts = range(0, len(waves), batch_size)
    for start in progress_bar(starts, desc=f"encoder states: {name}", disable=not progress, leave=False):
        batch = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves[start:start + batch_size]]
        with torch.autocast("cpu", enabled=False):  # the extractor's STFT must stay float32
            feats = feature_extractor(batch, sampling_rate=F.SAMPLE_RATE, return_tensors="pt").input_features
        hidden = encoder(feats.to(param.device, param.dtype)).last_hidden_state.float()  # (b, frames, d)
        mask = F.encoder_valid_mask([len(w) for w in batch], frames=hidden.shape[1] * inner, device=hidden.device)
        if inner > 1:  # the encoder merged already: only the mask still has 20 ms frames
            _, mask = F.downsample(torch.zeros(*mask.shape, 1, device=mask.device), inner, mask)
        if frame_factor > inner:
            hidden, mask = F.downsample(hidden, frame_factor // inner, mask, mode="avg")
        keep = int(mask.sum(1).max())
        hidden_parts.append(hidden[:, :keep].cpu().numpy())
        mask_parts.append(mask[:, :keep].cpu().numpy())
    length = max(h.shape[1] for h in hidden_parts)
    hidden = _pad_cat(hidden_parts, length)
    mask = _pad_cat(mask_parts, length).astype(bool)
    hidden[~mask] = 0.0
    return EncoderStates(name, hidden, mask, ids, speakers, F.ENCODER_FRAME_SECONDS * frame_factor)


@torch.no_grad()
def project_states(states: EncoderStates, projector: torch.nn.Module, *, name: str) -> EncoderStates:
    """``projector(states.hidden)`` (e.g. a `kdlib.models.RiemannianProjector`, d_student →
    d_teacher, unit norm); padded frames stay zero."""
    projector.eval()
    param = next(projector.parameters())
    hidden = projector(torch.from_numpy(states.hidden).to(param.device, param.dtype)).float().cpu().numpy()
    hidden[~states.mask] = 0.0
    return EncoderStates(name, hidden, states.mask, states.ids, states.speakers, states.frame_seconds)


@dataclass
class AfterKD:
    """A trained student from a run folder, or the reason there is none (``model is None``)."""

    model: Any = None
    feature_extractor: Any = None
    projector: torch.nn.Module | None = None
    frame_factor: int = 1
    config: dict = field(default_factory=dict)
    reason: str = ""


def after_kd_student(run_dir: str | Path, teacher: str) -> AfterKD:
    """Load the student of a finished run (`kdlib.runs.load_trained`, LoRA merged).

    Returns ``AfterKD(model=None, reason=...)`` instead of raising when the folder has no
    ``training_config.json`` or ``adapter_final/``, or when the run was distilled from another
    teacher than ``teacher`` (its states would live in another space).
    """
    run = Path(run_dir)
    config_path = run / "training_config.json"
    if not config_path.is_file() or not (run / "adapter_final").is_dir():
        return AfterKD(reason=f"{shown(run)}: no finished run (training_config.json + adapter_final/)")

    config = TrainConfig.from_json(config_path).to_dict()  # its paths resolved against the run folder
    if config.get("teacher") != teacher:
        return AfterKD(config=config, reason=f"{shown(config_path)}: distilled from teacher "
                                             f"{config.get('teacher')!r}, this chapter uses {teacher!r}")

    model, _, feature_extractor, projector = load_trained(run, merge=True)
    reason = f"{shown(run)}: stage {config.get('stage')}, {config.get('max_steps')} steps"
    if config.get("teacher_from"):
        reason += (f"; its teacher was adapted first ({shown(config['teacher_from'])}), the teacher here is "
                   "the unadapted one")
    return AfterKD(model, feature_extractor, projector, int(config.get("student_frame_factor") or 1),
                   config, reason=reason)


def before_kd_student(after: AfterKD):
    """The student of ``after``'s run as the run built it, before any training: the run's config
    without its ``init_from`` chain or adapters (`kdlib.runs.untrained_student`). It has the
    trained student's shape (encoder window, frame merge, decoder layers), so a before/after
    comparison shows what training changed and nothing else. Returns ``(model, feature_extractor)``."""
    if after.model is None:
        raise ValueError(f"no trained student to match: {after.reason}")
    model, _, feature_extractor = untrained_student(TrainConfig.from_dict(after.config))
    return model, feature_extractor


# --------------------------------------------------------------------------------------------
# Points for a map: pooled utterances or sampled frames
# --------------------------------------------------------------------------------------------


def pool_states(states: EncoderStates) -> np.ndarray:
    """Masked mean over valid frames: ``(utterances, dim)``. An utterance without valid frames
    (impossible for real audio) is an error, not a silent zero."""
    counts = states.mask.sum(1)
    if (counts == 0).any():
        bad = [states.ids[i] for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"{states.name}: utterances without valid frames: {bad}")
    weights = states.mask[..., None].astype(np.float32)
    return (states.hidden * weights).sum(1) / counts[:, None].astype(np.float32)


def frame_positions(valid: np.ndarray, per_utterance: int) -> np.ndarray:
    """Indices of ``per_utterance`` evenly spaced True entries of a 1-D mask (all if fewer)."""
    where = np.flatnonzero(valid)
    if len(where) <= per_utterance:
        return where
    return where[np.round(np.linspace(0, len(where) - 1, per_utterance)).astype(int)]


def sample_frames(states: EncoderStates, per_utterance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evenly spaced valid frames of every utterance.

    Returns ``(points (n, dim), utterance (n,), frame (n,))``. The choice depends only on the
    mask, so two models with the same frame rate give the same (utterance, frame) pairs.
    """
    points, utt, frame = [], [], []
    for i in range(len(states)):
        pos = frame_positions(states.mask[i], per_utterance)
        points.append(states.hidden[i, pos])
        utt.append(np.full(len(pos), i))
        frame.append(pos)
    return np.concatenate(points), np.concatenate(utt), np.concatenate(frame)


def unit_rows(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Rows scaled to unit L2 norm (directions only, the geometry of a cosine cost)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


# --------------------------------------------------------------------------------------------
# 2-D maps
# --------------------------------------------------------------------------------------------


def embed_2d(points: np.ndarray, method: str, *, seed: int = 0, neighbours: int = 15,
             perplexity: float = 30.0, pca_dims: int | None = 50, threads: int | None = 1) -> np.ndarray:
    """``(n, dim) -> (n, 2)`` with PCA, t-SNE (scikit-learn) or UMAP (umap-learn).

    Deterministic for a given ``seed``: PCA is exact; t-SNE starts from the PCA layout; UMAP runs
    single-threaded (``n_jobs=1``) with ``random_state=seed``. ``perplexity`` and ``neighbours``
    are capped for small ``n`` (t-SNE needs ``perplexity < n``). Before t-SNE and UMAP the points
    are reduced to ``pca_dims`` principal components (the usual first step: it drops noise
    directions and makes the neighbour search cheap); ``None`` keeps every dimension.

    ``threads``: BLAS/OpenMP threads while fitting (``None``: the libraries' default). One thread
    is the default because it was much faster on this book's shared 2-core CPU: 2,400 points of
    width 512 took t-SNE 27 s, UMAP 12 s and PCA 0.05 s with one thread, and 86 s, 52 s and 2.3 s
    with two, while other jobs ran (OpenMP threads wait for each other on a busy machine).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        return _embed_2d(points, method, seed=seed, neighbours=neighbours, perplexity=perplexity,
                         pca_dims=pca_dims)


def _embed_2d(points, method, *, seed, neighbours, perplexity, pca_dims) -> np.ndarray:
    from sklearn.decomposition import PCA

    points = np.asarray(points, dtype=np.float32)
    n = points.shape[0]
    if n < 3:
        raise ValueError(f"embed_2d: need at least 3 points, got {n}")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(points)
    if method in ("tsne", "umap") and pca_dims is not None and points.shape[1] > pca_dims and n > pca_dims:
        points = PCA(n_components=pca_dims, random_state=seed).fit_transform(points).astype(np.float32)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perp = float(min(perplexity, max(1.0, (n - 1) / 3)))
        return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(points)
    if method == "umap":
        import warnings

        import umap

        with warnings.catch_warnings():  # "n_jobs overridden by random_state" and friends
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_components=2, n_neighbors=int(min(neighbours, n - 1)),
                                random_state=seed, n_jobs=1,
                                init="spectral" if n > 10 else "random")
            return reducer.fit_transform(points)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@dataclass
class JointMap:
    """One 2-D map of several models: ``coords[name]`` is ``(points_of_name, 2)``."""

    method: str
    coords: dict[str, np.ndarray]
    axis_labels: tuple[str, str]
    seconds: float

    @property
    def title(self) -> str:
        return METHOD_TITLES.get(self.method, self.method)


def joint_map(sets: Mapping[str, np.ndarray], method: str, *, seed: int = 0, normalize: bool = True,
              **kwargs) -> JointMap:
    """Fit one 2-D map on the union of every set's points, then split it back per set.

    ``sets``: name → ``(n_name, dim)``, one ``dim`` for all (a student of another width must go
    through its projector first). ``normalize``: scale every point to unit length first, so the
    map compares directions (what a cosine cost and the unit-norm projector see) and not the
    norms, which differ between a raw encoder and a projector's output.
    """
    dims = {name: x.shape[1] for name, x in sets.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"joint_map: sets of different widths {dims}; project students into the "
                         "teacher's space (project_states) before mapping them together")
    names = list(sets)
    stacked = np.concatenate([sets[n] for n in names]).astype(np.float32)
    if normalize:
        stacked = unit_rows(stacked)
    start = time.perf_counter()
    coords = embed_2d(stacked, method, seed=seed, **kwargs)
    seconds = time.perf_counter() - start
    if method == "pca":
        from sklearn.decomposition import PCA
        from threadpoolctl import threadpool_limits

        with threadpool_limits(kwargs.get("threads", 1)):
            ratio = PCA(n_components=2, random_state=seed).fit(stacked).explained_variance_ratio_
        labels = (f"PC 1 ({100 * ratio[0]:.0f} % of variance)", f"PC 2 ({100 * ratio[1]:.0f} % of variance)")
    else:
        labels = (f"{METHOD_TITLES[method]} 1 (arbitrary units)", f"{METHOD_TITLES[method]} 2 (arbitrary units)")
    split = np.cumsum([len(sets[n]) for n in names])[:-1]
    return JointMap(method, dict(zip(names, np.split(coords, split))), labels, seconds)


def knn_overlap(high: np.ndarray, low: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each point's ``k`` nearest neighbours (Euclidean) in ``high`` that are
    also among its ``k`` nearest in ``low``: 1 = local neighbourhoods kept, ``k/n`` = chance."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(high) - 1)
    nh = NearestNeighbors(n_neighbors=k + 1).fit(high).kneighbors(high, return_distance=False)[:, 1:]
    nl = NearestNeighbors(n_neighbors=k + 1).fit(low).kneighbors(low, return_distance=False)[:, 1:]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(nh, nl)]))


def distance_correlation(high: np.ndarray, low: np.ndarray, *, max_points: int = 1000,
                         seed: int = 0) -> float:
    """Spearman rank correlation between all pairwise distances in ``high`` and in ``low``:
    1 = far points stay far (global layout kept). At most ``max_points`` (seeded sample)."""
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    if len(high) > max_points:
        keep = np.random.default_rng(seed).choice(len(high), max_points, replace=False)
        high, low = high[keep], low[keep]
    return float(spearmanr(pdist(high), pdist(low)).statistic)


def preservation(high: np.ndarray, low: np.ndarray, *, k: int = 10, normalize: bool = True,
                 threads: int | None = 1) -> dict[str, float]:
    """What a 2-D map kept of its points: ``knn_overlap`` (local) and ``distance_correlation``
    (global). ``normalize`` as in `joint_map` (compare with the space the map was fitted in);
    ``threads`` as in `embed_2d`."""
    from threadpoolctl import threadpool_limits

    high = unit_rows(high) if normalize else high
    with threadpool_limits(threads):
        return {"knn_overlap": knn_overlap(high, low, k), "distance_correlation": distance_correlation(high, low)}


# --------------------------------------------------------------------------------------------
# Dynamic time warping
# --------------------------------------------------------------------------------------------


def cosine_cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``1 - cos(a_i, b_j)``: ``(n, dim), (m, dim) -> (n, m)``, in [0, 2]."""
    return np.clip(1.0 - unit_rows(np.asarray(a, np.float64)) @ unit_rows(np.asarray(b, np.float64)).T, 0.0, 2.0)


@dataclass
class DTWResult:
    """``distance``: summed cost along the best path; ``normalized``: that sum divided by the
    path length (mean cost per step, comparable across utterances); ``path``: ``(steps, 2)``
    index pairs ``(i, j)`` from ``(0, 0)`` to ``(n-1, m-1)``."""

    distance: float
    normalized: float
    path: np.ndarray


def dtw(cost: np.ndarray) -> DTWResult:
    """Dynamic time warping on a cost matrix ``(n, m)``.

    ``D[i, j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1])`` with ``D[0, 0] =
    cost[0, 0]``: every frame of both sequences is matched, in order, with steps
    diagonal / down / right. Cells on one anti-diagonal ``i + j = s`` depend only on the two
    previous anti-diagonals, so each anti-diagonal is one vectorised numpy step (``n + m - 1``
    steps instead of ``n * m``). The path is traced back from ``(n-1, m-1)``, preferring the
    diagonal, then ``(i-1, j)``, then ``(i, j-1)`` on ties.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise ValueError(f"dtw: cost must be a non-empty (n, m) matrix, got shape {cost.shape}")
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)  # acc[i+1, j+1] = D[i, j]; row/column 0 is the border
    acc[0, 0] = 0.0
    for s in range(n + m - 1):
        i = np.arange(max(0, s - m + 1), min(n, s + 1))
        j = s - i
        best = np.minimum(np.minimum(acc[i, j], acc[i, j + 1]), acc[i + 1, j])
        acc[i + 1, j + 1] = cost[i, j] + best
    path = [(n - 1, m - 1)]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        steps = ((i - 1, j - 1), (i - 1, j), (i, j - 1))
        i, j = min(steps, key=lambda ij: acc[ij[0] + 1, ij[1] + 1] if ij[0] >= 0 and ij[1] >= 0 else np.inf)
        path.append((i, j))
    path = np.array(path[::-1])
    distance = float(acc[n, m])
    return DTWResult(distance, distance / len(path), path)


def dtw_distances(reference: EncoderStates, other: EncoderStates) -> list[DTWResult]:
    """DTW (cosine cost) between the valid frames of each utterance in two sets of states of
    the same width and the same utterances (e.g. teacher vs projected student)."""
    if reference.ids != other.ids:
        raise ValueError(f"dtw_distances: {reference.name} and {other.name} hold different utterances")
    if reference.dim != other.dim:
        raise ValueError(f"dtw_distances: {reference.name} has width {reference.dim}, {other.name} "
                         f"{other.dim}; project the student into the teacher's space first")
    return [dtw(cosine_cost(reference.sequence(i), other.sequence(i))) for i in range(len(reference))]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _save(fig, path: str | Path | None):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_maps(maps: Sequence[JointMap], *, colour_by: str = "model",
              labels: Mapping[str, Sequence[str]] | None = None, title: str = "",
              path: str | Path | None = None):
    """One panel per map. ``colour_by="model"``: one colour and marker per model;
    ``colour_by="speaker"`` (or any other per-point label): colours from ``labels[name]`` (one
    label per point of that model), markers still tell the models apart. Markers are hollow and
    of decreasing size, so models that put a point in the same place stay visible."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if colour_by != "model" and labels is None:
        raise ValueError(f"plot_maps: colour_by={colour_by!r} needs labels (name -> one label per point)")
    names = list(maps[0].coords)
    fig, axes = plt.subplots(1, len(maps), figsize=(5.0 * len(maps) + 2.2, 4.8), squeeze=False,
                             layout="constrained")
    model_colours = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    classes = sorted({str(x) for n in names for x in labels[n]}) if colour_by != "model" else []
    class_colours = {c: plt.cm.tab10(i % 10) if len(classes) <= 10 else plt.cm.tab20(i % 20)
                     for i, c in enumerate(classes)}
    for ax, jm in zip(axes[0], maps):
        for k, name in enumerate(names):
            xy = jm.coords[name]
            if colour_by == "model":
                colours = [model_colours[name]] * len(xy)
            else:
                colours = [class_colours[str(x)] for x in labels[name]]
            ax.scatter(xy[:, 0], xy[:, 1], s=70 - 12 * k, marker=_MARKERS[k % len(_MARKERS)],
                       facecolors="none", edgecolors=colours, linewidths=0.9, alpha=0.8)
        ax.set_title(f"{jm.title} ({jm.seconds:.1f} s to fit)")
        ax.set_xlabel(jm.axis_labels[0])
        ax.set_ylabel(jm.axis_labels[1])
    handles = [Line2D([], [], ls="", marker=_MARKERS[k % len(_MARKERS)], mfc="none",
                      mec=model_colours[n] if colour_by == "model" else "0.3", label=n)
               for k, n in enumerate(names)]
    fig.legend(handles=handles, title="model", loc="outside right upper", fontsize=8)
    if classes:
        chandles = [Line2D([], [], ls="", marker="o", color=class_colours[c], label=c) for c in classes]
        fig.legend(handles=chandles, title=colour_by, loc="outside right lower", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_dtw_paths(panels: Sequence[tuple[str, np.ndarray, DTWResult]], *, frame_seconds=(0.02, 0.02),
                   title: str = "", path: str | Path | None = None):
    """Cost matrices with their DTW paths, one panel per ``(label, cost, result)``; axes in
    seconds (teacher frames down, student frames across). The dashed line is the diagonal
    a student of the same tempo would follow."""
    import matplotlib.pyplot as plt

    ft, fs = frame_seconds
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (label, cost, res) in zip(axes[0], panels):
        n, m = cost.shape
        im = ax.imshow(cost, origin="lower", aspect="auto", cmap="viridis",
                       extent=(0, m * fs, 0, n * ft), vmin=0, vmax=max(1e-6, float(np.quantile(cost, 0.99))))
        ax.plot((res.path[:, 1] + 0.5) * fs, (res.path[:, 0] + 0.5) * ft, color="white", lw=1.5,
                label="DTW path")
        ax.plot([0, m * fs], [0, n * ft], color="red", lw=0.8, ls="--", label="diagonal")
        ax.set_title(f"{label}\nDTW {res.normalized:.3f} per step")
        ax.set_xlabel("student time (s)")
        ax.set_ylabel("teacher time (s)")
        ax.legend(loc="upper left", fontsize=8)
        fig.colorbar(im, ax=ax, label="cosine distance 1 − cos")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_dtw_distances(values: Mapping[str, Sequence[float]], ids: Sequence[str], *, title: str = "",
                       path: str | Path | None = None):
    """Grouped bars: DTW distance per utterance (mean cosine cost per path step) for each
    comparison in ``values`` (label → one value per utterance)."""
    import matplotlib.pyplot as plt

    labels = list(values)
    x = np.arange(len(ids))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(ids) + 2), 4.2))
    for k, label in enumerate(labels):
        ax.bar(x + (k - (len(labels) - 1) / 2) * width, values[label], width, label=label)
    ax.set_xticks(x, [str(i) for i in ids], rotation=70, fontsize=7)
    ax.set_xlabel("utterance")
    ax.set_ylabel("DTW distance (mean 1 − cos per step)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
