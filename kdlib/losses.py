"""Distillation losses: pure functions on tensors, and the ``DistillationLoss`` that combines them.

Every function here is aware of padding. Token-level losses take a mask of real tokens
(``labels != -100``); frame-level losses take a mask of real encoder frames. Whatever sits at a
padded position (finite garbage, ``inf`` or ``nan``) changes neither the loss nor the gradient at
real positions, and the gradient at padded positions is exactly zero. Reductions follow
distil-whisper: sum over real positions, divided by the number of real positions.

Shapes used below::

    logits   (batch, tokens, vocab)      labels / token mask  (batch, tokens)
    hidden   (batch, frames, d_model)    frame mask           (batch, frames)
    emb      (batch, d)                  one vector per utterance

Masks may be ``bool`` or 0/1 of any dtype; ``None`` means "every position is real". Losses are
computed in float32 even when the inputs are half precision (AMP), because ``log_softmax`` over a
51 865-token vocabulary and ``arccos`` near 1 both lose too much in 16 bits.

The terms:

======================  ================================================================
``cross_entropy``       hard labels (teacher pseudo-labels or references), -100 ignored
``kl_divergence``       Hinton et al. 2015: KL(p_T^teacher || p_T^student) * T^2
``kl_divergence_topk``  the same KL from a cached teacher: top-k logits + log-sum-exp (``TopKLogits``)
``logit_l2``            Caruana et al. (Bucilua 2006, Ba & Caruana 2014): regress logits
``hidden_mse``          FitNets-style mean squared error between hidden states
``geodesic``            angle between L2-normalised vectors (arc length on the unit sphere)
``info_nce``            contrastive: each student utterance must pick its own teacher
``curve_alignment``     velocity / curvature of the hidden-state path on the sphere
``taid_loss``           TAID (Shing et al., ICLR 2025): target interpolated in logit space
======================  ================================================================

``TAIDSchedule`` holds TAID's interpolation coefficient t and its adaptive update; it is the only
stateful object here besides ``DistillationLoss``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IGNORE_INDEX",
    "cross_entropy",
    "kl_divergence",
    "TopKLogits",
    "kl_divergence_topk",
    "logit_l2",
    "hidden_mse",
    "geodesic",
    "info_nce",
    "pool_utterance",
    "curve_alignment",
    "taid_loss",
    "TAIDSchedule",
    "LossWeights",
    "DistillationLoss",
]

IGNORE_INDEX = -100  # the label value Hugging Face and distil-whisper use for padding


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _mask_or_all(mask: Optional[Tensor], shape: torch.Size, device, name: str) -> Tensor:
    """A bool mask of ``shape`` (the input's shape without its last dimension)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"kdlib.losses: {name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        hint = ""
        if a.shape[:-1] == b.shape[:-1]:
            hint = (
                " (same positions, different last dimension: for logits the two models need the same"
                " vocabulary, e.g. whisper-large-v3 has 51866 tokens and earlier Whisper sizes 51865,"
                " with special-token ids shifted by one; for hidden states pass a projector)"
            )
        raise ValueError(f"kdlib.losses: {what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ{hint}")


def _float(x: Tensor) -> Tensor:
    """At least float32: half precision is upcast, float64 is kept (tests compare in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _zero_like_graph(x: Tensor) -> Tensor:
    """A zero that is still connected to ``x`` (so ``backward`` works with nothing real).

    Summing an empty slice, not ``x.sum() * 0``, which is nan when padding holds nan.
    """
    return _float(x).reshape(-1)[:0].sum()


def _unit(x: Tensor, eps: float) -> Tensor:
    """L2-normalise the last dimension: ``x / sqrt(|x|^2 + eps^2)``.

    Smooth everywhere, so a zero vector maps to zero with a finite (zero) gradient instead of the
    ``0/0`` of a plain division. For ``|x| >> eps`` it is the usual normalisation.
    """
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps * eps)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]``; a graph-connected zero when nothing is real."""
    picked = values[mask]
    if picked.numel() == 0:
        return _zero_like_graph(values)
    return picked.sum() / picked.numel()


# --------------------------------------------------------------------------------------------
# token-level losses
# --------------------------------------------------------------------------------------------
def cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Hard-label cross-entropy, mean over real tokens.

    Args:
        student_logits: ``(batch, tokens, vocab)`` (any leading shape works).
        labels: ``(batch, tokens)`` token ids, ``-100`` (``IGNORE_INDEX``) at padding.

    Returns:
        Scalar, nats per real token. Zero (still differentiable) if there is no real token.
    """
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"kdlib.losses.cross_entropy: logits {tuple(student_logits.shape)} do not match"
            f" labels {tuple(labels.shape)}"
        )
    real = labels != IGNORE_INDEX
    logits = _float(student_logits[real])  # (real tokens, vocab); padding never enters the graph
    if logits.shape[0] == 0:
        return _zero_like_graph(student_logits)
    return F.cross_entropy(logits, labels[real], reduction="sum") / logits.shape[0]


def kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None, temperature: float = 2.0
) -> Tensor:
    """Soft-label KL(p_T^teacher || p_T^student) * T^2 (Hinton et al. 2015).

    ``p_T = softmax(z / T)``. The KL is summed over the vocabulary, summed over real tokens and
    divided by their number (distil-whisper's convention). The factor T^2 keeps the gradient with
    respect to the student logits of comparable size across temperatures: the gradient of the KL
    alone is ``(q_T - p_T) / T``, which for ``T`` large against the logit gaps behaves like
    ``(z_s - z_t) / (vocab * T^2)``. Below that regime the scaled gradient still depends on T: on
    real Whisper logits (51 865 tokens, peaked) its norm falls about 60-fold from T = 1 to T = 4
    (measured in chapter 03), because flat distributions spread the gradient over the vocabulary.

    Args:
        student_logits, teacher_logits: ``(batch, tokens, vocab)``; the teacher gets no gradient.
        mask: ``(batch, tokens)``, true at real tokens (``labels != -100``); ``None`` = all real.
        temperature: T > 0.

    Returns:
        Scalar >= 0, nats per real token (times T^2).
    """
    if temperature <= 0:
        raise ValueError(f"kdlib.losses.kl_divergence: temperature must be > 0, got {temperature}")
    _check_same_shape(student_logits, teacher_logits, "kl_divergence student vs teacher logits")
    real = _mask_or_all(mask, student_logits.shape[:-1], student_logits.device, "mask")
    student = _float(student_logits[real]) / temperature  # (real tokens, vocab)
    teacher = _float(teacher_logits[real].detach()) / temperature
    if student.shape[0] == 0:
        return _zero_like_graph(student_logits)
    log_q = F.log_softmax(student, dim=-1)
    log_p = F.log_softmax(teacher, dim=-1)
    # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q); exact 0 where p = 0
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    return kl / student.shape[0] * temperature**2


@dataclass
class TopKLogits:
    """Teacher logits as an offline cache keeps them: the k largest per position, their vocabulary
    ids, and the log-sum-exp of the *full* logits at each stored temperature.

    Shapes (``...`` is ``(batch, tokens)`` in training, ``(tokens,)`` on disk)::

        values   (..., k)              the k largest raw teacher logits z (temperature 1)
        indices  (..., k)              their vocabulary ids
        lse      (..., n_temperatures) logsumexp_v(z_v / T) over the whole vocabulary, per T

    and, optionally (``tail_samples = m > 0``), a sample of the tail for an unbiased KL::

        tail_indices (..., n_temperatures, m)  ids drawn with replacement from p_T(. | not top-k)
        tail_plogp   (..., n_temperatures)     sum over the tail of p_T log p_T (no gradient)

    The log-sum-exp cannot be recovered at another temperature from the top-k alone (the tail's
    shape is gone), so it is stored for every temperature the cache is meant for; asking for one
    that is not stored is an error (`lse_at`), never a silent approximation.
    """

    values: Tensor
    indices: Tensor
    lse: Tensor
    temperatures: tuple[float, ...]
    tail_indices: Optional[Tensor] = None
    tail_plogp: Optional[Tensor] = None

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperatures=(1.0, 2.0), tail_samples: int = 0,
                    generator: Optional[torch.Generator] = None) -> "TopKLogits":
        """Keep the top ``k`` of ``logits`` ``(..., vocab)``, the full log-sum-exp per T and, with
        ``tail_samples`` m > 0 (and k < vocab), m tail tokens per T drawn from the teacher's tail."""
        z = _float(logits.detach())
        vocab = z.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"kdlib.losses.TopKLogits: k must be in [1, {vocab}], got {k}")
        values, indices = z.topk(k, dim=-1)
        lse = torch.stack([torch.logsumexp(z / float(t), dim=-1) for t in temperatures], dim=-1)
        tail_indices = tail_plogp = None
        if tail_samples > 0 and k < vocab:
            flat = z.reshape(-1, vocab)
            in_top = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, indices.reshape(-1, k), True)
            ids, plogp = [], []
            for t in temperatures:
                log_p = torch.log_softmax(flat / float(t), dim=-1)
                p = log_p.exp().masked_fill(in_top, 0.0)
                plogp.append((p * log_p).sum(-1))
                # a tail with no mass in float32 (p_tail = 0 weighs it out): sample it uniformly
                weights = torch.where(p.sum(-1, keepdim=True) > 0, p, (~in_top).to(p.dtype))
                ids.append(torch.multinomial(weights, tail_samples, replacement=True, generator=generator))
            tail_indices = torch.stack(ids, dim=1).reshape(*z.shape[:-1], len(temperatures), tail_samples)
            tail_plogp = torch.stack(plogp, dim=-1).reshape(*z.shape[:-1], len(temperatures))
        return cls(values, indices, lse, tuple(float(t) for t in temperatures), tail_indices, tail_plogp)

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def lse_at(self, temperature: float) -> Tensor:
        """``(...)`` log-sum-exp of the full teacher logits divided by ``temperature``."""
        return self.lse[..., self._t_index(temperature)]

    def _t_index(self, temperature: float) -> int:
        for i, t in enumerate(self.temperatures):
            if abs(t - temperature) <= 1e-9 * max(1.0, abs(t)):
                return i
        raise ValueError(
            f"kdlib.losses.TopKLogits: the cache holds the log-sum-exp at T = "
            f"{', '.join(f'{t:g}' for t in self.temperatures)}, not at T = {temperature:g}; rebuild it "
            f"with that temperature (python -m kdlib cache-teacher --temperatures ...)"
        )

    def to(self, device) -> "TopKLogits":
        def move(t):
            return None if t is None else t.to(device)

        return TopKLogits(move(self.values), move(self.indices), move(self.lse), self.temperatures,
                          move(self.tail_indices), move(self.tail_plogp))


