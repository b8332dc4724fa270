"""Whole evaluations: a model (or a run, or a CTranslate2 folder) scored on a split.

What this module owns, in the order a reader meets it (decoding and WER/CER are `kdlib.decode`'s):

1. **Cost** (`measure`, `measure_call`, `Measurement`): real-time factor = decode wall seconds /
   audio seconds, and peak memory (CUDA ``max_memory_allocated`` on a GPU; sampled peak resident
   set size of the process on CPU).
2. **Whole evaluations** (`evaluate_model`, `evaluate_ct2`, `evaluate_run_dir`, `dev_scores`,
   `write_metrics`): a split (or a list of utterances) in, a metrics dict out,
   ``metrics_<split>.json`` on disk.
3. **Deployment engine** (`CT2Whisper`, `transcribe_ct2`, `export_ct2`): the same clips through
   CTranslate2 (the engine of faster-whisper) at int8 or float32, for speed comparisons;
   `export_ct2` converts a merged transformers folder offline (`kdlib.ct2.offline_ct2_dir` joins
   the offline package's model).
4. **Comparison** (`compare_models`, `compare_model_paths`, `comparison_table`,
   `markdown_table`, `per_speaker_table`, `write_comparison`, `plot_comparison`): one row per
   model: WER, CER, RTF, parameters, memory, hallucination indicators; JSON, CSV, markdown and
   a bar figure; WER per speaker. ``python -m kdlib compare`` runs it from names and folders.

Units: seconds, MiB (2**20 bytes, keys say ``_mb`` by habit), rates as fractions (0.12 = 12 %).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import resource
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kdlib import data, models, runs
from kdlib.caches import EncoderCache
from kdlib.config import TrainConfig
from kdlib.decode import (DEFAULT_MAX_NEW_TOKENS, MAX_SECONDS, NORMALIZER, SAMPLE_RATE, check_audios,
                          length_sorted_batches, model_device, speaker_of, transcribe, wer_cer)
from kdlib.files import atomic_write_text, replace_dir
from kdlib.progress import progress_bar


MIB = 2**20


# 4. Cost: real-time factor and peak memory


def _rss_bytes() -> int | None:
    """Current resident set size of this process (psutil if installed, else /proc)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024  # Linux reports KiB


class _RssSampler(threading.Thread):
    """Reads the process RSS every ``interval_s`` seconds and keeps the highest value."""

    def __init__(self, interval_s: float = 0.005):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.start_bytes = _rss_bytes()
        self.peak_bytes = self.start_bytes or 0
        self._stop_event = threading.Event()

    def _sample(self):
        now = _rss_bytes()
        if now is not None and now > self.peak_bytes:
            self.peak_bytes = now

    def run(self):
        while not self._stop_event.wait(self.interval_s):
            self._sample()

    def stop(self):
        self._stop_event.set()
        self.join()
        self._sample()


@dataclass
class Measurement:
    """Wall time and memory of one measured block.

    ``peak_memory_mb`` is the headline number and ``memory_kind`` says what it is:

    * ``"cuda_max_allocated"``: ``torch.cuda.max_memory_allocated`` during the block (the
      counter is reset when the block starts): tensors of this process on that GPU, weights
      included; the CUDA context and the allocator's cached blocks are not counted.
      ``peak_memory_delta_mb`` is that peak minus what was allocated when the block started.
    * ``"cpu_peak_rss"``: the highest resident set size of the whole process, sampled every
      5 ms by a thread during the block (weights, activations, Python, libraries, and anything
      else this process holds, e.g. another model loaded earlier). ``rss_delta_mb`` is that
      peak minus the RSS at the start: what the block itself added (activations, KV cache);
      ``peak_memory_delta_mb`` is the same number.

    ``ru_maxrss_mb`` is the kernel's peak RSS over the whole life of the process (it never goes
    down, so it is reported for reference, not as the block's peak). Compare models' memory from
    separate processes, or by ``rss_delta_mb``, when several models share one process.
    """

    seconds: float = 0.0
    audio_seconds: float = 0.0
    peak_memory_mb: float | None = None
    peak_memory_delta_mb: float | None = None
    memory_kind: str = ""
    rss_start_mb: float | None = None
    rss_peak_mb: float | None = None
    rss_delta_mb: float | None = None
    ru_maxrss_mb: float | None = None
    device: str = "cpu"

    @property
    def rtf(self) -> float | None:
        """Real-time factor: decode seconds per audio second (< 1 is faster than real time)."""
        return self.seconds / self.audio_seconds if self.audio_seconds > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), rtf=self.rtf)


@contextlib.contextmanager
def measure(*, audio_seconds: float = 0.0, device=None, interval_s: float = 0.005):
    """Context manager that times a block and records its peak memory.

    >>> with measure(audio_seconds=12.5) as m:
    ...     hyps = transcribe(...)
    >>> m.rtf, m.peak_memory_mb

    ``device``: the torch device the block computes on; for a CUDA device the block is
    synchronised at both ends (so queued kernels are timed) and CUDA memory is reported. The
    fields of the yielded `Measurement` are filled when the block ends; ``audio_seconds`` may be
    set inside the block.
    """
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    m = Measurement(audio_seconds=float(audio_seconds), device=str(dev))
    cuda_start = 0
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        cuda_start = torch.cuda.memory_allocated(dev)
    sampler = _RssSampler(interval_s)
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        if cuda:
            torch.cuda.synchronize(dev)
        m.seconds = time.perf_counter() - t0
        sampler.stop()
        if sampler.start_bytes is not None:
            m.rss_start_mb = sampler.start_bytes / MIB
            m.rss_peak_mb = sampler.peak_bytes / MIB
            m.rss_delta_mb = (sampler.peak_bytes - sampler.start_bytes) / MIB
        m.ru_maxrss_mb = _ru_maxrss_bytes() / MIB
        if cuda:
            peak = torch.cuda.max_memory_allocated(dev)
            m.peak_memory_mb = peak / MIB
            m.peak_memory_delta_mb = (peak - cuda_start) / MIB
            m.memory_kind = "cuda_max_allocated"
        else:
            m.peak_memory_mb = m.rss_peak_mb if m.rss_peak_mb is not None else m.ru_maxrss_mb
            m.peak_memory_delta_mb = m.rss_delta_mb
            m.memory_kind = "cpu_peak_rss" if m.rss_peak_mb is not None else "cpu_ru_maxrss"


