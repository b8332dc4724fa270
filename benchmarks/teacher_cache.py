"""Offline KD: how much faster is a training step that reads the teacher from a disk cache than
one that runs the teacher live? Prints times and ratios, never fails.

On the demo pair (real whisper-base teacher, the distil-base student built from it, embedded
Italian corpus), for two set-ups, each through kdlib's own step (`kdlib.distill.forward_losses`,
backward, optimizer step; data loading excluded, the batches are prepared beforehand):

* ``frozen``: the student's encoder is frozen and identical to the teacher's (demo stage I,
  distil-whisper's set-up): live, the shared encoder runs once per step plus the teacher decoder;
  from the cache, the encoder states and top-k logits are read from disk;
* ``trains``: the student's encoder LoRA trains (thesis stages I-II): the live step adds a whole
  teacher forward to the student's forward + backward.

Live means ``encoder_cache="off"``: the teacher runs every step, which is the only option when
its outputs do not fit in RAM (the thesis preset). With ``"memory"`` the demo already skips the
teacher after the first epoch, within one run; the disk cache carries that over to every run,
stage and tuning trial.

Then a FLOP projection of the same ratios for whisper-large-v3 → whisper-small (thesis), and
(``--memory``) what the frozen-encoder path saves: bytes autograd keeps for backward with the
student's encoder training vs frozen (stage III: `EncoderCache`, no graph).

    .venv/bin/python benchmarks/teacher_cache.py [--batch 2] [--steps 2] [--setups frozen trains]
        [--top-k 64] [--memory] [--preset demo]

``--quick``: the same printout (both set-ups, the projection and ``--memory``) on the smoke preset
(tiny random pair), batch 1, one timed step, top-k 16: seconds (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from kdlib import caches as C, data, distill as DL, runs as R
from kdlib.config import make_config
from kdlib.losses import DistillationLoss
from kdlib.models import build_optimizer
from kdlib.teacher_cache import build_teacher_cache, teacher_outputs


# The student measured here is the distil-base of benchmarks/README.md's figures: whisper-base's
# whole encoder (Whisper's 30 s window, so the frozen encoder *is* the teacher's and is shared)
# and decoder layers 0 and 5. The demo preset's student now reads a 10 s window and keeps all 6
# decoder layers; its encoder is then not the teacher's, and the teacher needs its own 30 s
# log-mels, which this script's batches (and `build_teacher_cache`'s dataset) do not carry.
STUDENT = {"student_window_seconds": None, "student_decoder_layers": 2}

# --------------------------------------------------------------------------------------------
# FLOPs of Whisper, analytically (multiply-add = 2 FLOPs; layer norms, softmax, GELU left out)
# --------------------------------------------------------------------------------------------

WHISPER = {  # d_model, encoder layers, decoder layers, mel bins, vocabulary
    "whisper-base": (512, 6, 6, 80, 51865),
    "distil-base": (512, 6, 2, 80, 51865),
    "whisper-small": (768, 12, 12, 80, 51865),
    "whisper-large-v3": (1280, 32, 32, 128, 51866),
}


def whisper_flops(name: str, tokens: int = 50, frames: int = 1500) -> dict[str, float]:
    """Forward FLOPs of one clip (30 s window, ``tokens`` decoder positions), encoder and decoder."""
    d, n_enc, n_dec, mels, vocab = WHISPER[name]
    stem = 2 * 3 * mels * d * 2 * frames + 2 * 3 * d * d * frames  # conv1 (3000 frames), conv2 (stride 2)
    # per layer: q, k, v, out projections 4 d^2, FFN 2 * d * 4d; attention scores + mixing 2 * n * d
    encoder = stem + n_enc * frames * (2 * 12 * d * d + 2 * 2 * frames * d)
    per_token = 2 * (4 * d * d + 2 * d * d + 8 * d * d) + 2 * 2 * (tokens + frames) * d  # self, cross q/o, FFN
    cross_kv = 2 * 2 * d * d * frames  # cross-attention keys and values of the encoder states
    decoder = n_dec * (tokens * per_token + cross_kv) + tokens * 2 * d * vocab  # + output projection
    return {"encoder": float(encoder), "decoder": float(decoder)}


def projected(teacher: str, student: str, tokens: int, backward: float) -> dict[str, float]:
    """Step FLOPs per clip, teacher live vs from the cache, for the two set-ups.

    ``backward``: backward cost as a multiple of the forward (2 for full fine-tuning: activation
    and weight gradients; about 1 with LoRA, where frozen base weights need no weight gradient).
    A frozen student encoder runs forward only, every step (``encoder_cache="off"``), except when
    it is the teacher's own encoder (distil-whisper): then the cache supplies its states too."""
    t, s = whisper_flops(teacher, tokens), whisper_flops(student, tokens)
    teacher_fwd = t["encoder"] + t["decoder"]
    trains = (1 + backward) * (s["encoder"] + s["decoder"])
    shared = WHISPER[teacher][:2] + WHISPER[teacher][3:4] == WHISPER[student][:2] + WHISPER[student][3:4]
    frozen_cache = (1 + backward) * s["decoder"] + (0.0 if shared else s["encoder"])
    frozen_live = t["decoder"] + (1 + backward) * s["decoder"] + (t["encoder"] if shared else t["encoder"] + s["encoder"])
    return {"trains": (teacher_fwd + trains) / trains, "frozen": frozen_live / frozen_cache, "shared": shared}