def kl_divergence_topk(
    student_logits: Tensor, teacher: TopKLogits, mask: Optional[Tensor] = None, temperature: float = 2.0
) -> Tensor:
    """KL(p_T^teacher || p_T^student) * T^2 when only the teacher's top-k logits are known.

    Without tail samples (``teacher.tail_indices is None``) the estimator is the KL between the
    two distributions *coarsened* to k + 1 outcomes: the teacher's top-k tokens K, and one "tail"
    bucket holding every other token::

        p_i    = exp(z_i / T - lse_T)                i in K, exact (lse_T is the full log-sum-exp)
        p_tail = 1 - sum_K p_i                        exact teacher mass outside K
        q_i    = softmax(s / T)_i                     the student has all its logits: exact
        q_tail = sum_{j not in K} q_j                 (a log-sum-exp over the student's non-K logits)
        KL_K   = sum_K p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)

    Bias, exactly (the chain rule of KL): ``KL_full = KL_K + p_tail * KL(p(.|tail) || q(.|tail))``,
    where ``p(.|tail)`` is the teacher's distribution *within* the tail. So KL_K is never above the
    exact KL, it is exact when k = vocab (no tail) or when the student spreads its tail mass in the
    teacher's proportions, and its error is at most p_tail times the within-tail mismatch. The
    gradient on a tail logit is ``q_j (1 - p_tail / q_tail) / T``: the student is taught *how much*
    mass to leave outside K, not how to share it.

    With m tail samples ``j_1..j_m ~ p_T(. | tail)`` (drawn once, when the cache was built) the tail
    term is instead ``sum_tail p log p - p_tail * mean_s log q_{j_s}``: the first part is stored
    exactly (it carries no gradient), the second is an unbiased estimate of the tail's
    cross-entropy, so value and gradient are unbiased over the draw (variance
    ``p_tail^2 Var(log q_j) / m``, a single token's estimate may even be slightly negative). This
    matters at T = 2, where Whisper's tempered distribution keeps most of its mass outside any
    practical top-k (``benchmarks/topk_kl.py``). Averaging, masking and the T^2 factor are those of
    `kl_divergence`.

    Args:
        student_logits: ``(batch, tokens, vocab)``.
        teacher: `TopKLogits` with ``(batch, tokens, k)`` values/indices and ``temperature`` stored.
        mask: ``(batch, tokens)`` real tokens, or ``None``. Padded positions may hold anything.
        temperature: T > 0; must be one of ``teacher.temperatures``.

    Returns:
        Scalar, nats per real token (times T^2); >= 0 with the lumped tail, an unbiased estimate
        (possibly a little below 0 on a near-perfect student) with tail samples.
    """
    if temperature <= 0:
        raise ValueError(f"kdlib.losses.kl_divergence_topk: temperature must be > 0, got {temperature}")
    if tuple(teacher.values.shape[:-1]) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"kdlib.losses.kl_divergence_topk: teacher top-k positions {tuple(teacher.values.shape[:-1])}"
            f" do not match student logits {tuple(student_logits.shape[:-1])}"
        )
    vocab, k = student_logits.shape[-1], teacher.k
    if k > vocab:
        raise ValueError(f"kdlib.losses.kl_divergence_topk: k = {k} exceeds the student's vocabulary {vocab}")
    lse = teacher.lse_at(temperature)
    real = _mask_or_all(mask, student_logits.shape[:-1], student_logits.device, "mask")
    student = _float(student_logits[real]) / temperature  # (n, vocab)
    if student.shape[0] == 0:
        return _zero_like_graph(student_logits)
    real_t = real.to(teacher.values.device)
    index = teacher.indices[real_t].to(student.device, torch.long)  # (n, k)
    if int(index.max()) >= vocab:
        raise ValueError(
            f"kdlib.losses.kl_divergence_topk: the teacher's top-k holds token id {int(index.max())}, the student's"
            f" vocabulary has {vocab} tokens (whisper-large-v3 has 51866, earlier sizes 51865)"
        )
    log_p = _float(teacher.values[real_t].to(student.device)) / temperature - _float(lse[real_t].to(student.device))[:, None]
    log_q = F.log_softmax(student, dim=-1)
    kl = (log_p.exp() * (log_p - log_q.gather(-1, index))).sum()
    if k < vocab:
        # Teacher tail mass; float32 rounding can make sum_K p exceed 1 by ~1e-7: clamp to 0.
        p_tail = (-torch.expm1(torch.logsumexp(log_p, dim=-1).clamp(max=0.0))).detach()  # (n,)
        if teacher.tail_indices is not None:  # sampled tail: unbiased
            i = teacher._t_index(temperature)
            samples = teacher.tail_indices[..., i, :][real_t].to(student.device, torch.long)  # (n, m)
            plogp = _float(teacher.tail_plogp[..., i][real_t].to(student.device))  # (n,)
            cross = log_q.gather(-1, samples).mean(-1)  # (n,) estimate of E_tail[log q]
            return (kl + (plogp - p_tail * cross).sum()) / student.shape[0] * temperature**2
        log_q_tail = torch.logsumexp(log_q.scatter(-1, index, float("-inf")), dim=-1)  # (n,)
        has_tail = p_tail > 0
        log_p_tail = torch.log(torch.where(has_tail, p_tail, torch.ones_like(p_tail)))
        kl = kl + torch.where(has_tail, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(p_tail)).sum()
    return kl / student.shape[0] * temperature**2


