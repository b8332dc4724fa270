"""Whisper's frame arithmetic, ~3:1 frame downsampling, and teacher/student sequence alignment.

Whisper always sees 30 s. The chain of lengths, for a clip of ``n`` samples at 16 kHz::

    samples (480,000 for 30 s)
      -> log-mel frames: hop 160 samples = 10 ms          -> 3000 (valid: ceil(n / 160))
      -> encoder frames: conv1 (k3 s1) then conv2 (k3 s2)  -> 1500 (20 ms each; valid: ceil(mel / 2))
      -> student frames: our extra ~3:1 downsampling       ->  500 (60 ms each; valid: ceil(enc / 3))

A clip shorter than 30 s is zero-padded, so only its first frames hold speech: the *valid-frame
mask* (`valid_mask`) marks them, and every loss on frame sequences must use it.

Teacher and student sequences of different lengths (1500 teacher frames, 500 student frames) are
compared after *alignment*: `align_pool` averages the teacher over the student's windows
(adaptive average pooling, masked so padding does not dilute the last window), `align_interpolate`
resamples it linearly. Both return the aligned tensor and its mask.

All functions are pure (no state) except `FrameDownsampler`, a learnable strided convolution.
Shapes: ``hidden`` tensors are ``(batch, frames, dim)``; masks are ``(batch, frames)`` bool.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16_000  # Hz
HOP_LENGTH = 160  # samples per log-mel frame (10 ms)
N_FFT = 400  # samples per STFT window (25 ms)
CHUNK_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS  # 480,000
N_MEL_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000
ENCODER_STRIDE = 2  # conv2 of Whisper's encoder
N_ENCODER_FRAMES = N_MEL_FRAMES // ENCODER_STRIDE  # 1500
MEL_FRAME_SECONDS = HOP_LENGTH / SAMPLE_RATE  # 0.01
ENCODER_FRAME_SECONDS = MEL_FRAME_SECONDS * ENCODER_STRIDE  # 0.02


def samples_to_mel_frames(num_samples: int, *, max_frames: int = N_MEL_FRAMES) -> int:
    """Log-mel frames that hold audio: ``ceil(num_samples / 160)``, at most 3000 (30 s)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return min(math.ceil(num_samples / HOP_LENGTH), max_frames)


