"""Text and tokens: normalisation, WER/CER, and greedy decoding of a Whisper model.

1. **Normalisation** (`basic_normalize`): Whisper's *basic* normaliser, the one for non-English
   text (lower-case, bracketed spans dropped, punctuation and symbols to spaces, whitespace
   collapsed; accents kept). Every WER in the book is computed on normalised text and every
   metrics dict says so: ``"normalizer": "whisper-basic"``.
2. **Scoring** (`wer_cer`, `repeated_ngrams_per_100_words`): corpus-level and per-utterance
   WER/CER with jiwer, substitution/deletion/insertion rates, per-speaker WER, and a hallucination
   indicator (repeated 5-grams per 100 hypothesis words). An utterance whose reference is empty
   after normalisation is skipped and counted, never divided by; an empty hypothesis is scored as
   all deletions (WER 1 for that utterance).
3. **Decoding** (`transcribe`, `generate_token_ids`, `generate_with_logprobs`): ``model.generate``
   with the KV cache on, language and task tokens forced, no timestamps, batched. Clips are
   sorted by length inside (similar clips decode for a similar number of steps) and returned in
   input order. `generate_with_logprobs` adds each clip's average log-probability.

The trainer's dev WER (`kdlib.distill.dev_wer`) and every evaluation (`kdlib.evaluate`) decode and
score through this module.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from kdlib.data import parse_mls_id
from kdlib.progress import progress_bar
from kdlib.text import NORMALIZER, basic_normalize, usable_transcript  # noqa: F401 (re-exported)
from kdlib.text import _WHITESPACE

SAMPLE_RATE = 16_000  # Hz
MAX_SECONDS = 30.0  # Whisper's window: longer clips are cut by the feature extractor
DEFAULT_MAX_NEW_TOKENS = 224  # Whisper's own sample_len (448 // 2); CTranslate2 caps at the same

# --------------------------------------------------------------------------------------------
# 1. Normalisation: `basic_normalize` and `usable_transcript` live in kdlib.text (the scan uses
# the same rule) and are re-exported here.

# --------------------------------------------------------------------------------------------
# 2. Scoring


def repeated_ngrams_per_100_words(hypotheses: Sequence[str], n: int = 5, *,
                                  normalize: bool = True) -> float:
    """Hallucination indicator: repeated word n-grams per 100 hypothesis words.

    Within one hypothesis, an n-gram that occurs ``k > 1`` times contributes ``k - 1`` (so a
    decoder stuck in a loop scores high, while a phrase repeated across different utterances,
    which is ordinary language, does not count). Summed over hypotheses, divided by the total
    number of hypothesis words, times 100. 0.0 when there are no words.

    Example: "a b c d e a b c d e" (10 words) holds "a b c d e" twice: 1 repeat → 10.0.
    """
    repeats = 0
    words_total = 0
    for hyp in hypotheses:
        words = (basic_normalize(hyp) if normalize else hyp).split()
        words_total += len(words)
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        repeats += sum(k - 1 for k in grams.values() if k > 1)
    return 100.0 * repeats / words_total if words_total else 0.0


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def speaker_of(utt_id: str) -> str:
    """MLS ids are ``<speaker>_<book>_<utterance>``; other ids belong to speaker ``"unknown"``."""
    parts = parse_mls_id(utt_id)
    return parts[0] if parts else "unknown"


def wer_cer(references: Sequence[str], hypotheses: Sequence[str], *,
            ids: Sequence[str] | None = None, speakers: Sequence[str] | None = None,
            normalize: bool = True, ngram: int = 5) -> dict[str, Any]:
    """Corpus-level and per-utterance WER and CER (jiwer), on normalised text.

    Args:
        references, hypotheses: raw text, same length.
        ids: utterance ids (default ``"0"``, ``"1"``, ...); speakers: one per utterance (default:
            the ``<speaker>`` part of an MLS id, ``"unknown"`` for other ids).
        normalize: apply `basic_normalize` to both sides (the default; ``False`` scores the text
            as given, and the dict then says ``"normalizer": "none"``).
        ngram: n of the repeated-n-gram hallucination indicator.

    Corpus WER = (S + D + I) / N over all scored utterances (N reference words), not the mean of
    per-utterance WERs; CER the same on characters (spaces count). An utterance whose reference
    is empty after normalisation is skipped (in ``skipped``, ``n_skipped``, ``skip_reasons``): its
    WER is undefined. An empty hypothesis is scored: all its reference words are deletions.
    Rates are ``None`` when nothing could be scored.

    Returns a dict: ``wer``, ``cer``, ``substitution_rate``, ``deletion_rate``,
    ``insertion_rate`` (per reference word), ``repeated_<n>grams_per_100_words``, raw counts,
    ``n_utterances`` (scored), ``n_skipped``, ``skip_reasons``, ``skipped``, ``per_utterance``
    (id, speaker, ref, hyp, normalised ref/hyp, wer, cer, error counts), ``per_speaker``
    (``{speaker: {wer, cer, n_utterances, n_words}}``), ``normalizer``.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"wer_cer: {len(references)} references but {len(hypotheses)} hypotheses")
    ids = [str(i) for i in (ids if ids is not None else range(len(references)))]
    if len(ids) != len(references):
        raise ValueError(f"wer_cer: {len(ids)} ids for {len(references)} references")
    if speakers is None:
        speakers = [speaker_of(i) for i in ids]
    elif len(speakers) != len(references):
        raise ValueError(f"wer_cer: {len(speakers)} speakers for {len(references)} references")
    norm = basic_normalize if normalize else (lambda s: _WHITESPACE.sub(" ", s).strip())

    per_utt: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    totals = Counter()
    by_speaker: dict[str, Counter] = {}
    scored_hyps: list[str] = []
    for uid, spk, ref, hyp in zip(ids, speakers, references, hypotheses):
        ref_n, hyp_n = norm(ref or ""), norm(hyp or "")
        if not usable_transcript(ref) or not ref_n:  # the scan's rule (kdlib.text), whatever `normalize`
            skipped.append(dict(id=uid, reason="empty reference after normalisation",
                                ref=ref, hyp=hyp))
            continue
        w = jiwer.process_words(ref_n, hyp_n)
        c = jiwer.process_characters(ref_n, hyp_n)
        counts = Counter(
            S=w.substitutions, D=w.deletions, I=w.insertions, H=w.hits,
            cS=c.substitutions, cD=c.deletions, cI=c.insertions, cH=c.hits, utts=1,
        )
        totals.update(counts)
        by_speaker.setdefault(str(spk), Counter()).update(counts)
        n_words = w.substitutions + w.deletions + w.hits
        per_utt.append(dict(
            id=uid, speaker=str(spk), ref=ref, hyp=hyp, ref_norm=ref_n, hyp_norm=hyp_n,
            wer=(w.substitutions + w.deletions + w.insertions) / n_words,
            cer=(c.substitutions + c.deletions + c.insertions)
            / (c.substitutions + c.deletions + c.hits),
            substitutions=w.substitutions, deletions=w.deletions, insertions=w.insertions,
            n_words=n_words,
        ))
        scored_hyps.append(hyp_n)

    def rates(t: Counter) -> dict[str, Any]:
        n_words = t["S"] + t["D"] + t["H"]
        n_chars = t["cS"] + t["cD"] + t["cH"]
        return dict(
            wer=_ratio(t["S"] + t["D"] + t["I"], n_words),
            cer=_ratio(t["cS"] + t["cD"] + t["cI"], n_chars),
            n_utterances=t["utts"], n_words=n_words,
        )

    out = rates(totals)
    n_words = out["n_words"]
    out.update(
        substitution_rate=_ratio(totals["S"], n_words),
        deletion_rate=_ratio(totals["D"], n_words),
        insertion_rate=_ratio(totals["I"], n_words),
        **{f"repeated_{ngram}grams_per_100_words":
           repeated_ngrams_per_100_words(scored_hyps, ngram, normalize=False)},
        substitutions=totals["S"], deletions=totals["D"], insertions=totals["I"], hits=totals["H"],
        n_chars=totals["cS"] + totals["cD"] + totals["cH"],
        n_skipped=len(skipped),
        skip_reasons=dict(Counter(s["reason"] for s in skipped)),
        skipped=skipped,
        per_speaker={spk: rates(t) for spk, t in sorted(by_speaker.items())},
        per_utterance=per_utt,
        normalizer=NORMALIZER if normalize else "none",
    )
    return out


