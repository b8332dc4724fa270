"""LoRA presets, the projector, the parameter report and the optimizer caveat (issue 4, items 9-12).

`tests/test_models.py` covers the basics (preset counts on the tiny pair, adapters-only training,
merging at B = 0, the projector's identity start, the builder's groups). This file checks the
exact module set of every preset, that peft adapts exactly those modules, the LoRA formula, merging
with a nonzero adapter, the report against peft's own print, and what AdamW does with frozen
parameters that carry (zero) gradients. All models are small random Whispers built in memory: no
weights, no tokenizer.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from kdlib import models

ENC_LAYERS, DEC_LAYERS, D_MODEL, FFN = 3, 2, 32, 48


@pytest.fixture(scope="module")
def whisper():
    """A random Whisper with 3 encoder and 2 decoder layers (different counts on purpose)."""
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(11)
    cfg = models.tiny_config(d_model=D_MODEL, layers=(ENC_LAYERS, DEC_LAYERS), heads=2, ffn=FFN)
    return WhisperForConditionalGeneration(cfg).eval()


def _names(side: str, layers: int, blocks: tuple[str, ...], projs: tuple[str, ...]) -> set[str]:
    return {f"model.{side}.layers.{i}.{b}{p}" for i in range(layers) for b in blocks for p in projs}


QV, QKV, QKVO = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj")
EXPECTED = {
    # decoder-only presets: nothing in the encoder; "encoder_attn" is the decoder's cross-attention
    "dec_self_qv": _names("decoder", DEC_LAYERS, ("self_attn.",), QV),
    "dec_cross_qv": _names("decoder", DEC_LAYERS, ("encoder_attn.",), QV),
    # both stacks: encoder self-attention, decoder self- and cross-attention
    "qkv_all": _names("encoder", ENC_LAYERS, ("self_attn.",), QKV)
    | _names("decoder", DEC_LAYERS, ("self_attn.", "encoder_attn."), QKV),
    "qkvo_all": _names("encoder", ENC_LAYERS, ("self_attn.",), QKVO)
    | _names("decoder", DEC_LAYERS, ("self_attn.", "encoder_attn."), QKVO),
    "ffn": _names("encoder", ENC_LAYERS, ("",), ("fc1", "fc2"))
    | _names("decoder", DEC_LAYERS, ("",), ("fc1", "fc2")),
    # distil recipe: every decoder linear, nothing of the encoder
    "decoder_all": _names("decoder", DEC_LAYERS, ("self_attn.", "encoder_attn."), QKVO)
    | _names("decoder", DEC_LAYERS, ("",), ("fc1", "fc2")),
    # stage 0 at thesis scale: the same without the cross-attention k/v (they read 1500 frames)
    "decoder_no_cross_kv": _names("decoder", DEC_LAYERS, ("self_attn.",), QKVO)
    | _names("decoder", DEC_LAYERS, ("encoder_attn.",), ("q_proj", "out_proj"))
    | _names("decoder", DEC_LAYERS, ("",), ("fc1", "fc2")),
}


def test_every_preset_is_tested():
    assert set(EXPECTED) == set(models.LORA_PRESETS)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_targets_exactly_its_modules(whisper, preset):
    names = models.lora_target_modules(whisper, preset)
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED[preset]
    modules = dict(whisper.named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in names)
    if preset.startswith("dec"):
        assert not any(n.startswith("model.encoder.") for n in names)


def test_presets_do_not_match_lookalike_names():
    """The regexes are anchored: a module whose name only contains a target is not adapted."""
    net = nn.Module()
    net.model = nn.Module()
    net.model.decoder = nn.Module()
    layer = nn.Module()
    layer.self_attn = nn.Module()
    layer.self_attn.q_proj = nn.Linear(4, 4)
    layer.self_attn.q_proj_extra = nn.Linear(4, 4)
    layer.self_attn.k_proj = nn.Linear(4, 4)
    net.model.decoder.layers = nn.ModuleList([layer])
    assert models.lora_target_modules(net, "dec_self_qv") == ["model.decoder.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="unknown LoRA preset"):
        models.lora_target_modules(net, "decoder_qv")


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_peft_adapts_exactly_the_preset_and_counts_r_times_in_plus_out(whisper, preset):
    r, alpha = 4, 12
    expected = set(models.lora_target_modules(whisper, preset))
    base_linears = {n: m for n, m in whisper.named_modules() if n in expected}
    peft_model = models.apply_lora(copy.deepcopy(whisper), preset, r=r, alpha=alpha, dropout=0.0)
    prefix = "base_model.model."
    adapted = {n[len(prefix):]: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert set(adapted) == expected
    assert all(m.scaling["default"] == alpha / r for m in adapted.values())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in trainable)
    want = sum(r * (m.in_features + m.out_features) for m in base_linears.values())
    assert models.count_parameters(peft_model, trainable_only=True) == want
    # the frozen part is the base model, unchanged in size
    frozen = models.count_parameters(peft_model) - want
    assert frozen == models.count_parameters(whisper)


def test_lora_layer_computes_w_plus_alpha_over_r_ba(whisper):
    r, alpha = 4, 8
    peft_model = models.apply_lora(copy.deepcopy(whisper), "dec_cross_qv", r=r, alpha=alpha, dropout=0.0)
    layer = peft_model.base_model.model.model.decoder.layers[1].encoder_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    assert A.shape == (r, D_MODEL) and B.shape == (D_MODEL, r)
    assert torch.count_nonzero(B) == 0  # B = 0 at init: the adapted model starts as the base model
    with torch.no_grad():
        B.normal_()
        x = torch.randn(5, D_MODEL)
        W, b = layer.base_layer.weight, layer.base_layer.bias
        by_hand = x @ W.T + b + (alpha / r) * (x @ A.T @ B.T)
        assert torch.allclose(layer(x), by_hand, atol=1e-5)
        assert not torch.allclose(layer(x), x @ W.T + b, atol=1e-3)


def test_merge_and_unload_with_a_trained_adapter(whisper):
    base_count = models.count_parameters(whisper)
    peft_model = models.apply_lora(copy.deepcopy(whisper), "qkvo_all", r=4, alpha=8, dropout=0.1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.eval()  # dropout off: the adapted forward is deterministic
    feats, ids = torch.randn(1, 80, 3000, generator=gen), torch.tensor([[50258, 50274, 50359, 50363, 264]])
    with torch.no_grad():
        base_logits = whisper(input_features=feats, decoder_input_ids=ids).logits
        adapted = peft_model(input_features=feats, decoder_input_ids=ids).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_features=feats, decoder_input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter does change the output
    assert torch.allclose(merged, adapted, atol=1e-4, rtol=1e-4)
    assert type(merged_model) is type(whisper)
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    assert models.count_parameters(merged_model) == base_count


# --------------------------------------------------------------------------------------------
# Item 9: the projector at the thesis size


def test_projector_thesis_size_is_on_the_sphere_and_trains():
    proj = models.RiemannianProjector(768, 1280)  # whisper-small -> large-v3
    assert models.count_parameters(proj) == 768 * 1280 + 1280
    x = torch.randn(2, 5, 768, requires_grad=True)
    y = proj(x)
    assert y.shape == (2, 5, 1280)
    assert torch.allclose(y.norm(dim=-1), torch.ones(2, 5), atol=1e-5)
    target = torch.nn.functional.normalize(torch.randn(2, 5, 1280), dim=-1)
    (1 - (y * target).sum(-1)).mean().backward()
    assert torch.isfinite(proj.linear.weight.grad).all() and proj.linear.weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()
    # the offline pair has equal widths: the projector starts as the identity, so it changes nothing
    same = models.RiemannianProjector(512, 512)
    h = torch.randn(3, 512)
    assert torch.allclose(same(h), torch.nn.functional.normalize(h, dim=-1), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Item 11: the report, exactly peft's format, with the projector counted


def test_report_equals_peft_print_and_adds_the_projector(whisper, capsys):
    peft_model = models.apply_lora(copy.deepcopy(whisper), "dec_self_qv", r=4, alpha=8, dropout=0.0)
    peft_model.print_trainable_parameters()
    assert models.trainable_report(peft_model) == capsys.readouterr().out.strip()

    lora = 2 * DEC_LAYERS * 4 * (D_MODEL + D_MODEL)
    base = models.count_parameters(whisper)  # tied output projection counted once, as peft does
    proj = models.RiemannianProjector(D_MODEL, 64)
    n_proj = D_MODEL * 64 + 64
    n, m = lora + n_proj, base + lora + n_proj
    expected = f"trainable params: {n:,} || all params: {m:,} || trainable%: {100 * n / m:.4f}"
    assert models.trainable_report(peft_model, [proj]) == expected
    # a module listed twice (or shared) is counted once
    assert models.trainable_report(peft_model, [proj, proj]) == expected
    # a frozen projector counts in all params only
    proj.requires_grad_(False)
    frozen = f"trainable params: {lora:,} || all params: {m:,} || trainable%: {100 * lora / m:.4f}"
    assert models.trainable_report(peft_model, [proj]) == frozen


# --------------------------------------------------------------------------------------------
# Item 12: AdamW and frozen parameters

LR, WD = 1e-2, 0.1


def _two_stage_model(seed: int = 0):
    """Stage 1 trains everything and clears gradients with ``zero_grad(set_to_none=False)``;
    stage 2 freezes the first layer. Its parameters keep *zero* gradient tensors."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
    stage1 = torch.optim.AdamW(model.parameters(), lr=LR)
    model(torch.randn(4, 16)).pow(2).sum().backward()
    stage1.zero_grad(set_to_none=False)
    model[0].requires_grad_(False)
    assert model[0].weight.grad is not None and not model[0].weight.grad.any()
    return model