def measure_call(fn: Callable, *args, audio_seconds: float = 0.0, device=None, **kwargs):
    """``fn(*args, **kwargs)`` under `measure`; returns ``(result, Measurement)``."""
    with measure(audio_seconds=audio_seconds, device=device) as m:
        result = fn(*args, **kwargs)
    return result, m


# --------------------------------------------------------------------------------------------
# 5. Whole evaluations


@dataclass
class EvalUtterance:
    """What an evaluation needs of one clip: an id, the reference, a speaker, and the audio
    either as a file (``path``) or as a 16 kHz waveform (``audio``)."""

    id: str
    text: str
    speaker: str | None = None
    path: Path | None = None
    audio: np.ndarray | None = None


def _as_eval_utterance(item: Any, index: int) -> EvalUtterance:
    """Accept `EvalUtterance`, a `kdlib.data.Utterance` (``.audio`` is its path), or a dict."""
    if isinstance(item, EvalUtterance):
        return item
    get = item.get if isinstance(item, dict) else (lambda k, d=None: getattr(item, k, d))
    audio = get("audio")
    path = get("path")
    if isinstance(audio, (str, os.PathLike)):
        path, audio = audio, None
    text = get("text", get("reference"))
    if text is None:
        raise ValueError(f"utterance {index}: no 'text' (reference transcript)")
    if audio is None and path is None:
        raise ValueError(f"utterance {index} ({get('id')}): neither 'audio' nor 'path'")
    uid = str(get("id", index))
    return EvalUtterance(uid, str(text), get("speaker"), Path(path) if path else None, audio)


def load_utterances(data_root: str | os.PathLike, split: str, *, language: str | None = None,
                    limit: int | None = None) -> tuple[list[EvalUtterance], dict[str, list[str]]]:
    """Utterances of an MLS split (`kdlib.data.scan_mls`) and the scan's skips.

    Every clip from 0 to 30 s is kept (``min_duration=0``: evaluation scores what it is given;
    Whisper cannot see past 30 s, so longer clips are skipped as ``too long``). Returns
    ``(utterances, {reason: [message, ...]})``; ``limit`` keeps the first N (in file order).
    """

    scan = data.scan_mls(data_root, split, min_duration=0.0, max_duration=MAX_SECONDS,
                         language=language)
    utts = [EvalUtterance(u.id, u.text, u.speaker, Path(u.audio)) for u in scan.utterances]
    if limit is not None:
        utts = utts[:limit]
    skipped = {reason: [msg for _, msg in items] for reason, items in scan.skipped.items()
               if reason != "audio without transcript" and items}
    return utts, skipped


def _load_waveform(path: Path) -> np.ndarray:

    return data.load_audio(path, SAMPLE_RATE).numpy()


def _unpack_model(model, feature_extractor=None, tokenizer=None):
    """(model, feature_extractor, tokenizer, name) from a bundle, a tuple, or three arguments."""
    name = None
    if isinstance(model, (tuple, list)):
        model, feature_extractor, tokenizer = model
    elif hasattr(model, "model") and hasattr(model, "tokenizer"):  # kdlib.models.WhisperBundle
        name = getattr(model, "name", None) or None
        feature_extractor = feature_extractor or model.feature_extractor
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    if feature_extractor is None or tokenizer is None:
        raise ValueError("evaluate: pass a bundle (.model/.feature_extractor/.tokenizer), a "
                         "(model, feature_extractor, tokenizer) tuple, or both keyword arguments")
    return model, feature_extractor, tokenizer, name


def _run_evaluation(decode: Callable[[list[np.ndarray], list["EvalUtterance"]], list[str]],
                    utterances: Iterable[Any], *, pre_skipped: dict[str, list[str]] | None = None,
                    device=None, progress: bool = True) -> dict[str, Any]:
    """Load audio (bad clips skipped and counted), decode under `measure`, score.
    ``decode(audios, utterances)``: transcripts of the kept clips, given with their utterances."""
    utts = [_as_eval_utterance(u, i) for i, u in enumerate(utterances)]
    skipped: list[dict[str, Any]] = []
    for reason, messages in (pre_skipped or {}).items():
        skipped += [dict(id=None, reason=reason, detail=msg) for msg in messages]
    kept: list[EvalUtterance] = []
    audios: list[np.ndarray] = []
    iterator: Iterable = utts
    if progress and any(u.audio is None for u in utts):

        iterator = progress_bar(utts, desc="load audio", unit="clip")
    for u in iterator:
        try:
            wave = _load_waveform(u.path) if u.audio is None else np.asarray(u.audio, np.float32)
            if wave.ndim != 1 or wave.size == 0:
                raise ValueError(f"expected a non-empty 1-D waveform, got shape {wave.shape}")
            if not np.isfinite(wave).all():
                raise ValueError("waveform contains NaN or infinite samples")
        except Exception as err:  # any unreadable clip: counted, the evaluation goes on
            where = u.path or f"utterance {u.id}"
            skipped.append(dict(id=u.id, reason="unreadable audio", detail=f"{where}: {err}"))
            continue
        if wave.size > MAX_SECONDS * SAMPLE_RATE:  # Whisper would hear only the first 30 s
            where = u.path or f"utterance {u.id}"
            skipped.append(dict(id=u.id, reason="too long", detail=(
                f"{where}: {wave.size / SAMPLE_RATE:.1f} s > {MAX_SECONDS:.0f} s, the part "
                "Whisper cannot see would count as deletions")))
            continue
        kept.append(u)
        audios.append(wave)
    audio_seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    with measure(audio_seconds=audio_seconds, device=device) as m:
        hyps = decode(audios, kept) if audios else []
    scores = wer_cer([u.text for u in kept], hyps, ids=[u.id for u in kept],
                     speakers=[u.speaker or speaker_of(u.id) for u in kept])
    skipped += scores.pop("skipped")
    scores.pop("skip_reasons")
    scores.update(
        n_skipped=len(skipped),
        skip_reasons=dict(Counter(s["reason"] for s in skipped)),
        skipped=skipped,
        n_decoded=len(kept),
        rtf=m.rtf,
        decode_seconds=m.seconds,
        audio_seconds=audio_seconds,
        peak_memory_mb=m.peak_memory_mb,
        peak_memory_delta_mb=m.peak_memory_delta_mb,
        memory_kind=m.memory_kind,
        memory=m.as_dict(),
    )
    return scores