# --------------------------------------------------------------------------------------------
# Measured steps
# --------------------------------------------------------------------------------------------


def step_seconds(models, config, paths: dict, batches, device, steps: int) -> dict[str, list[float]]:
    """kdlib's per-step work (forward_losses, backward, clip, optimizer step) for each entry of
    ``paths`` (name -> caches), interleaved step by step so that load from other jobs on a shared
    machine hits every path alike; one warm-up step each first."""
    loss_fn = DistillationLoss()
    loss_fn.weights = DL.stage_weights(config, 0)
    params = [p for p in models.student.parameters() if p.requires_grad]
    optimizer = build_optimizer([models.student], lr=1e-4)
    models.student.train()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(steps + 1):
        batch = batches[i % len(batches)]
        for name, caches in paths.items():
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            parts = DL.forward_losses(models, loss_fn, batch, device, (False, None), caches=caches)
            parts["total"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if i > 0:
                times[name].append(time.perf_counter() - start)
    return times


def run_setup(name: str, args, cache_root: str) -> dict:
    train_encoder = name == "trains"
    n = args.batch * (args.steps + 1)
    config = make_config(args.preset, stage=1, overrides={**STUDENT,
        "train_encoder": train_encoder, "batch_size": args.batch, "max_train_utterances": n,
        "max_dev_utterances": 1, "encoder_cache": "off", "device": "cpu"})
    device = torch.device("cpu")
    torch.manual_seed(0)
    models = R.build_models(config, device)
    train_set, _, _ = R.build_data(config, models.feature_extractor, models.tokenizer)
    batches = [data.collate([train_set[i] for i in range(j, min(j + args.batch, n))]) for j in range(0, n, args.batch)]

    # the teacher alone, as the cache build runs it (encoder + decoder, no_grad, float32)
    teacher_s = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        teacher_outputs(models.teacher, batch["input_features"], batch["labels"])
        if i > 0 or len(batches) == 1:
            teacher_s.append(time.perf_counter() - start)

    live_caches = C.build_caches(models, config, train_set)
    folder = f"{cache_root}/{name}"
    start = time.perf_counter()
    build_teacher_cache(models.teacher, train_set, folder, top_k=args.top_k, batch_size=args.batch,
                        store_hidden=not train_encoder, progress=False)
    build_s = time.perf_counter() - start
    cached_config = make_config(args.preset, stage=1, overrides={**STUDENT, **{k: getattr(config, k) for k in (
        "train_encoder", "batch_size", "max_train_utterances", "max_dev_utterances", "encoder_cache", "device")},
        "teacher_cache": folder})
    cached_caches = C.build_caches(models, cached_config, train_set)
    times = step_seconds(models, config, {"live": live_caches, "cached": cached_caches}, batches, device, args.steps)
    return {"teacher": statistics.median(teacher_s), "live": statistics.median(times["live"]),
            "cached": statistics.median(times["cached"]), "live_min": min(times["live"]),
            "cached_min": min(times["cached"]), "build": build_s, "shared": live_caches.shared}


# --------------------------------------------------------------------------------------------
# Memory: autograd's saved tensors with the student's encoder training vs frozen
# --------------------------------------------------------------------------------------------


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs."""
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def memory(args) -> None:
    device = torch.device("cpu")
    results = {}
    for train_encoder in (True, False):
        config = make_config(args.preset, stage=1, overrides={**STUDENT,
            "train_encoder": train_encoder, "batch_size": args.batch, "max_train_utterances": args.batch,
            "max_dev_utterances": 1, "device": "cpu"})
        torch.manual_seed(0)
        models = R.build_models(config, device)
        # a student after stage II (LoRA B non-zero): its encoder is no longer the teacher's, so the
        # frozen path is EncoderCache on the student's own encoder, not the shared teacher states
        with torch.no_grad():
            for n, p in models.student.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)
        train_set, _, _ = R.build_data(config, models.feature_extractor, models.tokenizer)
        batch = data.collate([train_set[i] for i in range(args.batch)])
        caches = C.build_caches(models, config, train_set)
        loss_fn = DistillationLoss()
        loss_fn.weights = DL.stage_weights(config, 0)
        results[train_encoder] = saved_bytes(
            lambda: DL.forward_losses(models, loss_fn, batch, device, (False, None), caches=caches)["total"])
    print(f"\nautograd saved tensors, student forward + losses, batch {args.batch} ({args.preset}, CPU, float32):")
    print(f"  encoder LoRA trains (stages I-II)            {results[True] / 2**20:8.1f} MiB")
    print(f"  encoder frozen, EncoderCache (stage III)     {results[False] / 2**20:8.1f} MiB")
    print(f"  saved: {(results[True] - results[False]) / 2**20:.1f} MiB "
          f"({1 - results[False] / results[True]:.0%}) per batch of {args.batch}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per path (after one warm-up)")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--setups", nargs="+", default=["frozen", "trains"], choices=["frozen", "trains"])
    parser.add_argument("--tokens", type=int, default=50, help="decoder tokens per clip in the FLOP projection")
    parser.add_argument("--memory", action="store_true", help="also measure autograd memory (frozen encoder)")
    parser.add_argument("--preset", default="demo", choices=["smoke", "demo"])
    parser.add_argument("--quick", action="store_true",
                        help="smoke preset, batch 1, 1 timed step, top-k 16, --memory: seconds (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.steps, args.top_k, args.memory = "smoke", 1, 1, 16, True
    config = make_config(args.preset, stage=1, overrides=STUDENT)
    shape = f" ({config.student_decoder_layers} decoder layers, 30 s window)" if config.student == "distil-base" else ""
    print(f"{args.preset} pair: {config.teacher} teacher -> {config.student} student{shape}; batch {args.batch}, {args.steps} timed steps, "
          f"top-k {args.top_k}, {torch.get_num_threads()} threads, float32 CPU")
    with tempfile.TemporaryDirectory() as root:
        for name in args.setups:
            r = run_setup(name, args, root)
            label = {"frozen": "student encoder frozen" + (" (shared with the teacher)" if r["shared"] else ""),
                     "trains": "student encoder LoRA trains"}[name]
            print(f"\n[{name}] {label}")
            print(f"  teacher forward (encoder + decoder)  {r['teacher']:7.2f} s per batch")
            print(f"  step, teacher live                   {r['live']:7.2f} s median (min {r['live_min']:.2f})")
            print(f"  step, teacher from the disk cache    {r['cached']:7.2f} s median (min {r['cached_min']:.2f})")
            print(f"  live / cached                        {r['live'] / r['cached']:7.2f}x median, "
                  f"{r['live_min'] / r['cached_min']:.2f}x min, per step (= per epoch)")
            print(f"  cache build (once)                   {r['build']:7.2f} s for {args.batch * (args.steps + 1)} clips")
    print(f"\nFLOP projection (forward FLOPs per clip, {args.tokens} tokens; backward = 1x forward with LoRA, 2x full):")
    for teacher, student in (("whisper-base", "distil-base"), ("whisper-large-v3", "whisper-small")):
        t, s = whisper_flops(teacher, args.tokens), whisper_flops(student, args.tokens)
        print(f"  {teacher}: encoder {t['encoder'] / 1e9:7.0f} GFLOP, decoder {t['decoder'] / 1e9:5.0f}; "
              f"{student}: encoder {s['encoder'] / 1e9:5.0f}, decoder {s['decoder'] / 1e9:4.0f}")
        for backward in (1.0, 2.0):
            p = projected(teacher, student, args.tokens, backward)
            print(f"    backward {backward:.0f}x: encoder trains: live/cache {p['trains']:5.2f}x; "
                  f"encoder frozen{' (shared)' if p['shared'] else ''}: live/cache {p['frozen']:5.2f}x")
    if args.memory:
        memory(args)


if __name__ == "__main__":
    main()
