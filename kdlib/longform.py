"""Long-form transcription: a recording of any length, cut into overlapping windows, decoded in
batches, merged back into one text; the `python -m kdlib transcribe` command.

Whisper reads a fixed window (30 s; a kdlib student with ``student_window_seconds`` fewer). A longer
recording is cut into chunks of one window that overlap by ``overlap`` seconds
(`chunk_spans`). Each chunk is decoded on its own (any engine: transformers ``generate`` through
`kdlib.decode.generate_token_ids`, or CTranslate2 through `kdlib.evaluate.CT2Whisper`), and
consecutive token sequences are joined where they agree (`merge_tokens`): the overlap of two
chunks is the same audio, so the end of one transcript and the start of the next hold the same
words. The join slides the next sequence along the previous one, takes the offset where the most
tokens coincide, and cuts in the middle of that overlap (the words nearest a chunk's edge are the
ones a cut word can corrupt); a chunk whose decoder got stuck repeating a span has the loop
collapsed first (`collapse_loops`). The join is the scheme of transformers' ASR pipeline with
``chunk_length_s``/``stride_length_s``, written here once so that both engines share it.

Outputs (`write_transcript`): plain text, JSON (the text plus every chunk's time span and the
words it contributed), or SRT subtitles (one cue per chunk, times of its share of the audio).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import soundfile as sf

from kdlib import data, decode, evaluate
from kdlib.files import atomic_write_text
from kdlib.progress import progress_bar

SAMPLE_RATE = decode.SAMPLE_RATE
AUDIO_SUFFIXES = (".wav", ".flac", ".opus", ".ogg", ".mp3")


def chunk_spans(n_samples: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` in samples: windows of ``window`` samples, each starting
    ``window - overlap`` after the one before, the last one ending at ``n_samples`` (it may be
    shorter). A recording no longer than one window is one chunk."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"chunks: need window >= 1 and 0 <= overlap < window, got {window} and {overlap}")
    if n_samples <= window:
        return [(0, n_samples)]
    step = window - overlap
    count = math.ceil((n_samples - window) / step) + 1
    return [(i * step, min(i * step + window, n_samples)) for i in range(count)]


def collapse_loops(tokens: Sequence[int], *, min_repeats: int = 3, max_period: int = 8) -> list[int]:
    """``tokens`` with every run of one span repeated ``min_repeats`` or more times in a row
    (periods 1..``max_period`` tokens) kept once: "di pomedi di pomedi di pomedi ..." becomes "di
    pomedi". A decoder stuck in such a loop (Whisper at a chunk cut mid-word does) would otherwise
    fill the chunk's token budget with it. Speech repeats a word twice at most, rarely three times."""
    out = list(tokens)
    i = 0
    while i < len(out):
        for period in range(1, max_period + 1):
            span = out[i:i + period]
            if len(span) < period:
                break
            repeats = 1
            while out[i + repeats * period:i + (repeats + 1) * period] == span:
                repeats += 1
            if repeats >= min_repeats:
                del out[i + period:i + repeats * period]
                break
        i += 1
    return out


def _best_overlap(left: Sequence[int], right: Sequence[int], longest: int) -> tuple[int, int]:
    """``(k, matches)``: how many of ``right``'s first tokens lie over ``left``'s last ones. Each
    k in 2..longest aligns ``left[-k:]`` with ``right[:k]`` position by position; the k whose share
    of agreeing positions is highest wins (a tiny bonus per position breaks ties towards the longer
    overlap), and it needs at least two agreeing tokens. So a chance agreement of a few common
    tokens ("di", ".") across a long span never beats the short span that really is the same audio
    (transformers' ASR pipeline scores its chunk joins the same way)."""
    best, best_score = (0, 0), 0.0
    for k in range(2, min(len(left), len(right), longest) + 1):
        matches = sum(a == b for a, b in zip(left[len(left) - k:], right[:k]))
        score = matches / k + 1e-4 * k
        if matches >= 2 and score > best_score:
            best, best_score = (k, matches), score
    return best