def _three_steps(model, opt):
    for _ in range(3):
        opt.zero_grad(set_to_none=False)  # frozen params keep their zero tensors, as in many loops
        model(torch.randn(4, 16)).pow(2).sum().backward()
        opt.step()


def _adamw_bytes(params) -> int:
    """exp_avg + exp_avg_sq (float32) per element, one float32 step counter per tensor."""
    params = list(params)
    return 2 * 4 * sum(p.numel() for p in params) + 4 * len(params)


def test_frozen_params_without_grads_hold_no_adamw_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
    model[0].requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    plain = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    _three_steps(model, plain)
    assert model[0].weight.grad is None
    assert models.optimizer_state_bytes(plain) == _adamw_bytes(model[2].parameters())
    assert torch.equal(model[0].weight, frozen_before)


def test_frozen_params_with_zero_grads_cost_state_and_decay_in_plain_adamw():
    model = _two_stage_model()
    frozen_before = model[0].weight.detach().clone()
    plain = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    _three_steps(model, plain)
    # state for every parameter, frozen or not: 2x the frozen layer's size in float32
    assert models.optimizer_state_bytes(plain) == _adamw_bytes(model.parameters())
    assert set(map(id, plain.state)) == set(map(id, model.parameters()))
    # a zero gradient gives a zero Adam update, but decoupled weight decay still shrinks the
    # "frozen" weights: w <- w * (1 - lr * wd) per step
    assert torch.allclose(model[0].weight, frozen_before * (1 - LR * WD) ** 3, rtol=1e-6, atol=0)
    assert not torch.equal(model[0].weight, frozen_before)


