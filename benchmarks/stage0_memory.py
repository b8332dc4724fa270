"""Stage 0's autograd graph per LoRA preset, measured at whisper-large-v3's decoder width.

Stage 0 adapts the frozen teacher with LoRA on its decoder; the encoder runs without a graph. What a
step keeps for backward (the tensors autograd saves) grows with the clip count and the decoder
layers. This script measures it on the CPU, exactly, with `torch.autograd.graph.saved_tensors_hooks`
(every saved tensor's bytes, each storage counted once), for decoder layers of large-v3's shape
(d_model 1280, 20 heads, FFN 5120) reading 1500 encoder frames, per layer and per clip. Then it
projects the thesis step: 32 decoder layers, batch 64, fp16 activations (half of the fp32 bytes
measured here), plus the frozen weights (fp16, 1.55 G parameters: 3.1 GB). A projection, not a GPU
measurement: `scripts/gpu_check.py` on a GPU gives the real peak.

    .venv/bin/python benchmarks/stage0_memory.py [--tokens 100] [--layers 2]

``--quick``: d_model 320 and 20 tokens (tests/test_benchmarks.py). Prints MiB and ratios, never fails.
"""

from __future__ import annotations

import argparse

import torch
from transformers import WhisperForConditionalGeneration

from kdlib import models as M

LARGE_V3_DECODER = dict(d_model=1280, heads=20, ffn=5120)
THESIS = dict(layers=32, batch=64, weights_gb=3.1)
PRESETS = ("decoder_all", "decoder_no_cross_kv")


def saved_bytes_per_layer_clip(preset: str, *, d_model: int, heads: int, ffn: int, layers: int,
                               tokens: int, clips: int = 1) -> float:
    """Bytes autograd saves in one decoder forward of ``layers`` layers, per layer per clip."""
    config = M.tiny_config(d_model=d_model, layers=(1, layers), heads=heads, ffn=ffn)
    model = M.apply_lora(WhisperForConditionalGeneration(config), preset, r=32, alpha=64)
    model.train()
    encoder_states = torch.randn(clips, 1500, d_model)  # the frozen encoder's output: no graph
    ids = torch.randint(0, 50000, (clips, tokens))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved, but not activations
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in weights:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(encoder_outputs=(encoder_states,), decoder_input_ids=ids, use_cache=False)
        out.logits.float().mean().backward()
    # (what lies outside the layers, the embeddings' and the output projection's inputs, is a few
    # KiB per clip and counted in with them)
    return sum(seen.values()) / layers / clips


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100, help="label tokens per clip (30 s of Italian: ~100)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers measured")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    shape = dict(LARGE_V3_DECODER)
    tokens = args.tokens
    if args.quick:
        shape, tokens = dict(d_model=320, heads=5, ffn=1280), 20
    torch.manual_seed(0)
    print(f"stage 0 graph per decoder layer per clip, d_model {shape['d_model']}, 1500 encoder frames, "
          f"{tokens} tokens (fp32 measured; thesis projection in fp16 at {THESIS['layers']} layers x batch "
          f"{THESIS['batch']} + {THESIS['weights_gb']} GB weights)")
    print(f"{'preset':<22}{'MiB/layer/clip':>16}{'thesis GiB':>12}{'ratio':>8}")
    rows = {}
    for preset in PRESETS:
        per = saved_bytes_per_layer_clip(preset, layers=args.layers, tokens=tokens, **shape)
        thesis = per / 2 * THESIS["layers"] * THESIS["batch"] / 2**30 + THESIS["weights_gb"] * 1e9 / 2**30
        rows[preset] = per
        print(f"{preset:<22}{per / 2**20:>16.1f}{thesis:>12.1f}{per / rows[PRESETS[0]]:>8.2f}")


if __name__ == "__main__":
    main()