# --------------------------------------------------------------------------------------------
# 3. Decoding with transformers


def model_device(model):
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def check_audios(audios: Sequence[np.ndarray], window_samples: int | None = None) -> list[np.ndarray]:
    """1-D float32 waveforms; ``window_samples``: a model with an encoder window shorter than 30 s
    (`kdlib.models.set_encoder_window`) refuses a longer clip instead of cutting it silently."""
    out = []
    for i, a in enumerate(audios):
        a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
        if a.ndim != 1:
            raise ValueError(f"audio {i}: expected a 1-D waveform at 16 kHz, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"audio {i}: no samples")
        if window_samples is not None and window_samples < 30 * SAMPLE_RATE and a.size > window_samples:
            raise ValueError(f"audio {i}: {a.size / SAMPLE_RATE:.2f} s is longer than the model's "
                             f"{window_samples / SAMPLE_RATE:g} s encoder window (it would be cut); "
                             "scan with window_seconds to skip such clips, or use a longer window")
        out.append(a.astype(np.float32, copy=False))
    return out


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices, longest first, cut into batches (so each batch holds clips of similar length)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _eos_ids(generation_config) -> set[int]:
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) | {generation_config.pad_token_id}


def _prompt_ids(generation_config) -> set[int]:
    gc = generation_config
    ids = {gc.decoder_start_token_id, getattr(gc, "no_timestamps_token_id", None)}
    ids |= set((getattr(gc, "lang_to_id", None) or {}).values())
    ids |= set((getattr(gc, "task_to_id", None) or {}).values())
    return {i for i in ids if i is not None}