def merge_tokens(sequences: Sequence[Sequence[int]], *, overlap_fraction: Optional[float] = None
                 ) -> tuple[list[int], list[tuple[int, int]]]:
    """Join the token sequences of consecutive overlapping chunks into one.

    Returns ``(tokens, kept)``: the joined tokens and, per chunk, the ``[from, to)`` range of its
    own tokens that made it into the result. ``overlap_fraction`` (the overlap's share of a
    window): an overlap may hold at most twice that share of the longer sequence's tokens, plus
    two (default: any length). Two neighbours with no overlap found (silence in the overlap, or a
    decoder that disagreed with itself) are simply concatenated."""
    tokens: list[int] = []
    kept: list[tuple[int, int]] = []
    for seq in sequences:
        seq = list(seq)
        if not kept:
            tokens, kept = list(seq), [(0, len(seq))]
            continue
        prev_from, prev_to = kept[-1]
        left = tokens[len(tokens) - (prev_to - prev_from):]  # the previous chunk's share, as kept
        longest = len(seq) if overlap_fraction is None else \
            math.ceil(2 * overlap_fraction * max(prev_to, len(seq))) + 2
        k, matches = _best_overlap(left, seq, longest)
        if matches == 0:
            kept.append((0, len(seq)))
            tokens += seq
            continue
        # cut in the middle of the overlap: the previous chunk keeps the first half, this one the rest
        drop_left = k - k // 2
        tokens = tokens[: len(tokens) - drop_left]
        kept[-1] = (prev_from, prev_to - drop_left)
        kept.append((k // 2, len(seq)))
        tokens += seq[k // 2:]
    return tokens, kept


@dataclass
class Chunk:
    start: float  # seconds into the recording
    end: float
    text: str  # what this chunk contributed to the merged transcript
    decoded: str  # the chunk's whole transcript, overlap included


@dataclass
class Transcript:
    path: str
    seconds: float
    text: str
    chunks: list[Chunk] = field(default_factory=list)
    engine: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def transcribe_long(audio: np.ndarray, generate: Callable[[list[np.ndarray]], list[list[int]]], tokenizer, *,
                    window_seconds: float, overlap_seconds: Optional[float] = None, path: str = "",
                    engine: str = "", group: int = 8, bar=None) -> Transcript:
    """One recording through ``generate`` (a batch of waveforms -> token ids, prompt removed) in
    chunks of ``window_seconds`` overlapping by ``overlap_seconds`` (default: a fifth of the window),
    merged with `merge_tokens` after `collapse_loops`. Chunks go to ``generate`` ``group`` at a time; ``bar`` (a progress
    bar counting seconds of audio) advances after each group."""
    window = int(round(window_seconds * SAMPLE_RATE))
    overlap = int(round((window_seconds / 5 if overlap_seconds is None else overlap_seconds) * SAMPLE_RATE))
    spans = chunk_spans(len(audio), window, overlap)
    ids: list[list[int]] = []
    for first in range(0, len(spans), group):
        part = spans[first:first + group]
        ids += generate([audio[a:b] for a, b in part])
        if bar is not None:
            bar.update(round(((part[-1][1] if first + group >= len(spans) else spans[first + group][0])
                              - part[0][0]) / SAMPLE_RATE, 2))
    ids = [collapse_loops(seq) for seq in ids]
    merged, kept = merge_tokens(ids, overlap_fraction=overlap / window)

    def text(token_ids) -> str:
        return tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()

    chunks = [Chunk(start=round(a / SAMPLE_RATE, 3), end=round(b / SAMPLE_RATE, 3), text=text(seq[k0:k1]),
                    decoded=text(seq)) for (a, b), seq, (k0, k1) in zip(spans, ids, kept)]
    return Transcript(path=path, seconds=round(len(audio) / SAMPLE_RATE, 3), text=text(merged), chunks=chunks,
                      engine=engine)


def _srt_time(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def srt(transcript: Transcript) -> str:
    """SRT cues, one per chunk with words, over the chunk's own share of the audio: from the middle
    of the overlap with the chunk before to the middle of the overlap with the next."""
    cues, chunks = [], transcript.chunks
    for i, chunk in enumerate(chunks):
        if not chunk.text:
            continue
        start = chunk.start if i == 0 else (chunk.start + chunks[i - 1].end) / 2
        end = chunk.end if i == len(chunks) - 1 else (chunks[i + 1].start + chunk.end) / 2
        cues.append(f"{len(cues) + 1}\n{_srt_time(start)} --> {_srt_time(end)}\n{chunk.text}\n")
    return "\n".join(cues)


def render(transcript: Transcript, fmt: str) -> str:
    if fmt == "txt":
        return transcript.text + "\n"
    if fmt == "json":
        return json.dumps(transcript.to_dict(), indent=2, ensure_ascii=False) + "\n"
    if fmt == "srt":
        return srt(transcript)
    raise ValueError(f"format {fmt!r}: one of txt, json, srt")


def audio_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files given, and the audio files (by suffix, sorted) under folders given; a path that does
    not exist is an error naming it, before anything is decoded."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            inside = sorted(p for p in item.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            if not inside:
                raise FileNotFoundError(f"{item}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this folder")
            found += inside
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return found


class Engine:
    """What `transcribe_files` decodes with: a ``generate(waveforms) -> token ids`` function, the
    tokenizer, the window in seconds and a name for the output."""

    def __init__(self, generate, tokenizer, window_seconds: float, name: str):
        self.generate, self.tokenizer, self.window_seconds, self.name = generate, tokenizer, window_seconds, name


def hf_engine(bundle, *, language: Optional[str], batch_size: int = 8, device=None, name: str = "",
              max_new_tokens: int = decode.DEFAULT_MAX_NEW_TOKENS) -> Engine:
    """transformers ``generate`` on a `kdlib.models.WhisperBundle` (greedy, no timestamps)."""
    fe = bundle.feature_extractor

    def generate(audios):
        return decode.generate_token_ids(bundle.model, fe, audios, language=language, batch_size=batch_size,
                                         device=device, max_new_tokens=max_new_tokens)

    return Engine(generate, bundle.tokenizer, fe.n_samples / SAMPLE_RATE, name or "transformers")


def ct2_engine(ct2_model, *, language: Optional[str], batch_size: int = 8, name: str = "",
               max_new_tokens: int = decode.DEFAULT_MAX_NEW_TOKENS) -> Engine:
    """CTranslate2 (`kdlib.evaluate.CT2Whisper`), greedy."""

    def generate(audios):
        return ct2_model.generate_token_ids(audios, language=language, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens)

    return Engine(generate, ct2_model.tokenizer, ct2_model.feature_extractor.n_samples / SAMPLE_RATE,
                  name or f"ctranslate2 {ct2_model.compute_type}")


def load_engine(model: str, *, ct2: bool = False, quantization: str = "int8", language: Optional[str] = "it",
                batch_size: int = 8, device=None, threads: Optional[int] = None,
                max_new_tokens: int = decode.DEFAULT_MAX_NEW_TOKENS) -> Engine:
    """The engine for ``model``: a training run folder, an exported or other transformers folder,
    an offline name (`kdlib.evaluate.load_run_model`), or with ``ct2`` also a CTranslate2 folder
    (``model.bin``). With ``ct2`` a transformers model is converted first, into a temporary folder
    that is removed when the process ends."""
    if ct2 and (Path(model) / "model.bin").is_file():
        return ct2_engine(evaluate.CT2Whisper(model, compute_type=quantization, threads=threads),
                          language=language, batch_size=batch_size, max_new_tokens=max_new_tokens)
    bundle = evaluate.load_run_model(model, device=None if ct2 else device)
    if not ct2:
        return hf_engine(bundle, language=language, batch_size=batch_size, device=device,
                         name=f"transformers {Path(model).name or model}", max_new_tokens=max_new_tokens)
    work = Path(tempfile.mkdtemp(prefix="kdlib-transcribe-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    folder = evaluate.export_ct2(evaluate._hf_folder_for(bundle, "model", work), work / "ct2", quantization=quantization)
    engine = evaluate.CT2Whisper(folder, compute_type=quantization, threads=threads,
                                 feature_extractor=bundle.feature_extractor, tokenizer=bundle.tokenizer)
    return ct2_engine(engine, language=language, batch_size=batch_size, max_new_tokens=max_new_tokens)


def transcribe_files(paths: Sequence[Path], engine: Engine, *, out_dir: Optional[Path] = None, fmt: str = "txt",
                     overlap_seconds: Optional[float] = None, progress: bool = True,
                     echo: Callable[[str], None] = print) -> tuple[list[Transcript], dict[str, str]]:
    """Transcribe each file; returns ``(transcripts, unreadable)`` where ``unreadable`` maps a file
    that could not be decoded to the reason (it is skipped and reported, the others go on).

    With ``out_dir``, each transcript is written as ``<out_dir>/<file stem>.<fmt>``, atomically, once
    the whole file is done (nothing half-written); otherwise it is passed to ``echo``."""
    done, unreadable = [], {}
    sizes = {}
    for path in paths:  # the bar counts seconds of audio; the header gives them without decoding
        try:
            info = sf.info(str(path))
            sizes[path] = info.frames / info.samplerate
        except Exception:  # unreadable: reported when it is decoded below
            sizes[path] = 0.0
    bar = progress_bar(total=round(sum(sizes.values()), 2), desc="transcribe", unit="s audio", disable=not progress)
    for path in paths:
        try:
            audio = data.load_audio(path, SAMPLE_RATE).numpy()
        except data.AudioError as err:
            unreadable[str(path)] = str(err)
            continue
        transcript = transcribe_long(audio, engine.generate, engine.tokenizer, window_seconds=engine.window_seconds,
                                     overlap_seconds=overlap_seconds, path=str(path), engine=engine.name, bar=bar)
        text = render(transcript, fmt)
        if out_dir is not None:
            atomic_write_text(Path(out_dir) / f"{path.stem}.{fmt}", text)
        else:
            echo(text.rstrip("\n") if fmt != "txt" else f"{path}: {transcript.text}")
        done.append(transcript)
    bar.close()
    return done, unreadable