def test_kdlib_builder_ignores_frozen_params_even_with_zero_grads():
    model = _two_stage_model()
    frozen_before = model[0].weight.detach().clone()
    ours = models.build_optimizer(model, lr=LR, weight_decay=WD)
    _three_steps(model, ours)
    assert models.optimizer_state_bytes(ours) == _adamw_bytes(model[2].parameters())
    assert torch.equal(model[0].weight, frozen_before)

    # the two ways side by side: plain AdamW pays for the frozen layer too
    plain_model = _two_stage_model()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=LR, weight_decay=WD)
    _three_steps(plain_model, plain)
    extra = models.optimizer_state_bytes(plain) - models.optimizer_state_bytes(ours)
    assert extra == _adamw_bytes(model[0].parameters()) == 2 * 4 * (16 * 32 + 32) + 4 * 2


def test_lora_student_optimizer_state_both_ways(whisper):
    """On a LoRA-wrapped Whisper + projector: plain AdamW over everything with zero grads on the
    frozen base holds state for all parameters; kdlib's builder only for adapters + projector."""
    torch.manual_seed(0)
    peft_model = models.apply_lora(copy.deepcopy(whisper), "dec_self_qv", r=4, alpha=8, dropout=0.0)
    proj = models.RiemannianProjector(D_MODEL, 64)
    for p in peft_model.parameters():
        if not p.requires_grad:
            p.grad = torch.zeros_like(p)  # what an earlier full-model stage leaves behind
    feats, ids = torch.randn(1, 80, 3000), torch.tensor([[50258, 50274, 50359, 50363, 264]])
    with torch.no_grad():
        enc = peft_model.get_encoder()(feats).last_hidden_state  # (1, 1500, d): frozen encoder

    def step(opt):
        opt.zero_grad(set_to_none=False)
        out = peft_model(encoder_outputs=(enc,), decoder_input_ids=ids)
        (out.logits.logsumexp(-1).mean() + proj(enc[:, :10]).sum()).backward()
        opt.step()

    ours = models.build_optimizer([peft_model, proj], lr=1e-3)
    step(ours)
    trainable = [p for _, p in models._unique_params([peft_model, proj]) if p.requires_grad]
    assert models.optimizer_state_bytes(ours) == _adamw_bytes(trainable)

    everything = [p for _, p in models._unique_params([peft_model, proj])]
    plain = torch.optim.AdamW(everything, lr=1e-3)
    step(plain)
    assert models.optimizer_state_bytes(plain) == _adamw_bytes(everything)
    total = models.count_parameters([peft_model, proj])
    assert models.optimizer_state_bytes(plain) > 50 * models.optimizer_state_bytes(ours)
    assert models.optimizer_state_bytes(plain) >= 8 * total