def _clean_ids(row: Sequence[int], prompt: set[int], eos: set[int]) -> list[int]:
    """Generated tokens only: leading prompt tokens dropped (older transformers return them),
    cut at the first end-of-text (padding of finished sequences is end-of-text too)."""
    row = list(row)
    i = 0
    while i < len(row) and row[i] in prompt:
        i += 1
    out = []
    for t in row[i:]:
        if t in eos:
            break
        out.append(int(t))
    return out


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' generate() warnings that do not apply here, for one call: "max_length
    and max_new_tokens both set" (the generation config carries Whisper's 448; max_new_tokens
    wins, as intended), "attention mask not set" (every clip is padded to 30 s and Whisper's
    encoder takes no mask), "generation_config plus arguments" (the language and task)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _decode_setup(model, device, language: str | None, task: str, max_new_tokens: int):
    """What every decoding entry point settles first: the device (the model is moved there),
    the model's dtype, ``generate``'s language/task arguments (multilingual models only), and
    ``max_new_tokens`` capped so prompt plus output fit the decoder's positions."""
    import torch

    device = torch.device(device) if device is not None else model_device(model)
    if model_device(model) != device:
        model.to(device)
    dtype = next(model.parameters()).dtype
    gc = model.generation_config
    kwargs: dict[str, Any] = dict(task=task) if getattr(gc, "is_multilingual", False) else {}
    if language is not None and getattr(gc, "is_multilingual", False):
        kwargs["language"] = language
    max_new = min(int(max_new_tokens), model.config.max_target_positions - 4)
    return device, dtype, kwargs, max_new


def _generate(model, feats, states, **kwargs):
    """``model.generate`` from encoder ``states`` when given, else from the log-mels ``feats``.

    transformers' Whisper ``generate`` moves a window forward by the timestamp tokens it sees,
    even in no-timestamp mode: a model that emits two in a row (an untrained student does) gets
    the rest of its 30 s window decoded again from the log-mels. Given encoder states instead,
    it has no log-mels to cut and fails (``TypeError``/``AttributeError`` inside transformers).
    That batch is then decoded from the log-mels, so the result is always the live decode's.
    """
    if states is not None:
        from transformers.modeling_outputs import BaseModelOutput

        try:
            return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), **kwargs)
        except (TypeError, AttributeError):
            pass
    return model.generate(input_features=feats, **kwargs)