def _add_voices(metrics: dict[str, Any], data_root) -> None:
    """Label per-speaker rows with the corpus' voice (``speakers.tsv``) when there is one."""
    if data_root is None:
        return

    voices = data.read_speakers(data_root)
    for spk, row in metrics.get("per_speaker", {}).items():
        if spk in voices:
            row["voice"] = voices[spk]


_HEAD_KEYS = ("name", "engine", "wer", "cer", "rtf", "peak_memory_mb", "n_parameters",
              "n_utterances", "n_skipped", "normalizer", "num_beams")


def _ordered(metrics: dict[str, Any]) -> dict[str, Any]:
    """Headline keys first, long lists last: a metrics file reads top-down."""
    tail = ("per_speaker", "skipped", "per_utterance")
    head = {k: metrics[k] for k in _HEAD_KEYS if k in metrics}
    mid = {k: v for k, v in metrics.items() if k not in head and k not in tail}
    return {**head, **mid, **{k: metrics[k] for k in tail if k in metrics}}


def _utterances_for(caller: str, utterances, data_root, split: str, limit: int | None):
    """The utterances to score: given ones (first ``limit``), or a split scanned from ``data_root``.
    Returns ``(utterances, skipped by the scan or None)``."""
    if utterances is None:
        if data_root is None:
            raise ValueError(f"{caller}: give utterances or data_root (+ split)")
        return load_utterances(data_root, split, limit=limit)
    return (list(utterances)[:limit] if limit is not None else utterances), None