def conv_out_length(length: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Output length of a 1-d convolution (PyTorch's formula, dilation 1)."""
    return (length + 2 * padding - kernel) // stride + 1


def mel_to_encoder_frames(mel_frames: int) -> int:
    """Encoder frames after Whisper's convs (k3 s1 p1, then k3 s2 p1): ``ceil(mel / 2)``.

    3000 -> 1500. For a partly valid input this counts encoder frames that see any valid mel.
    """
    if mel_frames <= 0:
        return 0
    return conv_out_length(conv_out_length(mel_frames, 3, 1, 1), 3, ENCODER_STRIDE, 1)


def samples_to_encoder_frames(num_samples: int) -> int:
    """Valid encoder frames for a clip of ``num_samples`` (16 kHz): 30 s -> 1500, 1 s -> 50."""
    return mel_to_encoder_frames(samples_to_mel_frames(num_samples))


def downsampled_frames(frames: int, factor: int = 3) -> int:
    """Frames after ``factor``:1 downsampling with the end padded: ``ceil(frames / factor)``.

    1500 -> 500 for factor 3; a window that holds any valid frame is valid.
    """
    return math.ceil(frames / factor)


def encoder_receptive_field() -> dict[str, float]:
    """What one encoder frame sees through Whisper's two convolutions (before attention).

    conv1 (k3 s1) and conv2 (k3 s2) give 5 mel frames, i.e. samples from 4 hops plus one STFT
    window: 4 * 160 + 400 = 1040 samples = 65 ms, on a 20 ms grid. Attention then mixes all
    1500 frames, so the encoder output is not local at all; this is only the convolutional part.
    """
    mel = 1 + (3 - 1) * 1 + (3 - 1) * 1 * 1  # conv1 adds 2, conv2 (after stride-1 conv1) adds 2
    samples = (mel - 1) * HOP_LENGTH + N_FFT
    return dict(mel_frames=mel, samples=samples, milliseconds=1000 * samples / SAMPLE_RATE,
                stride_ms=1000 * ENCODER_FRAME_SECONDS)


def valid_mask(lengths: Sequence[int] | torch.Tensor, max_frames: int,
               device=None) -> torch.Tensor:
    """``(batch, max_frames)`` bool: ``mask[b, t] = t < lengths[b]``."""
    lengths = torch.as_tensor(lengths, device=device).view(-1, 1)
    return torch.arange(max_frames, device=lengths.device).view(1, -1) < lengths


def encoder_valid_mask(num_samples: Sequence[int], *, frames: int = N_ENCODER_FRAMES,
                       device=None) -> torch.Tensor:
    """Valid-frame mask ``(batch, 1500)`` of the encoder output for clips of given lengths."""
    return valid_mask([samples_to_encoder_frames(int(n)) for n in num_samples], frames, device)


def _pad_to_multiple(hidden: torch.Tensor, mask: torch.Tensor | None, factor: int):
    pad = (-hidden.shape[1]) % factor
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if pad:
        hidden = F.pad(hidden, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    return hidden, mask


def downsample(hidden: torch.Tensor, factor: int = 3, mask: torch.Tensor | None = None,
               mode: str = "avg") -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter-free ``factor``:1 frame downsampling.

    ``hidden``: ``(batch, frames, dim)``; ``mask``: ``(batch, frames)`` bool or None (all valid).
    ``mode="avg"``: mean of each window of ``factor`` frames over its *valid* frames only;
    ``mode="max"``: max over the window; ``mode="stride"``: keep the first frame of each window.
    The end is zero-padded to a multiple of ``factor``. Returns ``(out, out_mask)`` with
    ``out``: ``(batch, ceil(frames / factor), dim)``; a window is valid if any frame in it is.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    hidden, mask = _pad_to_multiple(hidden, mask, factor)
    b, t, d = hidden.shape
    windows = hidden.view(b, t // factor, factor, d)
    wmask = mask.view(b, t // factor, factor)
    out_mask = wmask.any(-1)
    if mode == "avg":
        w = wmask.unsqueeze(-1).to(hidden.dtype)
        out = (windows * w).sum(2) / w.sum(2).clamp_min(1.0)
    elif mode == "max":
        out = windows.masked_fill(~wmask.unsqueeze(-1), float("-inf")).amax(2)
        out = torch.where(out_mask.unsqueeze(-1), out, torch.zeros_like(out))
    elif mode == "stride":
        out = windows[:, :, 0]
    else:
        raise ValueError(f"mode must be 'avg', 'max' or 'stride', got {mode!r}")
    return out, out_mask


class FrameDownsampler(nn.Module):
    """Learnable ``factor``:1 downsampling: ``Conv1d(dim, dim, kernel=factor, stride=factor)``.

    Initialised to window averaging (each output channel = mean of its own input channel over
    the window), so before training it equals ``downsample(mode="avg")`` on fully valid input.
    ``(batch, frames, dim) -> (batch, ceil(frames / factor), dim)``; padded frames are zeroed
    before the convolution so they carry nothing into the last window.
    """

    def __init__(self, dim: int, factor: int = 3, kernel_size: int | None = None):
        super().__init__()
        self.factor = factor
        k = kernel_size or factor
        self.conv = nn.Conv1d(dim, dim, kernel_size=k, stride=factor)
        with torch.no_grad():
            self.conv.weight.zero_()
            idx = torch.arange(dim)
            self.conv.weight[idx, idx, :] = 1.0 / k
            self.conv.bias.zero_()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None):
        hidden, mask = _pad_to_multiple(hidden, mask, self.factor)
        extra = self.conv.kernel_size[0] - self.factor
        x = (hidden * mask.unsqueeze(-1).to(hidden.dtype)).transpose(1, 2)  # (batch, dim, frames)
        if extra > 0:  # a wider kernel looks symmetrically into the neighbouring windows
            x = F.pad(x, (extra // 2, extra - extra // 2))
        out = self.conv(x).transpose(1, 2)
        out_mask = mask.view(mask.shape[0], -1, self.factor).any(-1)
        return out, out_mask


def align_pool(teacher: torch.Tensor, target_frames: int,
               teacher_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the teacher sequence down to ``target_frames`` (adaptive average pooling).

    Output frame ``i`` averages teacher frames ``floor(i*T/S) .. ceil((i+1)*T/S) - 1`` (PyTorch's
    ``adaptive_avg_pool1d`` windows), counting only valid ones. ``teacher``: ``(batch, T, dim)``;
    returns ``((batch, S, dim), (batch, S) mask)``; a window is valid if it holds a valid frame.
    """
    b, t, d = teacher.shape
    if teacher_mask is None:
        teacher_mask = torch.ones(b, t, dtype=torch.bool, device=teacher.device)
    m = teacher_mask.to(teacher.dtype).unsqueeze(1)  # (batch, 1, T)
    x = teacher.transpose(1, 2) * m  # (batch, dim, T)
    num = F.adaptive_avg_pool1d(x, target_frames)
    den = F.adaptive_avg_pool1d(m, target_frames)  # fraction of valid frames per window
    out = (num / den.clamp_min(1e-12)).transpose(1, 2)
    out_mask = den.squeeze(1) > 0
    out = out * out_mask.unsqueeze(-1).to(out.dtype)
    return out, out_mask


def align_interpolate(teacher: torch.Tensor, target_frames: int,
                      teacher_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample the teacher sequence to ``target_frames`` by linear interpolation.

    Sample points are frame centres (``align_corners=False``): output frame ``i`` reads the
    teacher at position ``(i + 0.5) * T / S - 0.5``. The output mask takes the teacher's mask at
    the nearest centre; frames next to the end of speech may blend in one padding frame.
    ``teacher``: ``(batch, T, dim)`` -> ``((batch, S, dim), (batch, S) mask)``. Also upsamples.
    """
    b, t, d = teacher.shape
    if teacher_mask is None:
        teacher_mask = torch.ones(b, t, dtype=torch.bool, device=teacher.device)
    out = F.interpolate(teacher.transpose(1, 2), size=target_frames, mode="linear",
                        align_corners=False).transpose(1, 2)
    centres = ((torch.arange(target_frames, device=teacher.device) + 0.5) * t / target_frames)
    src = centres.floor().long().clamp_(0, t - 1)
    out_mask = teacher_mask[:, src]
    out = out * out_mask.unsqueeze(-1).to(out.dtype)
    return out, out_mask


def align(teacher: torch.Tensor, target_frames: int, teacher_mask: torch.Tensor | None = None,
          method: str = "pool") -> tuple[torch.Tensor, torch.Tensor]:
    """`align_pool` (``method="pool"``) or `align_interpolate` (``"interp"``)."""
    if method == "pool":
        return align_pool(teacher, target_frames, teacher_mask)
    if method in ("interp", "interpolate", "linear"):
        return align_interpolate(teacher, target_frames, teacher_mask)
    raise ValueError(f"method must be 'pool' or 'interp', got {method!r}")


def teacher_on_student_frames(teacher: torch.Tensor, mel_frames: torch.Tensor, *, window_frames: int,
                              factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's encoder states on the student's frame grid, and the mask of real frames.

    ``teacher``: ``(batch, T, dim)`` states of a 30 s teacher (T = 1500, 20 ms each);
    ``mel_frames``: ``(batch,)`` log-mel frames holding audio. The student's encoder sees a window
    of ``window_frames`` encoder frames (50 per second: 500 for 10 s) and may merge ``factor``
    frames into one. Both encoders start at the clip's first sample and advance 20 ms per frame,
    so inside the window student frame ``i`` *is* teacher frame ``i`` (no resampling), and with
    merging student frame ``i`` covers teacher frames ``k i .. k i + k - 1`` (masked average, the
    same `downsample` the student's merge applies). Teacher frames past the window are not used:
    the student never sees that audio (clips longer than the window are refused at scan time).

    Returns ``((batch, ceil(window_frames / factor), dim), (batch, ceil(window_frames / factor)) bool)``;
    the mask marks frames that hold audio, for the student and the aligned teacher alike.
    """
    if window_frames > teacher.shape[1]:
        raise ValueError(f"student window of {window_frames} frames is longer than the teacher's {teacher.shape[1]}")
    aligned = teacher[:, :window_frames]
    valid = torch.div(mel_frames.to(teacher.device) + 1, ENCODER_STRIDE, rounding_mode="floor")  # ceil(mel / 2)
    mask = torch.arange(window_frames, device=teacher.device)[None, :] < valid.clamp(min=1)[:, None]
    if factor > 1:
        aligned, mask = downsample(aligned, factor, mask)
    return aligned, mask


def frame_times(frames: int, seconds: float = CHUNK_SECONDS) -> torch.Tensor:
    """Centre time in seconds of each of ``frames`` equal frames spanning ``seconds``."""
    step = seconds / frames
    return (torch.arange(frames) + 0.5) * step