def generate_token_ids(model, feature_extractor, audios: Sequence[np.ndarray], *,
                       language: str | None = "it", task: str = "transcribe", num_beams: int = 1,
                       batch_size: int = 8, device=None,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       progress: bool = False,
                       encode: Callable[[Any, list[int]], Any] | None = None) -> list[list[int]]:
    """Token ids (prompt and end-of-text removed) for each clip, in input order.

    ``audios``: 1-D float waveforms at 16 kHz (numpy or torch). Each clip becomes its own
    ``(n_mels, 3000)`` log-mel window (Whisper pads every clip to 30 s and cuts longer ones), so
    batching changes no encoder input; clips are sorted by length so that a batch's sequences end
    at similar steps. Decoding: ``model.generate`` with the KV cache, forced
    ``<|language|><|task|><|notimestamps|>`` (English-only models get no language token),
    greedy when ``num_beams == 1``, otherwise beam search. ``max_new_tokens`` is capped so the
    prompt plus output fits the decoder's positions (448 for Whisper).

    ``encode(features, indices)``: encoder states ``(batch, frames, d_model)`` for a batch's
    log-mels and the clips' positions in ``audios``; ``generate`` then starts from them instead
    of running the model's encoder. Use it only for an encoder whose states are already known
    (a frozen encoder, `kdlib.caches.EncoderCache`): the encoder is about 3/4 of a whisper-base
    transcription on a CPU.
    """
    import torch

    audios = check_audios(audios, getattr(feature_extractor, "n_samples", None))
    if not audios:
        return []
    device, dtype, kwargs, max_new = _decode_setup(model, device, language, task, max_new_tokens)
    prompt, eos = _prompt_ids(model.generation_config), _eos_ids(model.generation_config)
    batches = length_sorted_batches([len(a) for a in audios], batch_size)
    if progress:
        batches = progress_bar(batches, desc="decode", unit="batch")
    results: list[list[int] | None] = [None] * len(audios)
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            feats = feature_extractor([audios[i] for i in batch], sampling_rate=SAMPLE_RATE,
                                      return_tensors="pt").input_features
            feats = feats.to(device=device, dtype=dtype)  # (batch, n_mels, 3000)
            states = None if encode is None else encode(feats, batch).to(device=device, dtype=dtype)
            for i, row in zip(batch, _generate_batch(model, feats, states, prompt, eos, num_beams=num_beams,
                                                     max_new_tokens=max_new, **kwargs)):
                results[i] = row
    return results  # type: ignore[return-value]