def evaluate_model(model, utterances: Iterable[Any] | None = None, *,
                   data_root: str | os.PathLike | None = None, split: str = "dev",
                   feature_extractor=None, tokenizer=None, language: str | None = "it",
                   task: str = "transcribe", num_beams: int = 1, batch_size: int = 8,
                   device=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   limit: int | None = None, name: str | None = None,
                   progress: bool = True, reuse_encoder_states: bool = False) -> dict[str, Any]:
    """Decode a split (or a list of utterances) with a transformers Whisper and score it.

    ``model``: a `kdlib.models.WhisperBundle`, a ``(model, feature_extractor, tokenizer)`` tuple,
    or a model with ``feature_extractor=`` and ``tokenizer=``. ``utterances``: items with
    ``id``, ``text``, optional ``speaker`` and ``path`` or ``audio`` (16 kHz waveform), e.g.
    `kdlib.data.Utterance` or `EvalUtterance`; or leave it out and give ``data_root`` + ``split``
    (an MLS folder, e.g. ``kdlib.data.embedded_corpus("it")``).

    Bad input is skipped and counted: scan problems (missing/corrupt audio, empty text), clips
    that fail to decode, clips longer than Whisper's 30 s window (``"too long"``, as the scan
    calls them), references empty after normalisation. The time measured for ``rtf`` is
    decoding only (feature extraction + ``generate`` + detokenisation), not audio file reading.

    ``device``: None decodes on CUDA when there is one (the model is moved there), else where the
    model is.

    ``reuse_encoder_states=True`` (for WER/CER of a model whose encoder is whisper-base's or
    another already seen one): encoder states come from the on-disk store of
    `kdlib.caches.EncoderStore` (keyed by the encoder's exact weights and the audio file), are
    computed and added when missing, and ``generate`` runs the decoder only. Scores are those of
    a live decode; ``rtf``, ``decode_seconds`` and peak memory are then None, because the
    encoder's time is not in them. ``encoder_states`` in the result says which way it ran.

    Returns the `wer_cer` dict plus ``rtf``, ``decode_seconds``, ``audio_seconds``,
    ``peak_memory_mb`` and ``peak_memory_delta_mb`` (see `Measurement`), ``memory_kind``,
    ``memory`` (all memory fields), ``n_parameters``,
    ``engine`` (``"transformers"``), ``num_beams``, ``batch_size``, ``language``, ``task``,
    ``device``, ``dtype``, ``threads``, ``split``, ``data_root`` and ``name``.
    """
    import torch

    model, fe, tok, bundle_name = _unpack_model(model, feature_extractor, tokenizer)
    utterances, pre_skipped = _utterances_for("evaluate_model", utterances, data_root, split, limit)
    if device is None:  # CUDA when there is one: a model loaded on the CPU (large-v3) must not decode there for hours
        device = torch.device("cuda") if torch.cuda.is_available() else model_device(model)
    device = torch.device(device)

    def decode(audios, utts):
        encode = None
        if reuse_encoder_states:

            stored = EncoderCache.stored(model, {u.id: Path(u.path) for u in utts if u.path})
            encode = stored.encode_hook([u.id for u in utts], device)
        return transcribe(model, fe, tok, audios, language=language, task=task,
                          num_beams=num_beams, batch_size=batch_size, device=device,
                          max_new_tokens=max_new_tokens, progress=progress, encode=encode)

    metrics = _run_evaluation(decode, utterances, pre_skipped=pre_skipped, device=device,
                              progress=progress)
    if reuse_encoder_states:  # the encoder was (mostly) not run: no speed or memory figures
        metrics.update(rtf=None, decode_seconds=None, peak_memory_mb=None, peak_memory_delta_mb=None)
    metrics["encoder_states"] = "stored" if reuse_encoder_states else "computed"
    _add_voices(metrics, data_root)
    metrics.update(
        name=name or bundle_name or getattr(model.config, "_name_or_path", "") or "model",
        engine="transformers", n_parameters=models.count_parameters(model), num_beams=num_beams,
        batch_size=batch_size, language=language, task=task, device=str(device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        threads=torch.get_num_threads(), split=split,
        data_root=str(data_root) if data_root is not None else None,
    )
    return _ordered(metrics)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_json(obj):
    """NaN/inf become null (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def write_metrics(run_dir: str | os.PathLike, split: str, metrics: dict[str, Any]) -> Path:
    """Write ``<run_dir>/metrics_<split>.json`` (atomically; UTF-8, accents readable)."""
    path = Path(run_dir) / f"metrics_{split}.json"
    text = json.dumps(_clean_json(metrics), indent=2, ensure_ascii=False, default=_json_default)
    atomic_write_text(path, text + "\n")
    return path


def load_run_model(run_dir: str | os.PathLike, *, device=None):
    """The model a training run left behind, as a `kdlib.models.WhisperBundle`.

    Looked for in this order:

    1. ``<run_dir>/merged/``: a plain Hugging Face folder (model + tokenizer + feature
       extractor), what ``python -m kdlib export`` / `kdlib.runs.export_merged` writes;
    2. ``<run_dir>/adapter_final/``: the trainer's peft adapter; rebuilt and merged by
       `kdlib.runs.load_trained` (the hook for adapters: the trainer knows which base model
       and which LoRA preset it used, from ``training_config.json``);
    3. ``run_dir`` itself, if it is a Hugging Face folder (or an offline name / hub id).
    """

    run = Path(run_dir)
    if (run / "merged" / "config.json").is_file():
        return models.load_whisper(run / "merged", device=device)
    if (run / "adapter_final").is_dir():

        model, tokenizer, feature_extractor, _ = runs.load_trained(run, merge=True)
        if device is not None:
            model.to(device)
        return models.WhisperBundle(model.eval(), tokenizer, feature_extractor, None,
                                    name=run.name)
    if run.is_dir() and not (run / "config.json").is_file():
        raise FileNotFoundError(
            f"{run}: no merged/ folder, no adapter_final/ and no config.json; is this a "
            "finished training run (or a Hugging Face model folder)?")
    return models.load_whisper(run_dir, device=device)


def evaluate_run_dir(run_dir: str | os.PathLike, split: str = "dev",
                     data_root: str | os.PathLike | None = None, **kwargs) -> dict[str, Any]:
    """Evaluate the model of a run folder on ``split`` and write ``metrics_<split>.json`` there.

    Language, task and data come from ``<run_dir>/training_config.json`` when present (the
    trainer's `kdlib.config.TrainConfig`); ``data_root`` overrides the data folder; with neither,
    the embedded corpus of the run's language is used. ``kwargs`` go to `evaluate_model`
    (``num_beams``, ``batch_size``, ``limit``, ``device``...). Backs
    ``python -m kdlib evaluate --run-dir DIR --split dev|test``. Returns the metrics, with
    ``metrics_path`` added.
    """

    run = Path(run_dir)
    cfg_path = run / "training_config.json"

    # from_json: the run's paths (data_root) are stored relative to the run folder
    cfg = TrainConfig.from_json(cfg_path).to_dict() if cfg_path.is_file() else {}
    language = kwargs.pop("language", None) or cfg.get("language") or "it"
    kwargs.setdefault("task", cfg.get("task") or "transcribe")
    if data_root is None:
        data_root = cfg.get("data_root") or data.embedded_corpus(language)
    if "device" not in kwargs:  # the run's device; "auto" means CUDA when there is one
        import torch

        wanted = cfg.get("device") or "auto"
        kwargs["device"] = ("cuda" if torch.cuda.is_available() else "cpu") if wanted == "auto" \
            else wanted
    bundle = load_run_model(run, device=kwargs.get("device"))
    metrics = evaluate_model(bundle, data_root=data_root, split=split, language=language,
                             name=kwargs.pop("name", run.name), **kwargs)
    metrics["run_dir"] = str(run)
    metrics["metrics_path"] = str(write_metrics(run, split, metrics))
    return metrics


def dev_scores(source, config=None, *, name: str | None = None, limit: int | None = None,
               reuse_summary: bool = True, **decode) -> dict[str, Any]:
    """Dev WER/CER of one model as a table row: a run's own final evaluation when it has one,
    else a decode. The chapters' "score this run or reuse its summary".

    ``source``: a finished training run folder (``training_config.json`` + ``adapter_final/``;
    ``config`` defaults to its config), or a model with the `kdlib.config.TrainConfig` whose dev
    split it is scored on: a ``(model, feature_extractor, tokenizer)`` tuple, a `WhisperBundle`,
    or a Hugging Face folder / offline name (`load_run_model`).

    A run whose trainer scored the same clips (``reuse_summary``, its ``summary.json`` has a dev
    WER, and ``limit`` is None or its ``dev_utterances``) is not decoded again: its final
    evaluation is returned (the same greedy decoding and normaliser as a decode here). Otherwise
    the model (a run's through `kdlib.runs.load_trained`, LoRA merged) decodes the first
    ``limit`` clips (default: ``config.max_dev_utterances``, unless ``utterances`` are given) of
    ``config``'s dev split with
    `evaluate_model`, ``config.eval_max_new_tokens`` and ``reuse_encoder_states=True`` (scores of
    a full decode, no RTF); ``decode`` overrides any of `evaluate_model`'s arguments
    (``utterances``, ``data_root``, ``split``, ``max_new_tokens``, ``reuse_encoder_states``...).

    Returns `evaluate_model`'s dict, or for a reused summary ``name``, ``wer``, ``cer``,
    ``n_utterances`` and ``normalizer``; both with ``scored_by``: ``"summary"`` or ``"decoded"``.
    """

    is_path = isinstance(source, (str, os.PathLike))
    run = Path(source) if is_path and (Path(source) / "training_config.json").is_file() else None
    if run is not None:
        config = config or TrainConfig.from_json(run / "training_config.json")
        done = runs.final_dev_scores(run) if reuse_summary and (run / "summary.json").is_file() else None
        if done is not None and limit in (None, done["n"]):
            return {"name": name or run.name, "wer": done["wer"], "cer": done["cer"],
                    "n_utterances": done["n"], "normalizer": NORMALIZER, "scored_by": "summary"}
    if config is None:
        raise ValueError("dev_scores: a model that is not a run folder needs the config of its dev split")
    args: dict[str, Any] = dict(
        data_root=config.data_root or data.embedded_corpus(config.language), split=config.dev_split,
        language=config.language, task=config.task, limit=limit or config.max_dev_utterances,
        max_new_tokens=config.eval_max_new_tokens, progress=False, batch_size=config.batch_size,
        # the run's device (thesis: CUDA), not where the model happened to be loaded
        device=models.resolve_device(config.device),
        # demo: the frozen encoder's dev states are stored once on disk and reused; the thesis
        # preset keeps none (large-v3's take 7.7 MB a clip), so its rows decode live
        reuse_encoder_states=config.encoder_cache == "disk",
        name=name or (run.name if run is not None else None))
    if decode.get("utterances") is not None:  # the caller's clips: no default limit on them
        args["limit"] = limit
    args.update(decode)
    model = source
    if run is not None:
        model, tokenizer, feature_extractor, _ = runs.load_trained(run)
        model = (model, feature_extractor, tokenizer)
    elif is_path:  # a Hugging Face folder (a merged run) or an offline name
        model = load_run_model(source)
    metrics = evaluate_model(model, args.pop("utterances", None), **args)
    metrics["scored_by"] = "decoded"
    return metrics


# ---
# 3. CTranslate2: the deployment engine


#: Files copied next to ``model.bin`` so that `CT2Whisper` and faster-whisper find the tokenizer
#: and the front end (faster-whisper reads ``preprocessor_config.json`` for the number of mels).
CT2_COPY_FILES = ("tokenizer.json", "preprocessor_config.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "generation_config.json")
CT2_QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16",
                     "int8_bfloat16", "int16")


def export_ct2(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
               quantization: str = "float32") -> Path:
    """Convert a transformers Whisper folder (e.g. `kdlib.runs.export_merged`'s output) into a
    CTranslate2 folder, offline; returns ``out_dir``.

    ``ctranslate2.converters.TransformersConverter`` reads the local folder (no hub) and writes
    ``model.bin`` (weights stored as ``quantization``: ``int8`` about 4x smaller than
    ``float32``), ``config.json`` and ``vocabulary.json``; `CT2_COPY_FILES` that exist in
    ``hf_dir`` are copied alongside, so ``CT2Whisper(out_dir)`` and
    ``faster_whisper.WhisperModel(out_dir)`` load it. Written into a temporary folder and
    renamed, so an interrupted conversion never leaves a half folder at ``out_dir``; an existing
    ``out_dir`` is replaced.
    """
    import ctranslate2

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if quantization not in CT2_QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: expected one of {CT2_QUANTIZATIONS}")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'}: not a transformers model folder "
                                "(export a run first: python -m kdlib export --format hf)")
    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'tokenizer.json'}: missing; CTranslate2 needs the "
                                "fast tokenizer's file next to the model (tokenizer.save_pretrained)")
    if json.loads((hf_dir / "config.json").read_text()).get("kdlib_merge"):
        raise ValueError(f"{hf_dir}: this student merges encoder frames inside its encoder "
                         "(student_frame_factor > 1), which is not a standard Whisper shape; CTranslate2 "
                         "cannot run it. Use transformers (kdlib.models.load_whisper), or a student with "
                         "a shorter encoder window instead (student_window_seconds), which converts.")
    copy = [f for f in CT2_COPY_FILES if (hf_dir / f).is_file()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        converter = ctranslate2.converters.TransformersConverter(str(hf_dir), copy_files=copy)
        converter.convert(str(tmp / "model"), quantization=quantization, force=True)
        replace_dir(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class CT2Whisper:
    """A CTranslate2 Whisper (``ctranslate2.models.Whisper``) with its tokenizer and front end.

    ``model_dir`` holds ``model.bin`` and ``config.json`` (CTranslate2's converter output, or
    `offline_ct2_dir`) and ``tokenizer.json``; ``preprocessor_config.json`` if present, else an
    ``n_mels``-bin Whisper feature extractor is built. ``compute_type``: ``"float32"``,
    ``"int8"``, ``"int8_float32"``, ``"float16"`` (GPU), ``"default"`` (as stored).
    ``threads``: CTranslate2 intra-op threads (default: ``torch.get_num_threads()``, so both
    engines get the same cores). Loading is separate from decoding, so RTF times decoding only.
    """

    def __init__(self, model_dir: str | os.PathLike, *, compute_type: str = "default",
                 threads: int | None = None, device: str = "cpu",
                 feature_extractor=None, tokenizer=None):
        import ctranslate2
        import torch
        from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "model.bin").is_file():
            raise FileNotFoundError(f"{self.model_dir / 'model.bin'}: no CTranslate2 model here")
        self.compute_type = compute_type
        self.threads = int(threads or torch.get_num_threads())
        self.device = device
        self.model = ctranslate2.models.Whisper(
            str(self.model_dir), device=device, compute_type=compute_type,
            intra_threads=self.threads, inter_threads=1,
        )
        if feature_extractor is None:
            if (self.model_dir / "preprocessor_config.json").is_file():
                feature_extractor = WhisperFeatureExtractor.from_pretrained(self.model_dir)
            else:
                feature_extractor = WhisperFeatureExtractor(feature_size=self.model.n_mels)
        if tokenizer is None:
            if not (self.model_dir / "tokenizer.json").is_file():
                raise FileNotFoundError(f"{self.model_dir / 'tokenizer.json'}: missing; pass "
                                        "tokenizer= or copy the tokenizer next to model.bin")
            tokenizer = WhisperTokenizerFast(
                tokenizer_file=str(self.model_dir / "tokenizer.json"), unk_token="<|endoftext|>",
                bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                pad_token="<|endoftext|>", add_prefix_space=False)
        self.feature_extractor, self.tokenizer = feature_extractor, tokenizer

    def prompt(self, language: str | None = "it", task: str = "transcribe") -> list[int]:
        """``<|startoftranscript|><|it|><|transcribe|><|notimestamps|>`` as ids (no language or
        task token for an English-only model)."""
        tok = self.tokenizer.convert_tokens_to_ids
        ids = [tok("<|startoftranscript|>")]
        if self.model.is_multilingual:
            if language is not None:
                ids.append(tok(f"<|{language}|>"))
            ids.append(tok(f"<|{task}|>"))
        ids.append(tok("<|notimestamps|>"))
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids[1:-1]):
            raise ValueError(f"{self.model_dir}: tokenizer has no token for language "
                             f"{language!r} or task {task!r}")
        return ids

    def generate_token_ids(self, audios: Sequence[np.ndarray], *, language: str | None = "it",
                           task: str = "transcribe", beam_size: int = 1, batch_size: int = 8,
                           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[list[int]]:
        """Generated ids per clip, input order; same batching as `generate_token_ids`."""
        import ctranslate2

        audios = check_audios(audios, getattr(self.feature_extractor, "n_samples", None))
        prompt = self.prompt(language, task)
        eos = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        # Measured (ctranslate2 4.8): a Whisper generates at most max_length // 2 tokens after
        # the prompt (Whisper's sample_len = n_text_ctx // 2), so ask for twice the tokens wanted;
        # 448 (the decoder's positions) caps it at 224.
        max_length = min(2 * int(max_new_tokens), 448)
        results: list[list[int] | None] = [None] * len(audios)
        for batch in length_sorted_batches([len(a) for a in audios], batch_size):
            feats = self.feature_extractor([audios[i] for i in batch], sampling_rate=SAMPLE_RATE,
                                           return_tensors="np").input_features
            feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats, np.float32))
            out = self.model.generate(feats, [prompt] * len(batch), beam_size=beam_size,
                                      max_length=max_length, return_scores=False)
            for i, res in zip(batch, out):
                results[i] = [t for t in res.sequences_ids[0] if t != eos]
        return results  # type: ignore[return-value]

    def transcribe(self, audios: Sequence[np.ndarray], **kwargs) -> list[str]:
        ids = self.generate_token_ids(audios, **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def transcribe_ct2(model_dir: str | os.PathLike, audios: Sequence[np.ndarray], *,
                   language: str | None = "it", task: str = "transcribe", beam_size: int = 1,
                   compute_type: str = "default", threads: int | None = None,
                   batch_size: int = 8, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
    """Transcripts of 16 kHz waveforms with a CTranslate2 Whisper folder (see `CT2Whisper`)."""
    engine = CT2Whisper(model_dir, compute_type=compute_type, threads=threads)
    return engine.transcribe(audios, language=language, task=task, beam_size=beam_size,
                             batch_size=batch_size, max_new_tokens=max_new_tokens)


def evaluate_ct2(model_dir: str | os.PathLike, utterances: Iterable[Any] | None = None, *,
                 data_root: str | os.PathLike | None = None, split: str = "dev",
                 language: str | None = "it", task: str = "transcribe", beam_size: int = 1,
                 compute_type: str = "default", threads: int | None = None, batch_size: int = 8,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, limit: int | None = None,
                 name: str | None = None, n_parameters: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """`evaluate_model` for a CTranslate2 folder: same scoring, ``engine="ctranslate2"``.

    Loading the model is not timed. ``peak_memory_mb`` is the process' sampled peak RSS (see
    `Measurement`), CTranslate2's own allocations included. ``n_parameters`` is not readable from
    the engine: pass the transformers model's count to fill the comparison table.
    """
    utterances, pre_skipped = _utterances_for("evaluate_ct2", utterances, data_root, split, limit)
    engine = CT2Whisper(model_dir, compute_type=compute_type, threads=threads)

    def decode(audios, utts):
        return engine.transcribe(audios, language=language, task=task, beam_size=beam_size,
                                 batch_size=batch_size, max_new_tokens=max_new_tokens)

    metrics = _run_evaluation(decode, utterances, pre_skipped=pre_skipped, progress=progress)
    _add_voices(metrics, data_root)
    metrics.update(
        name=name or f"{Path(model_dir).name} (ct2 {compute_type})", engine="ctranslate2",
        compute_type=compute_type, n_parameters=n_parameters, num_beams=beam_size,
        batch_size=batch_size, language=language, task=task, device=engine.device,
        threads=engine.threads, split=split,
        data_root=str(data_root) if data_root is not None else None,
    )
    return _ordered(metrics)


# --------------------------------------------------------------------------------------------
# 7. Comparison table and figure

COMPARISON_COLUMNS = (
    "name", "engine", "compute_type", "num_beams", "threads", "wer", "cer", "insertion_rate",
    "repeated_5grams_per_100_words", "rtf", "speedup", "n_parameters", "peak_memory_mb",
    "peak_memory_delta_mb", "memory_kind", "n_utterances",
    "n_skipped", "normalizer",
)


def comparison_table(rows: Sequence[dict[str, Any]],
                     columns: Sequence[str] = COMPARISON_COLUMNS) -> list[dict[str, Any]]:
    """One flat dict per model with ``columns`` (missing values are ``None``).

    ``rows`` are metrics dicts (`evaluate_model`, `evaluate_ct2`, or hand-made dicts with the
    same keys); per-utterance lists are left out so the table stays a table.
    """
    return [{c: row.get(c) for c in columns} for row in rows]


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if column in ("wer", "cer", "insertion_rate"):
        return f"{100 * value:.1f}"
    if column == "n_parameters":
        return f"{value / 1e6:.1f}"
    if column == "rtf":
        return f"{value:.3f}"
    if column == "speedup":
        return f"{value:.2f}×"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


_MD_HEADERS = {
    "wer": "WER (%)", "cer": "CER (%)", "insertion_rate": "insertions (% of ref words)",
    "speedup": "speed-up over the first row",
    "repeated_5grams_per_100_words": "repeated 5-grams /100 words", "rtf": "RTF",
    "n_parameters": "parameters (M)", "peak_memory_mb": "peak memory (MiB)",
    "peak_memory_delta_mb": "memory added by decoding (MiB)",
    "n_utterances": "utterances", "n_skipped": "skipped", "num_beams": "beams",
}


def markdown_table(rows: Sequence[dict[str, Any]],
                   columns: Sequence[str] = COMPARISON_COLUMNS) -> str:
    """The comparison as a markdown table (WER/CER in %, parameters in millions)."""
    table = comparison_table(rows, columns)
    cols = [c for c in columns if any(r.get(c) is not None for r in table)] or list(columns)
    head = "| " + " | ".join(_MD_HEADERS.get(c, c) for c in cols) + " |"
    rule = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |" for r in table]
    return "\n".join([head, rule, *body]) + "\n"


def per_speaker_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """WER per speaker (rows) and model (columns): ``{"speaker", "voice", <model name>: wer}``.

    The embedded corpus has one espeak-ng voice per speaker, so this is WER per voice there.
    """
    names = [str(r.get("name") or f"model {i}") for i, r in enumerate(rows)]
    speakers: dict[str, dict[str, Any]] = {}
    for name, row in zip(names, rows):
        for spk, stats in (row.get("per_speaker") or {}).items():
            entry = speakers.setdefault(spk, {"speaker": spk, "voice": stats.get("voice")})
            entry[name] = stats.get("wer")
    return [{"speaker": e["speaker"], "voice": e["voice"], **{n: e.get(n) for n in names}}
            for _, e in sorted(speakers.items())]


def write_csv(path: Path, table: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as CSV (``None`` as an empty cell), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    atomic_write_text(path, buf.getvalue())


def add_speedups(rows: Sequence[dict[str, Any]], reference: str | None = None) -> None:
    """Set ``speedup`` = reference RTF / row RTF on every timed row (in place).

    The reference is the row named ``reference``, else the first timed row (by convention the
    teacher, as `compare_models` is called). Rows decoded from stored encoder states have no RTF,
    so no speed-up. Both RTFs come from the same process and thread count, so their ratio is the
    speed-up a user sees on this machine."""
    timed = [r for r in rows if r.get("rtf")]
    ref = next((r for r in timed if r.get("name") == reference), timed[0] if timed else None)
    for row in rows:
        row["speedup"] = ref["rtf"] / row["rtf"] if ref is not None and row.get("rtf") else None
        row["speedup_over"] = ref.get("name") if ref is not None and row.get("rtf") else None


def write_comparison(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, *,
                     stem: str = "comparison",
                     columns: Sequence[str] = COMPARISON_COLUMNS) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.md`` into ``out_dir``, and, when the
    rows carry per-speaker results, ``<stem>_per_speaker.csv`` / ``.md`` (WER per speaker and
    model). Returns ``{"json", "csv", "md"[, "speakers_csv", "speakers_md"]: path}``.

    JSON and CSV hold raw values (fractions, counts); markdown the rounded, human view.
    """
    out = Path(out_dir)
    table = comparison_table(rows, columns)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("json", "csv", "md")}
    atomic_write_text(paths["json"], json.dumps(_clean_json(table), indent=2, ensure_ascii=False,
                                            default=_json_default) + "\n")
    write_csv(paths["csv"], table, columns)
    atomic_write_text(paths["md"], markdown_table(rows, columns))
    speakers = per_speaker_table(rows)
    if speakers:
        cols = list(speakers[0])
        paths["speakers_csv"] = out / f"{stem}_per_speaker.csv"
        paths["speakers_md"] = out / f"{stem}_per_speaker.md"
        write_csv(paths["speakers_csv"], speakers, cols)
        head = "| speaker | voice | " + " | ".join(f"{c} WER (%)" for c in cols[2:]) + " |"
        lines = [head, "|" + "|".join("---" for _ in cols) + "|"]
        for r in speakers:
            cells = [r["speaker"], r["voice"] or "–"] + [_fmt("wer", r[c]) for c in cols[2:]]
            lines.append("| " + " | ".join(cells) + " |")
        atomic_write_text(paths["speakers_md"], "\n".join(lines) + "\n")
    return paths


_PANELS = (
    ("wer", "WER", "WER (%)", 100.0),
    ("cer", "CER", "CER (%)", 100.0),
    ("rtf", "Real-time factor", "decode s / audio s", 1.0),
    ("n_parameters", "Parameters", "millions", 1e-6),
    ("peak_memory_mb", "Peak memory", "MiB", 1.0),
)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | os.PathLike | None = None, *,
                    title: str | None = None):
    """Bar charts of WER, CER, RTF, parameters and peak memory, one bar per model.

    Returns the matplotlib figure; saves it to ``path`` when given (format from the suffix).
    A missing value is drawn as an empty slot labelled "n/a".
    """
    import matplotlib.pyplot as plt

    names = [str(r.get("name") or f"model {i}") for i, r in enumerate(rows)]
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(3.2 * len(_PANELS), 3.8))
    x = np.arange(len(rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, panel_title, unit, scale) in zip(axes, _PANELS):
        values = [r.get(key) for r in rows]
        heights = [v * scale if v is not None else 0.0 for v in values]
        bars = ax.bar(x, heights, color=[colors[i % len(colors)] for i in range(len(rows))])
        for bar, v, h in zip(bars, values, heights):
            label = "n/a" if v is None else (f"{h:.1f}" if key != "rtf" else f"{h:.2f}")
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, h), ha="center",
                        va="bottom", fontsize=8)
        ax.set_title(panel_title)
        ax.set_ylabel(unit)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.margins(y=0.15)
    normalizers = {r.get("normalizer") for r in rows if r.get("normalizer")}
    suffix = f" (text normaliser: {', '.join(sorted(normalizers))})" if normalizers else ""
    fig.suptitle((title or "Model comparison") + suffix)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def compare_models(entries: Sequence[dict[str, Any]], *, data_root: str | os.PathLike,
                   split: str = "dev", out_dir: str | os.PathLike | None = None,
                   limit: int | None = None, threads: int | None = None,
                   language: str | None = "it", batch_size: int = 8,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate several models on the same clips and write the comparison table.

    Each entry is a dict with ``name`` and either

    * ``model``: a `kdlib.models.WhisperBundle`, a ``(model, feature_extractor, tokenizer)``
      tuple, or a name/folder for `kdlib.models.load_whisper` (engine transformers); or
    * ``ct2_dir``: a CTranslate2 folder, with ``compute_type`` (``"int8"``, ``"float32"``...)
      and optionally ``n_parameters`` (engine CTranslate2);

    plus optional ``num_beams`` (default 1) and, for transformers, ``reuse_encoder_states``
    (see `evaluate_model`: WER/CER from stored encoder states, no RTF). The split is scanned
    and its audio decoded once;
    every model sees the same clips. ``threads`` sets both ``torch.set_num_threads`` and
    CTranslate2's intra-op threads, so the engines' RTFs are comparable (default: torch's
    current setting). Memory is measured in this one process: models loaded earlier stay in
    the RSS, so compare ``peak_memory_delta_mb`` or run one model per process for absolute
    numbers.

    With ``out_dir``: ``metrics_<split>_<name>.json`` per model, ``comparison.{json,csv,md}``,
    ``comparison_per_speaker.{csv,md}`` and ``comparison.png``. Returns the metrics dicts.
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    utts, pre_skipped = load_utterances(data_root, split, language=language, limit=limit)
    waves = []
    for u in utts:  # decode the audio once; an unreadable clip stays a path and is skipped later
        try:
            waves.append(EvalUtterance(u.id, u.text, u.speaker, u.path, _load_waveform(u.path)))
        except Exception:
            waves.append(u)
    rows = []
    for entry in entries:
        name = entry.get("name")
        if not name:
            raise ValueError(f"compare_models: entry without a 'name': {entry}")
        beams = int(entry.get("num_beams", 1))
        if entry.get("ct2_dir"):
            metrics = evaluate_ct2(
                entry["ct2_dir"], waves, language=language, beam_size=beams,
                compute_type=entry.get("compute_type", "default"), threads=threads,
                batch_size=batch_size, max_new_tokens=max_new_tokens, name=name,
                n_parameters=entry.get("n_parameters"), progress=progress)
        else:
            model = entry.get("model")
            if model is None:
                raise ValueError(f"compare_models: entry {name!r} has neither 'model' nor 'ct2_dir'")
            if isinstance(model, (str, os.PathLike)):

                model = models.load_whisper(model)
            metrics = evaluate_model(model, waves, language=language, num_beams=beams,
                                     batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     name=name, progress=progress,
                                     reuse_encoder_states=bool(entry.get("reuse_encoder_states")))
        # the scan's skips (missing/corrupt files) belong to every row
        for reason, messages in pre_skipped.items():
            metrics["skipped"] = [dict(id=None, reason=reason, detail=m) for m in messages] + \
                metrics["skipped"]
        metrics["n_skipped"] = len(metrics["skipped"])
        metrics["skip_reasons"] = dict(Counter(s["reason"] for s in metrics["skipped"]))
        metrics.update(split=split, data_root=str(data_root))
        _add_voices(metrics, data_root)
        rows.append(metrics)
        if out_dir is not None:  # written as soon as known: a later model's crash keeps this one
            write_metrics(out_dir, f"{split}_{_safe_name(name)}", metrics)
    add_speedups(rows)
    if out_dir is not None:
        for metrics in rows:  # again, with the speed-up over the first row
            write_metrics(out_dir, f"{split}_{_safe_name(metrics['name'])}", metrics)
        write_comparison(rows, out_dir)
        import matplotlib.pyplot as plt

        plt.close(plot_comparison(rows, Path(out_dir) / "comparison.png",
                                  title=f"Model comparison on {Path(data_root).name}/{split}"))
    return rows


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _hf_folder_for(bundle, name: str, out_dir: Path) -> Path:
    """A transformers folder holding ``bundle`` (its own folder when it has one with a fast
    tokenizer file; otherwise saved under ``out_dir/hf/<name>``), for `export_ct2`."""
    path = getattr(bundle, "path", None)
    if path is not None and (Path(path) / "config.json").is_file() \
            and (Path(path) / "tokenizer.json").is_file():
        return Path(path)
    target = out_dir / "hf" / _safe_name(name)
    bundle.model.save_pretrained(target)
    bundle.tokenizer.save_pretrained(target)
    bundle.feature_extractor.save_pretrained(target)
    return target


def compare_model_paths(specs: Sequence[str], *, data_root: str | os.PathLike, split: str = "dev",
                        out_dir: str | os.PathLike, ct2: bool = False,
                        quantizations: Sequence[str] = ("int8", "float32"),
                        num_beams: int = 1, **kwargs) -> list[dict[str, Any]]:
    """`compare_models` from names and folders: what ``python -m kdlib compare`` runs.

    Each spec is ``NAME=PATH`` or ``PATH``: an offline name (``whisper-base``), a Hugging Face
    folder, or a training run folder (see `load_run_model`). With ``ct2=True`` each model is
    also converted (`export_ct2`, into ``out_dir/ct2/<name>-<quantization>``) and decoded by
    CTranslate2 at every quantization, with the same threads as transformers, and the
    transformers parameter count. ``kwargs`` go to `compare_models` (``limit``, ``threads``,
    ``language``, ``batch_size``, ``max_new_tokens``, ``progress``).
    """
    out = Path(out_dir)
    entries: list[dict[str, Any]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        bundle = load_run_model(path)
        entries.append(dict(name=name, model=bundle, num_beams=num_beams))
        if ct2:
            hf = _hf_folder_for(bundle, name, out)
            n_params = models.count_parameters(bundle.model)
            for q in quantizations:
                folder = export_ct2(hf, out / "ct2" / f"{_safe_name(name)}-{q}", quantization=q)
                entries.append(dict(name=f"{name} (ct2 {q})", ct2_dir=folder, compute_type=q,
                                    n_parameters=n_params, num_beams=num_beams))
    return compare_models(entries, data_root=data_root, split=split, out_dir=out, **kwargs)