def logit_l2(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Logit regression (Caruana et al.: Bucilua 2006, Ba & Caruana 2014).

    Squared difference of raw logits, averaged over the vocabulary and over real tokens:
    ``sum_tokens mean_v (z_s - z_t)^2 / n_real``. Raw logits are compared, so unlike KL this also
    penalises a constant shift of all logits, which softmax ignores.

    Args:
        student_logits, teacher_logits: ``(batch, tokens, vocab)``.
        mask: ``(batch, tokens)`` real tokens, or ``None``.
    """
    _check_same_shape(student_logits, teacher_logits, "logit_l2 student vs teacher logits")
    real = _mask_or_all(mask, student_logits.shape[:-1], student_logits.device, "mask")
    diff = _float(student_logits[real]) - _float(teacher_logits[real].detach())  # (real, vocab)
    if diff.shape[0] == 0:
        return _zero_like_graph(student_logits)
    return (diff * diff).mean(-1).sum() / diff.shape[0]


# --------------------------------------------------------------------------------------------
# hidden-state losses
# --------------------------------------------------------------------------------------------
def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared error between hidden states, averaged over ``d_model`` and over real frames.

    Args:
        student_hidden, teacher_hidden: ``(batch, frames, d_model)``, same shape (project the
            student first if the widths differ).
        mask: ``(batch, frames)`` real frames, or ``None``.
    """
    _check_same_shape(student_hidden, teacher_hidden, "hidden_mse student vs teacher hidden")
    real = _mask_or_all(mask, student_hidden.shape[:-1], student_hidden.device, "mask")
    diff = _float(student_hidden[real]) - _float(teacher_hidden[real].detach())  # (real, d)
    if diff.shape[0] == 0:
        return _zero_like_graph(student_hidden)
    return (diff * diff).mean(-1).sum() / diff.shape[0]


def geodesic(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None, eps: float = 1e-7) -> Tensor:
    """Mean geodesic distance (angle, radians) between L2-normalised vectors.

    ``theta = arccos(clamp(<s/|s|, t/|t|>, -1 + eps, 1 - eps))``, averaged over real positions.
    Only directions count: scaling the student vector by any positive factor leaves the loss
    unchanged (L2 and MSE would change), which is the point on a radially collapsing student.

    Numerics: arccos has an infinite slope at +-1; the clamp makes the gradient finite there (it is
    exactly zero when the clamp is active, i.e. at identical and at opposite directions). Vectors
    are normalised as ``x / sqrt(|x|^2 + eps^2)``, so a zero vector gives theta = pi/2 and a
    finite gradient. In float32 the cosine of an angle below about 3e-4 rad rounds to 1, so the
    loss cannot resolve angles smaller than that.

    Args:
        student, teacher: ``(..., d)``, same shape, e.g. ``(batch, frames, d)`` or ``(batch, d)``.
        mask: ``(...)`` real positions, or ``None``.

    Returns:
        Scalar in ``[0, pi]``.
    """
    _check_same_shape(student, teacher, "geodesic student vs teacher")
    real = _mask_or_all(mask, student.shape[:-1], student.device, "mask")
    s = _unit(_float(student[real]), eps)  # (real, d)
    t = _unit(_float(teacher[real].detach()), eps)
    if s.shape[0] == 0:
        return _zero_like_graph(student)
    cos = (s * t).sum(-1).clamp(-1.0 + eps, 1.0 - eps)
    return torch.arccos(cos).sum() / s.shape[0]


def pool_utterance(hidden: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Masked mean over frames: one vector per utterance.

    Args:
        hidden: ``(batch, frames, d)``.
        mask: ``(batch, frames)`` real frames, or ``None``.

    Returns:
        ``(batch, d)``; an utterance with no real frame gives the zero vector.
    """
    real = _mask_or_all(mask, hidden.shape[:-1], hidden.device, "mask")
    summed = _float(hidden).masked_fill(~real.unsqueeze(-1), 0.0).sum(1)  # (batch, d)
    count = real.sum(1, keepdim=True).clamp(min=1).to(summed.dtype)
    return summed / count


def info_nce(
    student_emb: Tensor, teacher_emb: Tensor, temperature: float = 0.07, symmetric: bool = True
) -> Tensor:
    """InfoNCE between student and teacher utterance embeddings across the batch.

    Both are L2-normalised; ``scores[i, j] = cos(s_i, t_j) / temperature`` (batch x batch). The
    student -> teacher direction is the cross-entropy of picking ``t_i`` for ``s_i`` among all
    teachers in the batch. With ``symmetric=True`` (CLIP's form) the teacher -> student direction
    (columns) is added and the two are averaged; with ``False`` only student -> teacher is used.
    The other utterances of the batch are the negatives, so a batch of one gives exactly 0 and
    the loss only carries signal with two or more utterances. The lower bound is 0 (perfect
    separation) and a loss of ``log(batch)`` means chance.

    Args:
        student_emb, teacher_emb: ``(batch, d)``, same shape (project the student first).
        temperature: tau > 0; small tau sharpens the distribution over the batch.
        symmetric: average both directions (default) or use student -> teacher only.

    Returns:
        Scalar, nats per utterance.
    """
    if temperature <= 0:
        raise ValueError(f"kdlib.losses.info_nce: temperature must be > 0, got {temperature}")
    if student_emb.dim() != 2:
        raise ValueError(f"kdlib.losses.info_nce: expected (batch, d) embeddings, got {tuple(student_emb.shape)}")
    _check_same_shape(student_emb, teacher_emb, "info_nce student vs teacher embeddings")
    s = _unit(_float(student_emb), 1e-7)
    t = _unit(_float(teacher_emb.detach()), 1e-7)
    scores = s @ t.T / temperature  # (batch, batch); the diagonal holds the positive pairs
    target = torch.arange(scores.shape[0], device=scores.device)
    loss = F.cross_entropy(scores, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(scores.T, target))
    return loss


def curve_alignment(
    student_seq: Tensor,
    teacher_seq: Tensor,
    mask: Optional[Tensor] = None,
    velocity_weight: float = 1.0,
    curvature_weight: float = 1.0,
    mode: str = "vectors",
    eps: float = 1e-7,
) -> Tensor:
    """Align the *path* that a hidden-state sequence draws on the unit sphere ("ablation 2").

    Each frame is L2-normalised, ``u_f = x_f / |x_f|``. Velocity is the first difference
    ``v_f = u_{f+1} - u_f`` (a chord; ``|v_f| = 2 sin(theta_f / 2)`` for the step angle theta_f) and
    curvature the second difference ``a_f = v_{f+1} - v_f``. Differences only use pairs/triples of
    consecutive real frames. The loss is
    ``velocity_weight * mean_f D(v_s, v_t) + curvature_weight * mean_f D(a_s, a_t)`` with

    * ``mode="vectors"`` (default): ``D = |v_s - v_t|^2`` (squared L2, summed over d). Needs the
      same width for student and teacher (project the student first).
    * ``mode="shape"``: ``D = (|v_s| - |v_t|)^2``: compares only speed and the size of the turn,
      quantities intrinsic to the path. Widths may differ.

    What holds exactly (and is tested):

    * Zero when the student sequence equals the teacher sequence, and more generally when every
      student frame is a positive multiple of the teacher frame (per-frame rescaling is removed by
      the normalisation, as in ``geodesic``).
    * ``"vectors"``: zero if and only if ``u_s - u_t`` is the same vector c at every real frame
      (velocity term) -- a constant offset *of the unit vectors*. On the sphere that is rare: it
      needs every teacher frame on one small circle (``<u_t, c> = -|c|^2/2``), e.g. a student that
      mirrors the teacher through the plane of that circle. A constant offset added to the raw
      hidden states *before* normalisation is **not** an invariance and does change the loss.
      A rotation applied to both sequences leaves it unchanged; a rotation of the student alone
      does not.
    * ``"shape"``: additionally invariant to any orthogonal transform (rotation or reflection) of
      the student space alone, because lengths of differences are preserved. The price: it
      cannot distinguish a constant-speed arc from the same arc run backwards.

    Order: reversing the student sequence maps ``v_f`` to ``-v_{F-2-f}``, so the curve loss
    changes, while any loss on a pooled (mean) embedding or on the *set* of frames is unchanged.

    Its scale (squared chords, up to 4 per step for velocity and 16 for curvature) is not that of
    the point losses, so its weight needs tuning against them.

    Args:
        student_seq, teacher_seq: ``(batch, frames, d)``; same frames (align lengths first).
        mask: ``(batch, frames)`` real frames, or ``None``.
        velocity_weight, curvature_weight: >= 0 weights of the two terms.
        mode: ``"vectors"`` or ``"shape"``.
        eps: normalisation guard (see ``geodesic``).

    Returns:
        Scalar >= 0.
    """
    if mode not in ("vectors", "shape"):
        raise ValueError(f"kdlib.losses.curve_alignment: mode must be 'vectors' or 'shape', got {mode!r}")
    if student_seq.dim() != 3 or teacher_seq.dim() != 3:
        raise ValueError(
            "kdlib.losses.curve_alignment: expected (batch, frames, d) sequences, got"
            f" {tuple(student_seq.shape)} and {tuple(teacher_seq.shape)}"
        )
    if student_seq.shape[:2] != teacher_seq.shape[:2]:
        raise ValueError(
            "kdlib.losses.curve_alignment: student and teacher need the same (batch, frames), got"
            f" {tuple(student_seq.shape[:2])} and {tuple(teacher_seq.shape[:2])}; pool the teacher first"
        )
    if mode == "vectors":
        _check_same_shape(student_seq, teacher_seq, "curve_alignment (mode='vectors')")
    real = _mask_or_all(mask, student_seq.shape[:-1], student_seq.device, "mask")
    # zero the padded frames so nan/inf garbage there cannot reach the gradient
    u_s = _unit(_float(student_seq).masked_fill(~real.unsqueeze(-1), 0.0), eps)
    u_t = _unit(_float(teacher_seq.detach()).masked_fill(~real.unsqueeze(-1), 0.0), eps)
    v_s, v_t = u_s[:, 1:] - u_s[:, :-1], u_t[:, 1:] - u_t[:, :-1]  # (batch, frames-1, d)
    a_s, a_t = v_s[:, 1:] - v_s[:, :-1], v_t[:, 1:] - v_t[:, :-1]  # (batch, frames-2, d)
    real_v = real[:, 1:] & real[:, :-1]
    real_a = real_v[:, 1:] & real_v[:, :-1]

    def distance(x: Tensor, y: Tensor) -> Tensor:
        if mode == "vectors":
            return ((x - y) ** 2).sum(-1)
        norm_x = torch.sqrt((x * x).sum(-1) + eps * eps)  # smooth at 0 (a frame that repeats)
        norm_y = torch.sqrt((y * y).sum(-1) + eps * eps)
        return (norm_x - norm_y) ** 2

    loss = _zero_like_graph(student_seq)
    if velocity_weight:
        loss = loss + velocity_weight * _masked_mean(distance(v_s, v_t), real_v)
    if curvature_weight:
        loss = loss + curvature_weight * _masked_mean(distance(a_s, a_t), real_a)
    return loss


# --------------------------------------------------------------------------------------------
# TAID
# --------------------------------------------------------------------------------------------
def taid_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None, t: float = 0.4) -> Tensor:
    """TAID: cross-entropy of the student against an interpolated target (Shing et al. 2025).

    ``p_t = softmax((1 - t) * stopgrad(z_s) + t * z_t)`` -- interpolation in **logit** space, as in
    the authors' code (SakanaAI/TAID) -- and the loss is ``-sum_v p_t log q_s`` with
    ``q_s = softmax(z_s)``, summed over real tokens and divided by their number. It differs from
    KL(p_t || q_s) by the entropy of p_t, which carries no gradient, so the two train identically.
    At t = 1 it is cross-entropy against the teacher distribution; at t = 0 the target is the
    student itself (gradient zero). ``TAIDSchedule`` moves t from t_start to t_end.

    Args:
        student_logits, teacher_logits: ``(batch, tokens, vocab)``.
        mask: ``(batch, tokens)`` real tokens, or ``None``.
        t: interpolation coefficient in [0, 1] (a float or a 0-dim tensor).
    """
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"kdlib.losses.taid_loss: t must be in [0, 1], got {t}")
    _check_same_shape(student_logits, teacher_logits, "taid_loss student vs teacher logits")
    real = _mask_or_all(mask, student_logits.shape[:-1], student_logits.device, "mask")
    student = _float(student_logits[real])  # (real tokens, vocab)
    if student.shape[0] == 0:
        return _zero_like_graph(student_logits)
    teacher = _float(teacher_logits[real].detach())
    target = F.softmax((1.0 - t) * student.detach() + t * teacher, dim=-1)
    return -(target * F.log_softmax(student, dim=-1)).sum() / student.shape[0]


class TAIDSchedule:
    """TAID's interpolation coefficient t with the paper's adaptive update.

    Call ``update(loss)`` once per optimizer step with that step's TAID loss; it returns the t to
    use for the next step (``.t`` holds it too). The rule (arXiv 2501.16937, SakanaAI/TAID)::

        r       = (L_prev - L) / L_prev            relative improvement of the loss
        m       = beta * m + (1 - beta) * r        its moving average
        dt      = alpha * sigmoid(m) * (1 - t)
        target  = t_start + (t_end - t_start) * min(1, step / total_steps)
        t       = min(t_end, max(target, t + dt))

    so t never decreases, never falls below the linear schedule and never exceeds t_end; when the
    loss improves quickly t runs ahead of the linear schedule. The first call only records the
    loss (no previous loss to compare with). ``step`` counts completed updates, so after
    ``total_steps`` updates t = t_end (the reference code uses the step index before the
    increment, one step behind; the difference is 1/total_steps of the ramp). A non-finite loss is
    ignored for the momentum (counted in ``skipped``) but the step still advances.
    ``adaptive=False`` gives the plain linear schedule.
    """

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        total_steps: int = 1000,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ):
        if not 0.0 <= t_start < 1.0:
            raise ValueError(f"kdlib.losses.TAIDSchedule: t_start must be in [0, 1), got {t_start}")
        if not t_start <= t_end <= 1.0:
            raise ValueError(f"kdlib.losses.TAIDSchedule: t_end must be in [t_start, 1], got {t_end}")
        if total_steps < 1:
            raise ValueError(f"kdlib.losses.TAIDSchedule: total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= beta < 1.0:
            raise ValueError(f"kdlib.losses.TAIDSchedule: need 0 <= alpha <= 1 and 0 <= beta < 1, got {alpha}, {beta}")
        self.t_start, self.t_end, self.total_steps = float(t_start), float(t_end), int(total_steps)
        self.alpha, self.beta, self.adaptive = float(alpha), float(beta), bool(adaptive)
        self.t = self.t_start
        self.step = 0
        self.momentum = 0.0
        self.prev_loss: Optional[float] = None
        self.skipped = 0

    def linear(self, step: int) -> float:
        """The linear floor after ``step`` completed steps."""
        progress = min(1.0, max(0.0, step / self.total_steps))
        return self.t_start + (self.t_end - self.t_start) * progress

    def update(self, loss) -> float:
        """Record this step's loss (float or tensor) and return t for the next step."""
        loss = float(loss)
        self.step += 1
        delta = 0.0
        if not math.isfinite(loss):
            self.skipped += 1
        elif self.prev_loss is None:
            self.prev_loss = loss
        else:
            relative = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative
            delta = self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
            self.prev_loss = loss
        proposal = self.t + delta if self.adaptive else self.t
        self.t = min(self.t_end, max(self.linear(self.step), proposal))
        return self.t

    def state_dict(self) -> dict:
        return {
            "t_start": self.t_start, "t_end": self.t_end, "total_steps": self.total_steps,
            "alpha": self.alpha, "beta": self.beta, "adaptive": self.adaptive,
            "t": self.t, "step": self.step, "momentum": self.momentum,
            "prev_loss": self.prev_loss, "skipped": self.skipped,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        missing = {"t", "step", "momentum", "prev_loss"} - set(state)
        if missing:
            raise ValueError(f"kdlib.losses.TAIDSchedule.load_state_dict: missing keys {sorted(missing)}")
        for key, value in state.items():
            if not hasattr(self, key):
                raise ValueError(f"kdlib.losses.TAIDSchedule.load_state_dict: unknown key {key!r}")
            setattr(self, key, value)


# --------------------------------------------------------------------------------------------
# the terms, declared once
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    """One loss term of `DistillationLoss`, declared once (torchdistill's registry habit).

    Its ``name`` is everywhere the term is known: the `LossWeights` field holding its weight, the
    key of the loss dict, the column of ``training_history.json`` (and ``w_<name>``, its weight),
    ``final_<name>`` in ``summary.json``. ``reads``: ``"logits"`` (token terms, on real tokens) or
    ``"hidden"`` (encoder states through the projector, on real frames). ``needs``: the inputs it
    cannot do without (a clear error names them); ``full_logits``: a top-k teacher cache will not
    do. ``compute(weights, inputs)`` returns the unweighted term."""

    name: str
    reads: str
    compute: Callable[["LossWeights", dict], Tensor]
    needs: tuple[str, ...] = ()
    full_logits: bool = False


#: Every term, in the order they are summed. Add a term here (with its field in `LossWeights`);
#: the loss, the trainer's log, the summary and the tests pick it up from this table.
TERMS: dict[str, Term] = {}


def term(name: str, reads: str, needs: tuple[str, ...] = (), full_logits: bool = False):
    """Register ``compute(weights, inputs) -> Tensor`` as the term ``name`` (see `Term`)."""
    if reads not in ("logits", "hidden"):
        raise ValueError(f"term {name!r}: reads must be 'logits' or 'hidden', got {reads!r}")

    def register(compute):
        if name in TERMS:
            raise ValueError(f"term {name!r} is declared twice")
        TERMS[name] = Term(name, reads, compute, tuple(needs), full_logits)
        return compute
    return register


@term("ce", reads="logits")
def _ce_term(w, x):
    return cross_entropy(x["student_logits"], x["labels"])


@term("kl", reads="logits", needs=("teacher_logits",))
def _kl_term(w, x):
    kl = kl_divergence_topk if isinstance(x["teacher_logits"], TopKLogits) else kl_divergence
    return kl(x["student_logits"], x["teacher_logits"], x["mask"], w.temperature)


@term("l2", reads="logits", needs=("teacher_logits",), full_logits=True)
def _l2_term(w, x):
    return logit_l2(x["student_logits"], x["teacher_logits"], x["mask"])


@term("mse", reads="hidden")
def _mse_term(w, x):
    return hidden_mse(x["student"], x["teacher"], x["frame_mask"])


@term("geo", reads="hidden")
def _geo_term(w, x):
    if w.geo_kind == "geodesic":
        return geodesic(x["student"], x["teacher"], x["frame_mask"])
    # squared chord between unit vectors, summed over d
    chord = _unit(_float(x["student"]), 1e-7) - _unit(_float(x["teacher"].detach()), 1e-7)
    return hidden_mse(chord, torch.zeros_like(chord), x["frame_mask"]) * chord.shape[-1]


@term("contrastive", reads="hidden")
def _contrastive_term(w, x):
    return info_nce(pool_utterance(x["student"], x["frame_mask"]), pool_utterance(x["teacher"], x["frame_mask"]),
                    w.contrastive_temperature)


@term("curve", reads="hidden")
def _curve_term(w, x):
    return curve_alignment(x["student"], x["teacher"], x["frame_mask"], w.curve_velocity, w.curve_curvature,
                           w.curve_mode)


@term("taid", reads="logits", needs=("teacher_logits", "taid_t"), full_logits=True)
def _taid_term(w, x):
    return taid_loss(x["student_logits"], x["teacher_logits"], x["mask"], float(x["taid_t"]))


def terms_reading(what: str) -> tuple[str, ...]:
    """Names of the terms that read ``"logits"``, ``"hidden"``, or need ``"teacher_logits"``."""
    if what == "teacher_logits":
        return tuple(n for n, t in TERMS.items() if "teacher_logits" in t.needs)
    return tuple(n for n, t in TERMS.items() if t.reads == what)


# --------------------------------------------------------------------------------------------
# the combined objective
# --------------------------------------------------------------------------------------------
@dataclass
class LossWeights:
    """Weights of every term of ``DistillationLoss``; a weight of 0 switches the term off.

    distil-whisper's objective is ``LossWeights(ce=0.8, kl=1.0, temperature=2.0)``.

    Attributes:
        ce: hard-label cross-entropy (labels: references or teacher pseudo-labels).
        kl: soft-label KL * T^2 at ``temperature``.
        l2: logit regression.
        mse: raw hidden-state MSE (student hidden after the projector, if one is given).
        geo: per-frame distance on the sphere; ``geo_kind`` "geodesic" (angle, radians) or "mse"
            (squared chord between unit vectors, ``|u_s - u_t|^2 = 2 - 2 cos``, in [0, 4]).
        contrastive: InfoNCE on pooled utterance embeddings at ``contrastive_temperature``.
        curve: ``curve_alignment`` of the hidden paths (``curve_velocity``, ``curve_curvature``,
            ``curve_mode``); only with ``alignment="curve"``.
        taid: TAID term; ``DistillationLoss.forward`` then needs ``taid_t``.
        alignment: "point" (frames compared one by one; ``curve`` must be 0) or "curve" (the
            curve term is on). Ablation 2 moves the weight from ``geo`` to ``curve`` and sets
            ``alignment="curve"`` (see ``kdlib.distill.stage_weights``).

    Every weight may be 0 at once (e.g. at step 0 of a warm-up with ``ce=0``): ``total`` is then a
    zero that is connected to the student logits, so ``backward`` still works.
    """

    ce: float = 1.0
    kl: float = 0.0
    temperature: float = 2.0
    l2: float = 0.0
    mse: float = 0.0
    geo: float = 0.0
    contrastive: float = 0.0
    contrastive_temperature: float = 0.07
    curve: float = 0.0
    taid: float = 0.0
    alignment: str = "point"
    geo_kind: str = "geodesic"
    curve_velocity: float = 1.0
    curve_curvature: float = 1.0
    curve_mode: str = "vectors"

    TERMS = tuple(TERMS)  # every registered term; each has a weight field here

    def __post_init__(self):
        where = "kdlib.losses.LossWeights"
        for name in self.TERMS + ("curve_velocity", "curve_curvature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
        if self.temperature <= 0 or self.contrastive_temperature <= 0:
            raise ValueError(f"{where}: temperatures must be > 0, got {self.temperature}, {self.contrastive_temperature}")
        if self.alignment not in ("point", "curve"):
            raise ValueError(f"{where}: alignment must be 'point' or 'curve', got {self.alignment!r}")
        if self.geo_kind not in ("geodesic", "mse"):
            raise ValueError(f"{where}: geo_kind must be 'geodesic' or 'mse', got {self.geo_kind!r}")
        if self.curve_mode not in ("vectors", "shape"):
            raise ValueError(f"{where}: curve_mode must be 'vectors' or 'shape', got {self.curve_mode!r}")
        if self.alignment == "point" and self.curve > 0:
            raise ValueError(f"{where}: curve={self.curve} needs alignment='curve' (alignment is 'point')")

    def to_dict(self) -> dict:
        return asdict(self)


_missing = [name for name in TERMS if name not in {f.name for f in fields(LossWeights)}]
if _missing:  # a registered term needs its weight field
    raise TypeError(f"kdlib.losses: term(s) {_missing} have no weight field in LossWeights")


def _pool_frames(x: Tensor, length: int, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Masked adaptive average pooling over time: ``(batch, frames, d) -> (batch, length, d)``.

    Output frame i averages the real input frames in ``[floor(i F / length), ceil((i+1) F / length))``
    (``torch.nn.functional.adaptive_avg_pool1d``'s bins). Returns the pooled frames and a
    ``(batch, length)`` mask that is false where a bin held no real frame.
    """
    frames = x.shape[1]
    values = _float(x)
    real = _mask_or_all(mask, x.shape[:-1], x.device, "teacher_hidden_mask").to(values.dtype)
    out_index = torch.arange(length, device=x.device)
    start = torch.div(out_index * frames, length, rounding_mode="floor")
    end = torch.div((out_index + 1) * frames + length - 1, length, rounding_mode="floor")
    frame = torch.arange(frames, device=x.device)
    bins = ((frame >= start[:, None]) & (frame < end[:, None])).to(values.dtype)  # (length, frames)
    values = values.masked_fill(real.unsqueeze(-1) == 0, 0.0)
    count = real @ bins.T  # (batch, length) real frames per bin
    pooled = torch.matmul(bins, values) / count.clamp(min=1).unsqueeze(-1)  # (batch, length, d)
    return pooled, count > 0


class DistillationLoss(nn.Module):
    """Weighted sum of the terms above, with every component reported for logging.

    ``forward`` returns ``{"total": tensor with grad, "ce": ..., "kl": ..., "l2": ..., "mse": ...,
    "geo": ..., "contrastive": ..., "curve": ..., "taid": ...}``. Components are **detached 0-dim
    tensors** (no device sync until you call ``float()`` on them) of the *unweighted* term; a term
    with weight 0 is not computed and reported as ``None``. ``total = sum weight * term``.

    Token terms (ce, kl, l2, taid) use the real-token mask ``labels != -100``. Hidden terms (mse,
    geo, contrastive, curve) compare ``projector(student_hidden)`` (or the student hidden itself
    when no projector is given and the widths agree) with ``teacher_hidden``. When the teacher
    has a different number of frames (e.g. 1500 teacher frames for 500 student frames, Whisper's
    ~3:1 downsampling), the teacher is brought to the student's length by ``align(teacher_hidden,
    student_frames)`` if given at construction, else by masked adaptive average pooling (bins of
    ``adaptive_avg_pool1d``; pass ``teacher_hidden_mask`` so that padded teacher frames are left
    out). ``hidden_mask`` is the student's frame mask.
    """

    TOKEN_TERMS = terms_reading("logits")
    HIDDEN_TERMS = terms_reading("hidden")

    def __init__(self, weights: Optional[LossWeights] = None, align: Optional[Callable[[Tensor, int], Tensor]] = None):
        super().__init__()
        self.weights = weights if weights is not None else LossWeights()
        self.align = align

    def extra_repr(self) -> str:
        on = {name: getattr(self.weights, name) for name in LossWeights.TERMS if getattr(self.weights, name) > 0}
        return f"terms={on}, temperature={self.weights.temperature}, alignment={self.weights.alignment!r}"

    def _need(self, term: str, **inputs) -> None:
        missing = [name for name, value in inputs.items() if value is None]
        if missing:
            raise ValueError(
                f"kdlib.losses.DistillationLoss: the {term!r} term has weight {getattr(self.weights, term)}"
                f" but {', '.join(missing)} {'was' if len(missing) == 1 else 'were'} not given"
            )

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor,
        teacher_logits: Optional[Tensor | TopKLogits] = None,
        student_hidden: Optional[Tensor] = None,
        teacher_hidden: Optional[Tensor] = None,
        hidden_mask: Optional[Tensor] = None,
        projector: Optional[Callable[[Tensor], Tensor]] = None,
        taid_t: Optional[float] = None,
        teacher_hidden_mask: Optional[Tensor] = None,
    ) -> dict:
        """Compute every term with a nonzero weight.

        Args:
            student_logits: ``(batch, tokens, vocab)``.
            labels: ``(batch, tokens)``, -100 at padding.
            teacher_logits: ``(batch, tokens, vocab)``, needed by kl, l2, taid; or a `TopKLogits`
                from a teacher cache (kl only, through `kl_divergence_topk`).
            student_hidden: ``(batch, frames_s, d_s)``; teacher_hidden ``(batch, frames_t, d_t)``;
                needed by mse, geo, contrastive, curve.
            hidden_mask: ``(batch, frames_s)`` real student frames, or ``None``.
            projector: maps ``(batch, frames_s, d_s) -> (batch, frames_s, d_t)``; required when
                ``d_s != d_t``.
            taid_t: TAID's t for this step (``TAIDSchedule.t``); needed by taid.
            teacher_hidden_mask: ``(batch, frames_t)`` real teacher frames, used when pooling.

        Returns:
            dict: ``total`` (scalar with grad) and each term (detached scalar tensor or ``None``).
        """
        w = self.weights
        on = [t for t in TERMS.values() if getattr(w, t.name) > 0]
        inputs = {"student_logits": student_logits, "labels": labels, "mask": labels != IGNORE_INDEX,
                  "teacher_logits": teacher_logits, "taid_t": taid_t}
        for t in on:
            self._need(t.name, **{name: inputs[name] for name in t.needs})
            if t.full_logits and isinstance(teacher_logits, TopKLogits):
                raise ValueError(
                    f"kdlib.losses.DistillationLoss: the {t.name!r} term needs the teacher's full logits;"
                    f" a teacher cache keeps only the top {teacher_logits.k} (use the live teacher)"
                )
        hidden_terms = [t.name for t in on if t.reads == "hidden"]
        if hidden_terms:
            self._need(hidden_terms[0], student_hidden=student_hidden, teacher_hidden=teacher_hidden)
            inputs["student"], inputs["teacher"], inputs["frame_mask"] = self._prepare_hidden(
                student_hidden, teacher_hidden, hidden_mask, projector, teacher_hidden_mask
            )
        parts: dict[str, Optional[Tensor]] = {name: None for name in TERMS}
        for t in on:
            parts[t.name] = t.compute(w, inputs)

        total = None
        for name, value in parts.items():
            if value is not None:
                term = getattr(w, name) * value
                total = term if total is None else total + term
        if total is None:  # every weight 0: a zero that backward() accepts
            total = _zero_like_graph(student_logits)
        result = {"total": total}
        result.update({name: (None if value is None else value.detach()) for name, value in parts.items()})
        return result

    def _prepare_hidden(self, student_hidden, teacher_hidden, hidden_mask, projector, teacher_hidden_mask):
        if student_hidden.dim() != 3 or teacher_hidden.dim() != 3:
            raise ValueError(
                "kdlib.losses.DistillationLoss: hidden states must be (batch, frames, d), got"
                f" {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
            )
        if student_hidden.shape[0] != teacher_hidden.shape[0]:
            raise ValueError(
                f"kdlib.losses.DistillationLoss: batch sizes differ: student {student_hidden.shape[0]},"
                f" teacher {teacher_hidden.shape[0]}"
            )
        student = projector(student_hidden) if projector is not None else student_hidden
        if student.shape[-1] != teacher_hidden.shape[-1]:
            raise ValueError(
                f"kdlib.losses.DistillationLoss: student width {student.shape[-1]} != teacher width"
                f" {teacher_hidden.shape[-1]}; pass a projector (kdlib.models.RiemannianProjector)"
            )
        frames = student.shape[1]
        frame_mask = _mask_or_all(hidden_mask, student.shape[:-1], student.device, "hidden_mask")
        teacher = teacher_hidden.detach()
        if teacher.shape[1] != frames:
            if self.align is not None:
                teacher = self.align(teacher, frames)
            else:
                teacher, teacher_real = _pool_frames(teacher, frames, teacher_hidden_mask)
                frame_mask = frame_mask & teacher_real
        elif teacher_hidden_mask is not None:
            frame_mask = frame_mask & teacher_hidden_mask.to(device=student.device, dtype=torch.bool)
        return student, teacher, frame_mask
