"""Every script in benchmarks/ runs with ``--quick`` (tiny random models, a few clips, a step or
two) in a subprocess, as a user runs it, and prints its table: the rows and columns the full run
prints, with finite, sane values. Timings are never asserted; properties that hold at any size
are (a length-grouped batch wastes less than a random one, a lumped top-k KL never exceeds the
exact KL, a frozen encoder saves autograd memory), and so are the analytic FLOP projections that
benchmarks/README.md quotes. ``pytest -m benchmark`` selects these tests.

(scripts/gpu_check.py has its own CPU test, tests/test_gpu_check.py.)"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.benchmark

RESULTS = ROOT / "benchmarks" / "results"
NUMBER = r"[-+]?\d[\d,]*\.?\d*(?:e[-+]?\d+)?"


def _results_state():
    return sorted((p.name, p.stat().st_mtime_ns) for p in RESULTS.iterdir()) if RESULTS.is_dir() else []


def run_quick(script: str, timeout: int = 240) -> str:
    """``python benchmarks/<script>.py --quick`` from the repository root; returns its stdout.
    The script must leave benchmarks/results/ as it found it."""
    env = {**os.environ, "KDLIB_PROGRESS": "0", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    before = _results_state()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} --quick exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert _results_state() == before, f"{script} --quick wrote into {RESULTS}"
    return proc.stdout


def num(text: str) -> float:
    value = float(text.replace(",", "").rstrip("%x"))
    assert math.isfinite(value), text
    return value


def one(pattern: str, text: str) -> re.Match:
    matches = list(re.finditer(pattern, text, re.MULTILINE))
    assert len(matches) == 1, f"expected one line matching {pattern!r}, found {len(matches)} in:\n{text}"
    return matches[0]


# --------------------------------------------------------------------------------------------


def test_data_throughput_quick():
    out = run_quick("data_throughput")
    assert one(r"^(\d+) clips, ", out).group(1) == "6"
    paths = ["naive (main process, new resampler per file)", "naive, torch 1 thread",
             "DataLoader workers=0, threads=None", "DataLoader workers=0", "DataLoader workers=2"]
    for audio in ("opus 16k mono", "flac 44.1k stereo"):
        for path in paths:
            row = one(rf"^{re.escape(audio)}\s+{re.escape(path)}\s+({NUMBER})\s+({NUMBER})$", out)
            assert num(row.group(1)) > 0 and num(row.group(2)) > 0
        for path in paths[1:]:  # each path against the naive one, as a ratio
            assert num(one(rf"^  {re.escape(audio)}\s+{re.escape(path)}\s+({NUMBER})x$", out).group(1)) > 0


def test_flops_projection_quick():
    out = run_quick("flops_projection")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| whisper")]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        ("whisper-large-v3", "whisper-small", "30", "1", "12"),
        ("whisper-large-v3", "whisper-small", "30", "3", "12"),
        ("whisper-large-v3", "whisper-small", "20", "1", "12"),
        ("whisper-base", "whisper-base", "10", "1", "6"),
        ("whisper-base", "whisper-base", "10", "1", "4"),
    ]
    for r in rows:
        assert num(r[5]) > num(r[6]) > 0 and 0 < num(r[8].rstrip(" %")) <= 100 and num(r[7]) > 1
    # the projections benchmarks/README.md and the chapters quote (analytic: exact at any size)
    assert [r[7] for r in rows[:2]] == ["6.6x", "10.6x"]


def test_longform_quick():
    import json

    rows = [json.loads(line) for line in run_quick("longform").splitlines() if line.startswith("{")]
    assert {(r["set"], r["window_s"], r["engine"]) for r in rows} >= {("corpus", 30.0, "transformers"),
                                                                     ("corpus", 10.0, "transformers")}
    for r in rows:
        assert 0 <= r["clip_wer"] and 0 <= r["chunked_wer"]
        assert r["difference"] == pytest.approx(r["chunked_wer"] - r["clip_wer"], abs=1e-3)
        assert len(r["recordings_s"]) == 2 and all(s > 0 for s in r["recordings_s"])


def test_padding_quick():
    out = run_quick("padding")
    for corpus, clips in (("embedded Italian train split", 96), ("synthetic MLS-like", 1000)):
        block = out.split(f"{corpus}: ")[1].split("\n\n")[0]
        assert block.startswith(f"{clips} clips")
        fixed = num(one(r"30 s window: (\S+) of encoder input frames", block).group(1))
        assert 0 < fixed < 100
        for batch in (8, 64):
            waste = {}
            for sampler in ("random", "length-grouped"):
                row = one(rf"^\s+{batch}\s+{sampler}\s+(\S+)%\s+(\S+)%\s+(\S+)$", block)
                frames, tokens, padded = (num(g) for g in row.groups())
                assert 0 <= frames < 100 and 0 <= tokens < 100 and padded >= 0
                waste[sampler] = frames
            # grouping by duration pads fewer audio frames than random batches (the same clips)
            assert waste["length-grouped"] < waste["random"], (corpus, batch, waste)


def test_student_payoff_quick():
    out = run_quick("student_payoff", timeout=300)
    assert one(r"^## dev: (\d+) clips", out).group(1) == "2"
    cell = rf"({NUMBER}) ± ({NUMBER})"
    for model in ("teacher", "teacher adapted (stage 0)", "student untrained", "stage1", "stage2", "stage3", "ce_only"):
        row = one(rf"^\| {re.escape(model)} \| {cell} \| {cell} \| {cell} \|$", out)
        values = [num(v) for v in row.groups()]
        assert all(v >= 0 for v in values), (model, values)
        assert values[1] == 0 and values[3] == 0  # one seed: no spread over seeds
    speed = {m.group(1): num(m.group(2)) for m in re.finditer(rf"^- (\w+): ({NUMBER})$", out, re.MULTILINE)}
    expected = {"audio_seconds", "teacher_tf_s", "student_tf_s", "tf_speedup"}
    try:
        import ctranslate2  # noqa: F401

        expected |= {"teacher_ct2_fp32_s", "student_ct2_int8_s", "ct2_speedup"}
    except ImportError:
        pass
    assert set(speed) == expected and all(v > 0 for v in speed.values()), speed
    assert speed["tf_speedup"] == pytest.approx(speed["teacher_tf_s"] / speed["student_tf_s"], rel=0.01)
    geo = one(rf"^- seed 0: ({NUMBER}) -> ({NUMBER}) rad \((falls|does not fall)\)$", out)
    assert 0 < num(geo.group(1)) <= math.pi and 0 < num(geo.group(2)) <= math.pi
    targets = re.findall(r"^- (.+): (met|MISSED)$", out, re.MULTILINE)
    assert len(targets) == 7, targets


def test_teacher_autocast_cpu_quick():
    out = run_quick("teacher_autocast_cpu")
    assert one(r"^(\S+), batch 1 x 30 s \+ 4 tokens", out).group(1) == "tiny-random"
    for mode in ("float32", "bfloat16 autocast"):
        assert num(one(rf"^  {mode}\s+({NUMBER}) s per forward$", out).group(1)) > 0
    assert num(one(rf"speed-up bf16 / fp32: ({NUMBER})x$", out).group(1)) > 0
    # bfloat16 keeps ~3 significant digits: the teacher's outputs move, but little
    assert 0 <= num(one(rf"encoder relative L2 difference: ({NUMBER})$", out).group(1)) < 0.05
    row = one(rf"KL\(fp32 \|\| bf16\) per token: ({NUMBER}) nats; argmax agreement ({NUMBER})%$", out)
    assert 0 <= num(row.group(1)) < 0.1 and 50 <= num(row.group(2)) <= 100


def test_teacher_cache_quick():
    out = run_quick("teacher_cache")
    assert out.startswith("smoke pair: tiny-random teacher -> tiny-random student; batch 1, 1 timed steps, top-k 16")
    for setup in ("frozen", "trains"):
        block = out.split(f"[{setup}]")[1].split("\n\n")[0]
        assert num(one(rf"teacher forward \(encoder \+ decoder\)\s+({NUMBER}) s per batch", block).group(1)) > 0
        for path in ("teacher live", "teacher from the disk cache"):
            row = one(rf"step, {path}\s+({NUMBER}) s median \(min ({NUMBER})\)", block)
            assert num(row.group(1)) >= num(row.group(2)) > 0
        ratio = one(rf"live / cached\s+({NUMBER})x median, ({NUMBER})x min, per step", block)
        assert num(ratio.group(1)) > 0 and num(ratio.group(2)) > 0
        assert num(one(rf"cache build \(once\)\s+({NUMBER}) s for 2 clips", block).group(1)) > 0
    # the FLOP projection benchmarks/README.md quotes (analytic: the same at any size)
    ratios = re.findall(rf"backward (\d)x: encoder trains: live/cache\s+({NUMBER})x; encoder frozen(?: \(shared\))?: "
                        rf"live/cache\s+({NUMBER})x", out)
    assert [(b, f"{float(t):.2f}", f"{float(f):.2f}") for b, t, f in ratios] == [
        ("1", "1.54", "8.49"), ("2", "1.36", "5.99"), ("1", "4.32", "6.80"), ("2", "3.22", "6.14")]
    trains = num(one(rf"encoder LoRA trains \(stages I-II\)\s+({NUMBER}) MiB", out).group(1))
    frozen = num(one(rf"encoder frozen, EncoderCache \(stage III\)\s+({NUMBER}) MiB", out).group(1))
    assert 0 < frozen < trains  # a frozen encoder keeps no activations for backward


def test_topk_kl_quick():
    out = run_quick("topk_kl")
    assert num(one(r"^smoke: tiny-random teacher, 2 dev clips, (\d+) tokens", out).group(1)) > 0
    headers = list(re.finditer(rf"^(.+), T = 2: exact KL\*T\^2 ({NUMBER}) nats/token$", out, re.MULTILINE))
    assert [h.group(1) for h in headers] == ["untrained tiny-random student", "teacher + N(0, 1^2) logit noise"]
    for header, block in zip(headers, out.split(", T = 2: exact")[1:]):
        exact = num(header.group(2))
        assert exact > 0
        rows = re.findall(rf"^\s+(\d+)\s+({NUMBER})\s+({NUMBER})%\s+({NUMBER})\s+({NUMBER})%\s+({NUMBER})$", block,
                          re.MULTILINE)
        assert [r[0] for r in rows] == ["8", "32", "64"], block
        lumped = [num(r[1]) for r in rows]
        p_tail = [num(r[5]) for r in rows]
        for r in rows:
            assert 0 <= num(r[2]) <= 100  # lumped: biased low, never above the exact KL
        # a finer top-k keeps more of the KL and leaves less teacher mass in the tail
        assert lumped == sorted(lumped) and lumped[-1] <= exact * 1.001
        assert p_tail == sorted(p_tail, reverse=True) and 0 < p_tail[-1] <= 1


def test_train_step_quick():
    out = run_quick("train_step")
    assert "smoke pair, stage I, batch 2, 4 steps x 1" in out
    for loop in ("kdlib train\\(\\) step", "bare loop step"):
        row = one(rf"^  {loop}\s+median\s+({NUMBER}) ms  \(min ({NUMBER})\)$", out)
        assert num(row.group(1)) >= num(row.group(2)) > 0
    row = one(rf"kdlib / bare: ({NUMBER})x median, ({NUMBER})x min$", out)
    assert num(row.group(1)) > 0 and num(row.group(2)) > 0


def test_stage0_memory_quick():
    """Leaving the cross-attention k/v projections without LoRA (stage 0's preset at thesis scale)
    keeps less of the graph per layer and clip than decoder_all, whose k/v LoRA reads 1500 frames."""
    out = run_quick("stage0_memory")
    rows = {m.group(1): (num(m.group(2)), num(m.group(3))) for m in
            re.finditer(rf"^(decoder_\w+)\s+({NUMBER})\s+({NUMBER})\s+{NUMBER}$", out, re.MULTILINE)}
    assert set(rows) == {"decoder_all", "decoder_no_cross_kv"}, out
    assert 0 < rows["decoder_no_cross_kv"][0] < 0.8 * rows["decoder_all"][0], out
