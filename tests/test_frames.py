"""Frame arithmetic, downsampling and teacher/student alignment (kdlib.frames)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlib import frames


def test_chain_of_lengths_for_30_seconds():
    assert frames.N_SAMPLES == 480_000
    assert frames.samples_to_mel_frames(480_000) == 3000
    assert frames.mel_to_encoder_frames(3000) == 1500
    assert frames.samples_to_encoder_frames(480_000) == 1500
    assert frames.downsampled_frames(1500, 3) == 500
    # longer than 30 s is cut to Whisper's window
    assert frames.samples_to_mel_frames(600_000) == 3000


@pytest.mark.parametrize("samples, mel, enc, student", [
    (16_000, 100, 50, 17),      # 1 s
    (16_001, 101, 51, 17),      # one sample more opens a new 10 ms frame
    (48_000, 300, 150, 50),     # 3 s
    (1, 1, 1, 1),
    (0, 0, 0, 0),
])
def test_short_clip_lengths(samples, mel, enc, student):
    assert frames.samples_to_mel_frames(samples) == mel
    assert frames.mel_to_encoder_frames(mel) == enc
    assert frames.downsampled_frames(enc, 3) == student


def test_encoder_frames_match_whisper_convs():
    """mel_to_encoder_frames agrees with running Whisper's two convolutions on every length."""
    conv1 = torch.nn.Conv1d(1, 1, 3, padding=1)
    conv2 = torch.nn.Conv1d(1, 1, 3, stride=2, padding=1)
    for mel in (1, 2, 3, 7, 100, 2999, 3000):
        with torch.no_grad():
            out = conv2(conv1(torch.zeros(1, 1, mel)))
        assert out.shape[-1] == frames.mel_to_encoder_frames(mel)


def test_receptive_field():
    rf = frames.encoder_receptive_field()
    assert rf["mel_frames"] == 5 and rf["samples"] == 1040 and rf["stride_ms"] == 20
    # check by perturbing one mel frame and seeing which encoder frames move
    conv1 = torch.nn.Conv1d(1, 1, 3, padding=1)
    conv2 = torch.nn.Conv1d(1, 1, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, 40)
    base = conv2(conv1(x))
    seen_by_10 = []
    for j in range(40):
        y = x.clone()
        y[..., j] = 1.0
        if (conv2(conv1(y)) - base)[0, 0, 10].abs() > 0:
            seen_by_10.append(j)
    assert len(seen_by_10) == rf["mel_frames"]


def test_valid_mask():
    mask = frames.valid_mask([3, 0, 5], 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    enc = frames.encoder_valid_mask([16_000, 480_000])
    assert enc.shape == (2, 1500)
    assert enc.sum(1).tolist() == [50, 1500]


def test_downsample_shapes_and_values():
    x = torch.arange(2 * 7 * 2, dtype=torch.float32).view(2, 7, 2)
    out, mask = frames.downsample(x, 3)
    assert out.shape == (2, 3, 2) and mask.all()
    assert torch.allclose(out[0, 0], x[0, :3].mean(0))
    # the last window holds a single real frame: masked mean = that frame, not diluted by padding
    assert torch.allclose(out[0, 2], x[0, 6])
    out_s, _ = frames.downsample(x, 3, mode="stride")
    assert torch.equal(out_s[0], x[0, ::3])
    out_m, _ = frames.downsample(x, 3, mode="max")
    assert torch.equal(out_m[0, 0], x[0, 2])


def test_downsample_respects_mask():
    x = torch.randn(1, 9, 4)
    mask = frames.valid_mask([4], 9)
    out, out_mask = frames.downsample(x, 3, mask)
    assert out_mask.tolist() == [[True, True, False]]
    assert torch.allclose(out[0, 1], x[0, 3])  # only frame 3 is valid in window 1
    assert torch.equal(out[0, 2], torch.zeros(4))
    # changing padded frames changes nothing
    y = x.clone()
    y[0, 4:] = 1e6
    assert torch.equal(frames.downsample(y, 3, mask)[0], out)


def test_frame_downsampler_starts_as_average_and_learns():
    x = torch.randn(2, 1500, 8)
    layer = frames.FrameDownsampler(8, factor=3)
    out, mask = layer(x)
    assert out.shape == (2, 500, 8) and mask.shape == (2, 500)
    ref, _ = frames.downsample(x, 3)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert layer.conv.weight.grad is not None
    wide = frames.FrameDownsampler(8, factor=3, kernel_size=5)
    assert wide(x)[0].shape == (2, 500, 8)


def test_frame_downsampler_ignores_padding():
    x = torch.randn(1, 10, 4)
    mask = frames.valid_mask([5], 10)
    layer = frames.FrameDownsampler(4)
    a, m = layer(x, mask)
    x2 = x.clone()
    x2[0, 5:] = 100.0
    b, _ = layer(x2, mask)
    assert torch.equal(a, b)
    assert m.tolist() == [[True, True, False, False]]


def test_align_pool_shapes_values_and_mask():
    t = torch.randn(2, 1500, 16)
    out, mask = frames.align_pool(t, 500)
    assert out.shape == (2, 500, 16) and mask.all()
    assert torch.allclose(out, t.view(2, 500, 3, 16).mean(2), atol=1e-5)
    # a non-divisible length still pools (PyTorch's adaptive windows)
    out7, _ = frames.align_pool(t[:, :10], 3)
    assert out7.shape == (2, 3, 16)
    # masks: 1 s of speech = 50 teacher frames -> 17 student frames (ceil)
    tmask = frames.valid_mask([50, 1500], 1500)
    out, mask = frames.align_pool(t, 500, tmask)
    assert mask.sum(1).tolist() == [17, 500]
    # window 16 holds teacher frames 48, 49 (valid) and 50 (padding): the mean of the valid two
    assert torch.allclose(out[0, 16], t[0, 48:50].mean(0), atol=1e-5)
    assert torch.equal(out[0, 17:], torch.zeros(483, 16))


def test_align_interpolate_shapes_values_and_mask():
    t = torch.linspace(0, 1, 1500).view(1, 1500, 1).repeat(2, 1, 3)
    out, mask = frames.align_interpolate(t, 500)
    assert out.shape == (2, 500, 3) and mask.all()
    # a linear ramp stays a linear ramp, read at the student's frame centres
    centres = (torch.arange(500) + 0.5) * 3 - 0.5
    assert torch.allclose(out[0, :, 0], centres / 1499, atol=1e-5)
    tmask = frames.valid_mask([50, 1500], 1500)
    _, mask = frames.align_interpolate(t, 500, tmask)
    assert mask.sum(1).tolist() == [17, 500]
    # upsampling works too
    up, upmask = frames.align_interpolate(t[:, :500], 1500)
    assert up.shape == (2, 1500, 3) and upmask.all()


def test_align_dispatch_and_errors():
    t = torch.randn(1, 30, 2)
    assert torch.equal(frames.align(t, 10, method="pool")[0], frames.align_pool(t, 10)[0])
    assert torch.equal(frames.align(t, 10, method="interp")[0], frames.align_interpolate(t, 10)[0])
    with pytest.raises(ValueError):
        frames.align(t, 10, method="nearest")
    with pytest.raises(ValueError):
        frames.downsample(t, 3, mode="median")


def test_frame_times():
    times = frames.frame_times(1500)
    assert np.isclose(float(times[0]), 0.01) and np.isclose(float(times[-1]), 29.99)