def _generate_batch(model, feats, states, prompt, eos, *, num_beams: int, max_new_tokens: int, **kwargs) -> list[list[int]]:
    """One batch through ``generate`` (no sampling, no timestamps, KV cache), cleaned token ids."""
    import torch

    with _quiet_transformers():
        out = _generate(model, feats, states, num_beams=num_beams, do_sample=False,
                        max_new_tokens=max_new_tokens, return_timestamps=False, use_cache=True, **kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out["sequences"]
    return [_clean_ids(row, prompt, eos) for row in sequences.tolist()]


def transcribe_features(model, tokenizer, features, *, states=None, language: str | None = "it",
                        task: str = "transcribe", num_beams: int = 1,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
    """Transcripts of one batch of log-mels ``(batch, n_mels, frames)`` already computed (the dev
    pass of training: the clips are decoded and featurised once, for the dev loss and the dev
    WER alike). ``states``: the encoder's states for them, when known (a frozen encoder). Runs in
    whatever autocast the caller set; decoding as in `generate_token_ids`."""
    device, dtype, kwargs, max_new = _decode_setup(model, features.device, language, task, max_new_tokens)
    prompt, eos = _prompt_ids(model.generation_config), _eos_ids(model.generation_config)
    feats = features.to(device=device, dtype=dtype)
    states = None if states is None else states.to(device=device, dtype=dtype)
    ids = _generate_batch(model, feats, states, prompt, eos, num_beams=num_beams, max_new_tokens=max_new, **kwargs)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def transcribe(model, feature_extractor, tokenizer, audios: Sequence[np.ndarray], *,
               language: str | None = "it", task: str = "transcribe", num_beams: int = 1,
               batch_size: int = 8, device=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               progress: bool = False, encode: Callable[[Any, list[int]], Any] | None = None) -> list[str]:
    """Transcripts of 16 kHz waveforms, in input order (see `generate_token_ids` for decoding
    and ``encode``).

    Special tokens are dropped and surrounding spaces stripped; the text is *not* normalised
    (scoring does that).
    """
    ids = generate_token_ids(model, feature_extractor, audios, language=language, task=task,
                             num_beams=num_beams, batch_size=batch_size, device=device,
                             max_new_tokens=max_new_tokens, progress=progress, encode=encode)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@dataclass
class Hypothesis:
    """One decoded clip: generated token ids (prompt and end-of-text removed), whether the
    decoder stopped by itself (``finished``; False: cut at ``max_new_tokens``), and
    ``avg_logprob``: the mean natural-log probability of the generated tokens, the closing
    end-of-text included when there is one (as Whisper's own ``avg_logprob``). A clip that
    ends exactly at the limit counts as cut."""

    token_ids: list[int]
    avg_logprob: float | None
    finished: bool


def _forced_prompt(model, language: str | None, task: str) -> list[int]:
    """``<|sot|><|lang|><|task|><|notimestamps|>`` as ids, as ``generate`` builds it."""
    gc = model.generation_config
    ids = [gc.decoder_start_token_id]
    if getattr(gc, "is_multilingual", False):
        if language is not None:
            key = language if language.startswith("<|") else f"<|{language}|>"
            ids.append(gc.lang_to_id[key])
        ids.append(gc.task_to_id[task])
    ids.append(gc.no_timestamps_token_id)
    return ids


def generate_with_logprobs(model, feature_extractor, audios: Sequence[np.ndarray], *,
                           language: str | None = "it", task: str = "transcribe",
                           num_beams: int = 1, batch_size: int = 8, device=None,
                           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                           on_batch: Callable[[list[int], list[Hypothesis]], None] | None = None,
                           encode: Callable[[Any, list[int]], Any] | None = None,
                           ) -> list[Hypothesis]:
    """`generate_token_ids` plus a confidence per clip (`Hypothesis`), for pseudo-labelling.

    The encoder runs once per batch; ``generate`` (same settings as `generate_token_ids`, so the
    same tokens) and one teacher-forced decoder pass over ``prompt + tokens + <|endoftext|>``
    reuse its states. The log-probabilities come from that pass: ``log_softmax`` of the raw
    logits, so they do not depend on greedy vs beam search bookkeeping; Whisper's token
    suppression is not applied (a suppressed token is never generated, so this changes the
    normalisation by a negligible amount). ``on_batch(indices, hypotheses)`` is called after each
    batch (indices into ``audios``): the hook for writing results as they come. ``encode``: as in
    `generate_token_ids` (stored states of a frozen encoder instead of running it).
    """
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    audios = check_audios(audios, getattr(feature_extractor, "n_samples", None))
    if not audios:
        return []
    device, dtype, kwargs, max_new = _decode_setup(model, device, language, task, max_new_tokens)
    gc = model.generation_config
    prompt_set, eos = _prompt_ids(gc), _eos_ids(gc)
    eot = gc.eos_token_id if isinstance(gc.eos_token_id, int) else list(gc.eos_token_id)[0]
    prompt = _forced_prompt(model, language, task)
    results: list[Hypothesis | None] = [None] * len(audios)
    model.eval()
    with torch.inference_mode():
        for batch in length_sorted_batches([len(a) for a in audios], batch_size):
            feats = feature_extractor([audios[i] for i in batch], sampling_rate=SAMPLE_RATE,
                                      return_tensors="pt").input_features
            feats = feats.to(device=device, dtype=dtype)  # (batch, n_mels, 3000)
            states = (model.get_encoder()(feats).last_hidden_state if encode is None
                      else encode(feats, batch).to(device=device, dtype=dtype))
            encoder_outputs = BaseModelOutput(last_hidden_state=states)
            with _quiet_transformers():
                out = _generate(
                    model, feats, states, num_beams=num_beams,
                    do_sample=False, max_new_tokens=max_new, return_timestamps=False,
                    use_cache=True, **kwargs,
                )
            sequences = out if isinstance(out, torch.Tensor) else out["sequences"]
            # (generated ids, stopped by itself). Whisper's generate trims the end-of-text of the
            # longest row, so "shorter than the limit" is the test, not "an end-of-text follows".
            rows = [(ids, len(ids) < max_new)
                    for ids in (_clean_ids(row, prompt_set, eos) for row in sequences.tolist())]
            # teacher-forced pass: decoder input prompt + ids (+ eot), scored positions = ids (+ eot)
            targets = [ids + ([eot] if done else []) for ids, done in rows]
            width = len(prompt) + max(len(t) for t in targets)
            inputs = torch.full((len(batch), width), eot, dtype=torch.long, device=device)
            for j, t in enumerate(targets):
                seq = prompt + t
                inputs[j, : len(seq)] = torch.tensor(seq, device=device)
            logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=inputs[:, :-1],
                           use_cache=False).logits  # (batch, width - 1, vocab)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            hyps = []
            for j, ((ids, done), t) in enumerate(zip(rows, targets)):
                if not t:
                    hyps.append(Hypothesis(ids, None, done))
                    continue
                pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(t), device=device)
                lp = logprobs[j, pos, torch.tensor(t, device=device)]
                hyps.append(Hypothesis(ids, float(lp.mean()), done))
            for i, h in zip(batch, hyps):
                results[i] = h
            if on_batch is not None:
                on_batch(list(batch), hyps)
    return results  # type: ignore[return-value]


