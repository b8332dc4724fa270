"""Projected speed-up of a student over its teacher from FLOPs (no timing; prints a table).

Counts multiply-adds of one transcription: the encoder over its frames (convolutions,
self-attention with its quadratic term, feed-forward), and a greedy decoder over ``--tokens``
tokens with a KV cache (self-attention, cross-attention over the encoder frames the decoder
reads, feed-forward, the output projection). Shapes come from the Whisper configs of
transformers (``WhisperConfig`` values written out here, no hub), the student's shape from the
kdlib config fields: ``student_window_seconds`` (encoder frames = 50 x seconds) and
``student_frame_factor`` k after encoder layer j (later layers and the decoder read frames / k).

FLOPs are an upper bound on the speed-up a GPU sees: at small batch a GPU decoder is bound by
memory and kernel launches, not arithmetic. Use it to rank shapes and to size a run, and replace
it by measured numbers (`scripts/gpu_check.py`) once a GPU has run them.

    .venv/bin/python benchmarks/flops_projection.py [--tokens 60] [--quick]
"""

from __future__ import annotations

import argparse

# (d_model, encoder layers, decoder layers, ffn, mel bins, vocabulary): WhisperConfig values
SHAPES = {
    "whisper-large-v3": (1280, 32, 32, 5120, 128, 51866),
    "whisper-small": (768, 12, 12, 3072, 80, 51865),
    "whisper-base": (512, 6, 6, 2048, 80, 51865),
}


def encoder_macs(d: int, layers: int, ffn: int, mels: int, frames: int, factor: int = 1,
                 merge_after: int | None = None) -> float:
    """Multiply-adds of one encoder forward: ``frames`` encoder frames (1500 for 30 s)."""
    conv = mels * d * 3 * 2 * frames + d * d * 3 * frames  # conv1 over 2·frames mel frames, conv2 stride 2
    total, n = conv, frames
    j = layers // 2 - 1 if merge_after is None else merge_after
    for layer in range(layers):
        total += 4 * n * d * d + 2 * n * n * d + 2 * n * d * ffn  # q,k,v,o + scores/values + FFN
        if factor > 1 and layer == j:
            n = -(-n // factor)
    return total


def decoder_macs(d: int, layers: int, ffn: int, vocab: int, enc_frames: int, tokens: int) -> float:
    """Multiply-adds of a greedy decode of ``tokens`` tokens with a KV cache."""
    per_layer_cross_kv = 2 * enc_frames * d * d  # cross-attention keys/values, once
    total = layers * per_layer_cross_kv
    for t in range(1, tokens + 1):
        total += layers * (4 * d * d + 2 * t * d + 2 * d * d + 2 * enc_frames * d + 2 * d * ffn)
        total += d * vocab
    return total


def projection(teacher: str, student: str, *, window_s: int | None, factor: int, tokens: int,
               decoder_layers: int | None = None) -> dict:
    td, tel, tdl, tffn, tmel, tv = SHAPES[teacher]
    sd, sel, sdl, sffn, smel, sv = SHAPES[student]
    sdl = decoder_layers or sdl
    t_enc = encoder_macs(td, tel, tffn, tmel, 1500)
    t_dec = decoder_macs(td, tdl, tffn, tv, 1500, tokens)
    frames = 50 * window_s if window_s else 1500
    s_enc = encoder_macs(sd, sel, sffn, smel, frames, factor)
    s_dec = decoder_macs(sd, sdl, sffn, sv, -(-frames // factor), tokens)
    return {"teacher": teacher, "student": student, "window_s": window_s or 30, "factor": factor,
            "decoder_layers": sdl, "teacher_gmacs": (t_enc + t_dec) / 1e9, "student_gmacs": (s_enc + s_dec) / 1e9,
            "speedup": (t_enc + t_dec) / (s_enc + s_dec), "encoder_share_teacher": t_enc / (t_enc + t_dec)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=60, help="tokens decoded per clip (an MLS segment: ~60)")
    parser.add_argument("--quick", action="store_true", help="the same table (it is instant); for the test")
    args = parser.parse_args(argv)
    rows = [
        projection("whisper-large-v3", "whisper-small", window_s=None, factor=1, tokens=args.tokens),
        projection("whisper-large-v3", "whisper-small", window_s=None, factor=3, tokens=args.tokens),
        projection("whisper-large-v3", "whisper-small", window_s=20, factor=1, tokens=args.tokens),
        projection("whisper-base", "whisper-base", window_s=10, factor=1, tokens=20),
        projection("whisper-base", "whisper-base", window_s=10, factor=1, tokens=20, decoder_layers=4),
    ]
    print(f"| teacher | student | window (s) | merge k | decoder layers | teacher GMACs | student GMACs | "
          f"projected speed-up | teacher encoder share |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['teacher']} | {r['student']} | {r['window_s']} | {r['factor']} | {r['decoder_layers']} | "
              f"{r['teacher_gmacs']:.0f} | {r['student_gmacs']:.0f} | {r['speedup']:.1f}x | "
              f"{100 * r['encoder_share_teacher']:.0f} % |")
    return rows


if __name__ == "__main__":
    main()
