"""Pseudo-labels: a teacher transcribes a split, a WER filter keeps the good transcripts, and the
kept ones become a training folder (distil-whisper's data recipe, arXiv 2311.00430 §3).

Three steps, each a plain function with a file you can open:

1. **label** (`pseudo_label`): the teacher (an offline name such as ``whisper-base``, or a local
   Hugging Face folder, e.g. a stage-0 adapted teacher exported by `kdlib.runs.export_merged`)
   decodes every clip of ``<data>/<split>``, batched, and appends one JSON line per clip to
   ``<out>/pseudo_labels.jsonl``::

       {"id": "1001_106_000000", "text": "<teacher's transcript>", "reference": "<MLS text or null>",
        "wer": 0.083, "avg_logprob": -0.21, "n_tokens": 14, "finished": true,
        "speaker": "1001", "audio": "<source file>", "duration": 4.1}

   ``wer`` is the utterance's WER of the pseudo-label against the reference, both normalised
   with Whisper's *basic* normaliser (`kdlib.decode.basic_normalize`); ``null`` without a
   reference (audio-only data) or when the reference is empty after normalisation.
   ``avg_logprob`` is the teacher's mean log-probability of its own tokens (see
   `kdlib.decode.generate_with_logprobs`), a confidence that needs no reference.
   Each batch is appended, flushed and fsynced: a run killed halfway loses at most the batch in
   flight, and rerunning the same command skips every id already in the file (a truncated last
   line, the trace of a kill, is cut off first). ``<out>`` is itself an MLS-shaped folder:
   ``<out>/<split>/transcripts.txt`` (``id<TAB>pseudo text``) and
   ``<out>/<split>/audio/<speaker>/<book>/<id>.<ext>`` (symbolic links to the source audio by
   default), so ``kdlib.data.scan_mls(out, split, language="it")`` reads it like any MLS split.
   Data without transcripts works too (see `source_utterances`).
2. **filter** (`filter_pseudo_labels`): keep an utterance when the WER of its pseudo-label is
   below ``max_wer`` (λ; distil-whisper: 10 %, 20 % for a weaker teacher). As in distil-whisper,
   the comparison is strict (``wer < λ``: one error in ten words is dropped at λ = 0.10) and an
   utterance whose reference is empty after normalisation is dropped (its WER is unknown).
   Utterances without any reference (audio-only data) cannot be filtered; they are kept unless
   ``keep_unscored=False``. A transcript the decoder did not finish (it ran into
   ``max_new_tokens``: a repetition loop) is dropped too (``drop_cut``).
3. **training folder** (`training_folder`): an MLS-shaped folder whose training split holds the
   chosen targets, and whose other splits (dev, test) are links to the original ones, so the
   trainer's existing fields read it: ``data_root=<folder>``, ``train_split=<split>``.
   ``targets``:

   * ``"pseudo"`` (distil-whisper's choice, the default): the pseudo-labels of the kept
     utterances. The reference is used only to decide what is kept.
   * ``"references"``: the references of the *same* kept utterances, so "pseudo vs references"
     compares the label source on identical audio (``max_wer=None``: every utterance, the plain
     supervised baseline).
   * ``"both"``: every utterance once, with its pseudo-label where it passed the filter and its
     reference where it did not: no audio is thrown away, and the reference repairs what the
     teacher got wrong. Not part of distil-whisper; an ablation of this book.

   A sweep over λ is one parameter: ``for lam in (0.1, 0.2, 0.3): training_folder(...,
   max_wer=lam, out=f"data/pl_wer{int(100 * lam)}")``.

This module sits next to `kdlib.evaluate` (it decodes and scores with it) and never imports
`kdlib.train`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kdlib import data, decode, evaluate, files, models
from kdlib.caches import EncoderCache
from kdlib.data import MAX_SECONDS, parse_mls_id, scan_mls
from kdlib.progress import progress_bar
from kdlib.text import usable_transcript


JSONL_NAME = "pseudo_labels.jsonl"
CONFIG_NAME = "pseudo_config.json"
TARGETS = ("pseudo", "references", "both")
#: Settings that must match for a rerun to continue an existing pseudo-label folder.
_RESUME_KEYS = ("model", "split", "language", "task", "num_beams", "max_new_tokens")


# --------------------------------------------------------------------------------------------
# Sources: the clips to label
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceClip:
    """One clip to pseudo-label: an MLS-style id, where its audio is, its reference if any."""

    id: str
    speaker: str
    book: str
    audio: Path
    reference: str | None
    duration: float


def _id_part(text: str) -> str:
    """A piece of an MLS id: no underscores or spaces (they separate speaker, book, utterance)."""
    return re.sub(r"[_\s]+", "-", text.strip()).strip("-") or "0"


def source_utterances(data_dir: str | os.PathLike, split: str, *, language: str | None = None,
                      limit: int | None = None) -> tuple[list[SourceClip], dict[str, list[str]]]:
    """The clips of ``<data_dir>/<split>`` and what was skipped (``{reason: [message, ...]}``).

    * With ``<split>/transcripts.txt``: the MLS scan (`kdlib.data.scan_mls`), every clip up to
      Whisper's 30 s window (``min_duration=0``); the transcripts are the references.
    * Without it (audio only): every ``.opus``/``.flac``/``.wav`` below ``<split>/audio`` (or
      ``<split>`` itself), sorted by path; references are ``None``. A file named like an MLS id
      (``<speaker>_<book>_<utt>``) keeps its name; any other file ``<sub>/<stem>.wav`` becomes
      ``<sub>_0_<stem>`` (underscores and spaces in the parts turned into ``-``; ``0`` as the
      speaker for files directly in the folder), numbered ``-2``, ``-3``... if two collide.
      Clips over 30 s are skipped (``"too long"``): Whisper would hear only their start.

    ``limit`` keeps the first N clips (file order), the same N on every rerun.
    """
    import soundfile as sf

    root = Path(data_dir)
    split_dir = root / split
    if (split_dir / "transcripts.txt").is_file():
        scan = data.scan_mls(root, split, min_duration=0.0, max_duration=data.MAX_SECONDS,
                             language=language or "it")
        clips = [SourceClip(u.id, u.speaker, u.book, Path(u.audio), u.text, u.duration)
                 for u in scan.utterances]
        skipped = {reason: [msg for _, msg in items] for reason, items in scan.skipped.items()
                   if items}
        return (clips[:limit] if limit is not None else clips), skipped

    audio_root = split_dir / "audio" if (split_dir / "audio").is_dir() else split_dir
    if not audio_root.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such folder; expected {split_dir}/transcripts.txt "
                                f"(MLS) or audio files under {split_dir}/audio or {split_dir}")
    files = sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(audio_root, followlinks=True)
        for name in names if os.path.splitext(name)[1].lower() in data.AUDIO_EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(f"{audio_root}: no audio files ({', '.join(data.AUDIO_EXTENSIONS)})")
    clips: list[SourceClip] = []
    skipped: dict[str, list[str]] = {}
    taken: set[str] = set()
    for path in files:
        if limit is not None and len(clips) >= limit:
            break
        rel = path.relative_to(audio_root)
        parts = parse_mls_id(path.stem)
        if parts:
            speaker, book, _ = parts
            uid = path.stem
        else:
            speaker = _id_part(rel.parts[0]) if len(rel.parts) > 1 else "0"
            book = "0"
            uid = f"{speaker}_{book}_{_id_part(path.stem)}"
        base, k = uid, 1
        while uid in taken:
            k += 1
            uid = f"{base}-{k}"
        try:
            info = sf.info(str(path))
            seconds = info.frames / info.samplerate
        except Exception as err:  # soundfile raises several types for broken files
            skipped.setdefault("corrupt audio", []).append(f"{rel}: cannot read header ({err})")
            continue
        if seconds > data.MAX_SECONDS:
            skipped.setdefault("too long", []).append(
                f"{rel}: {seconds:.1f} s > {data.MAX_SECONDS:.0f} s (Whisper's window)")
            continue
        taken.add(uid)
        clips.append(SourceClip(uid, speaker, book, path, None, seconds))
    return clips, skipped


# --------------------------------------------------------------------------------------------
# The JSON-lines file: append, fsync, read back (tolerating a cut last line)
# --------------------------------------------------------------------------------------------
def read_pseudo_labels(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a ``pseudo_labels.jsonl``, in file order.

    A last line that is cut short (no newline, or not valid JSON: the process was killed while
    writing it) is ignored, and with ``repair=True`` cut off the file, so appending continues on
    a clean line. A bad line anywhere else is an error naming the line: that is not a kill.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    records: list[dict[str, Any]] = []
    good_end = 0  # byte offset just after the last good line
    lines = raw.split(b"\n")
    offset = 0
    for lineno, line in enumerate(lines, start=1):
        last = lineno == len(lines)
        end = offset + len(line) + (0 if last else 1)
        if line.strip():
            try:
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError("not an object with an 'id'")
                if last:  # no newline after it: the write may have stopped inside the record
                    raise ValueError("no newline at the end")
            except (ValueError, UnicodeDecodeError) as err:
                is_tail = last or all(not rest.strip() for rest in lines[lineno:])
                if not is_tail:
                    raise ValueError(f"{path} line {lineno}: not a JSON record ({err}); only the "
                                     "last line may be cut short by a kill") from None
                warnings.warn(f"{path} line {lineno}: cut short (an interrupted write); "
                              "ignored, that clip is labelled again", RuntimeWarning, stacklevel=2)
                break
            records.append(record)
        good_end = end
        offset = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records


def _append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append whole lines and make them durable before returning (flush + fsync)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# 1. Label
# --------------------------------------------------------------------------------------------
@dataclass
class PseudoLabelReport:
    """What `pseudo_label` did. ``seconds`` is wall time of this call (loading included)."""

    out_dir: Path
    split: str
    n_clips: int  # clips in the source (after ``limit``)
    n_resumed: int  # already in the file before this call
    n_labelled: int  # labelled by this call
    n_empty: int  # pseudo-labels with no words (kdlib.text.usable_transcript; left out of transcripts.txt)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    audio_seconds: float = 0.0  # audio decoded by this call
    wer: float | None = None  # corpus WER of the pseudo-labels against the references
    n_scored: int = 0

    def report(self) -> str:
        n_skip = sum(len(v) for v in self.skipped.values())
        lines = [f"{self.out_dir}/{self.split}: {self.n_clips} clips, {self.n_resumed} already "
                 f"labelled, {self.n_labelled} labelled now in {self.seconds:.1f} s"
                 + (f" (RTF {self.seconds / self.audio_seconds:.2f})" if self.audio_seconds else "")
                 + f", {self.n_empty} empty, {n_skip} skipped"]
        for reason, messages in self.skipped.items():
            lines.append(f"  [{reason}] {len(messages)}: {messages[0]}")
        if self.wer is not None:
            lines.append(f"  pseudo-label WER against the references: {100 * self.wer:.1f} % "
                         f"over {self.n_scored} utterances (normaliser: {decode.NORMALIZER})")
        return "\n".join(lines)


def _check_resume(out: Path, settings: dict[str, Any]) -> None:
    path = out / CONFIG_NAME
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in _RESUME_KEYS if saved.get(k) != settings.get(k)]
        if diff:
            what = ", ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
            raise ValueError(f"{out} holds pseudo-labels made with other settings ({what}); "
                             "choose another --out folder or delete it")
    files.atomic_write_text(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def _utterance_wers(references: Sequence[str | None], hypotheses: Sequence[str]) -> list[float | None]:
    """Per-utterance WER on basic-normalised text; ``None`` without a (non-empty) reference."""
    out: list[float | None] = [None] * len(references)
    scored = [i for i, r in enumerate(references) if r is not None]
    if scored:
        ids = [str(i) for i in scored]
        scores = decode.wer_cer([references[i] for i in scored], [hypotheses[i] for i in scored],
                                  ids=ids, speakers=["-"] * len(scored))
        for row in scores["per_utterance"]:
            out[int(row["id"])] = row["wer"]
    return out


def pseudo_label(model: Any, data_dir: str | os.PathLike, split: str, out_dir: str | os.PathLike,
                 *, language: str = "it", task: str = "transcribe", num_beams: int = 1,
                 batch_size: int = 8, limit: int | None = None,
                 max_new_tokens: int = decode.DEFAULT_MAX_NEW_TOKENS, device=None,
                 link: str = "symlink", chunk_batches: int = 16,
                 progress: bool = True, reuse_encoder_states: bool = False) -> PseudoLabelReport:
    """Transcribe ``<data_dir>/<split>`` with a teacher and write the pseudo-label folder.

    Args:
        model: an offline name (``"whisper-base"``), a Hugging Face folder or hub id (loaded by
            `kdlib.models.load_whisper`), or a loaded `kdlib.models.WhisperBundle`.
        data_dir: an MLS language folder, or a folder of audio without transcripts (see
            `source_utterances`).
        out_dir: where ``pseudo_labels.jsonl``, ``pseudo_config.json``, ``<split>/`` and (if
            the source has one) ``speakers.tsv`` go. Rerun the same call to resume.
        num_beams: 1 greedy (distil-whisper's pseudo-labelling default), more for beam search.
        limit: label only the first N clips.
        link: how ``<out>/<split>/audio`` refers to the source audio: ``"symlink"`` (default;
            `kdlib.data.scan_mls` follows them), ``"hardlink"`` or ``"copy"``.
        chunk_batches: audio is decoded this many batches at a time, so memory stays flat on
            a large split.
        reuse_encoder_states: read the teacher's encoder states from the disk store of
            `kdlib.caches.EncoderStore` (and add missing ones) instead of running the encoder.
            Right when the teacher's encoder is one that training already ran over these clips
            (a stage-0 teacher adapts its decoder only); the labels are those of a live decode.

    Returns a `PseudoLabelReport` (also the content of the printed summary).
    """

    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.resolve() == Path(data_dir).resolve():
        raise ValueError(f"{out}: the pseudo-label folder must not be the data folder (its "
                         f"{split}/transcripts.txt and audio would be replaced)")
    out.mkdir(parents=True, exist_ok=True)
    model_name = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name", None)
    settings = dict(model=str(model_name), data_dir=str(data_dir), split=split,
                    language=language, task=task, num_beams=int(num_beams),
                    max_new_tokens=int(max_new_tokens), normalizer=decode.NORMALIZER)
    _check_resume(out, settings)
    clips, skipped = source_utterances(data_dir, split, language=language, limit=limit)
    jsonl = out / JSONL_NAME
    done = {r["id"] for r in read_pseudo_labels(jsonl, repair=True)}
    pending = [c for c in clips if c.id not in done]
    report = PseudoLabelReport(out, split, len(clips), len(clips) - len(pending), 0, 0, skipped)

    if pending:
        if isinstance(model, (str, os.PathLike)):

            model = models.load_whisper(model, device=device)
        hf_model, fe, tok, _ = evaluate._unpack_model(model)
        stored = None
        if reuse_encoder_states:

            stored = EncoderCache.stored(hf_model, {c.id: Path(c.audio) for c in pending})
        bar = progress_bar(total=len(pending), desc=f"pseudo-label {split}", unit="clip",
                   disable=not progress)
        chunk = max(1, batch_size * chunk_batches)
        try:
            for start in range(0, len(pending), chunk):
                kept: list[SourceClip] = []
                waves: list[np.ndarray] = []
                for c in pending[start:start + chunk]:
                    try:
                        waves.append(data.load_audio(c.audio).numpy())
                        kept.append(c)
                    except data.AudioError as err:
                        skipped.setdefault("unreadable audio", []).append(str(err))
                        bar.update(1)
                report.audio_seconds += sum(len(w) for w in waves) / data.SAMPLE_RATE

                def write_batch(indices: list[int], hyps: list[decode.Hypothesis]) -> None:
                    texts = [t.strip() for t in tok.batch_decode([h.token_ids for h in hyps],
                                                                 skip_special_tokens=True)]
                    batch_clips = [kept[i] for i in indices]
                    wers = _utterance_wers([c.reference for c in batch_clips], texts)
                    records = [dict(id=c.id, text=text, reference=c.reference, wer=w,
                                    avg_logprob=h.avg_logprob, n_tokens=len(h.token_ids),
                                    finished=h.finished, speaker=c.speaker, audio=str(c.audio),
                                    duration=round(c.duration, 3))
                               for c, text, w, h in zip(batch_clips, texts, wers, hyps)]
                    _append_records(jsonl, records)
                    report.n_labelled += len(records)
                    bar.update(len(records))

                encode = stored.encode_hook([c.id for c in kept]) if stored is not None else None
                decode.generate_with_logprobs(
                    hf_model, fe, waves, language=language, task=task, num_beams=num_beams,
                    batch_size=batch_size, device=device, max_new_tokens=max_new_tokens,
                    on_batch=write_batch, encode=encode)
        finally:
            bar.close()

    records = read_pseudo_labels(jsonl)
    wanted = {c.id for c in clips}
    records = [r for r in records if r["id"] in wanted]
    report.n_empty = write_split(records, out, split, targets="pseudo", link=link)
    if (Path(data_dir) / "speakers.tsv").is_file():
        shutil.copy2(Path(data_dir) / "speakers.tsv", out / "speakers.tsv")
    scored = [r for r in records if r.get("wer") is not None]
    if scored:
        scores = decode.wer_cer([r["reference"] for r in scored], [r["text"] for r in scored])
        report.wer, report.n_scored = scores["wer"], scores["n_utterances"]
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------------------------
# Writing an MLS-shaped split
# --------------------------------------------------------------------------------------------
def _place_audio(source: Path, target: Path, link: str) -> None:
    """Make ``target`` refer to ``source`` (symlink, hard link or copy); idempotent."""
    if target.parent.resolve() / target.name == source.resolve():
        raise ValueError(f"{target}: is the source audio itself; write to another folder")
    if target.is_symlink() or target.exists():
        if link == "symlink" and target.is_symlink() and Path(os.readlink(target)) == source:
            return
        if link != "symlink" and not target.is_symlink() and target.exists():
            return
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        try:
            target.symlink_to(source)
            return
        except OSError:  # no symlinks here (some file systems, Windows without privileges)
            pass
    elif link == "hardlink":
        try:
            os.link(source, target)
            return
        except OSError:  # another file system
            pass
    shutil.copy2(source, target)


def write_split(records: Iterable[dict[str, Any]], out_dir: str | os.PathLike, split: str, *,
                targets: str = "pseudo", link: str = "symlink") -> int:
    """Write ``<out_dir>/<split>/transcripts.txt`` and ``audio/<speaker>/<book>/<id>.<ext>``.

    Each record needs ``id``, ``audio`` (the source file) and the text chosen by ``targets``:
    ``"pseudo"`` takes ``text``, ``"references"`` takes ``reference``, and a record may carry
    its own choice in ``"target"`` (``"pseudo"`` or ``"references"``: how `training_folder`
    builds ``both``). Records whose chosen text is empty or missing are left out (the MLS scan
    would skip them anyway). Links of clips no longer listed are removed, so the folder always
    matches its transcripts. Returns how many records were left out for an empty text.
    """
    if link not in ("symlink", "hardlink", "copy"):
        raise ValueError(f"link must be 'symlink', 'hardlink' or 'copy', got {link!r}")
    split_dir = Path(out_dir) / split
    audio_dir = split_dir / "audio"
    lines: list[str] = []
    placed: set[Path] = set()
    n_empty = 0
    for r in records:
        choice = r.get("target", targets)
        text = r.get("text") if choice == "pseudo" else r.get("reference")
        text = " ".join((text or "").split())  # one line, single spaces (tabs would break it)
        if not usable_transcript(text):  # no words (also "..."): the scan would skip it anyway
            n_empty += 1
            continue
        parts = parse_mls_id(r["id"])
        if parts is None:
            raise ValueError(f"record {r['id']!r}: not an MLS id <speaker>_<book>_<utt>")
        source = Path(r["audio"]).absolute()
        target = audio_dir / parts[0] / parts[1] / f"{r['id']}{source.suffix.lower()}"
        _place_audio(source, target, link)
        placed.add(target)
        lines.append(f"{r['id']}\t{text}\n")
    if audio_dir.is_dir():  # a rerun with a stricter filter: drop the links it no longer wants
        for dirpath, _, names in os.walk(audio_dir):
            for name in names:
                path = Path(dirpath) / name
                if path not in placed:
                    path.unlink()
    files.atomic_write_text(split_dir / "transcripts.txt", "".join(lines))
    return n_empty


# --------------------------------------------------------------------------------------------
# 2. Filter
# --------------------------------------------------------------------------------------------
@dataclass
class FilterResult:
    """Which utterances pass the WER filter at ``max_wer`` (λ).

    ``kept`` and ``dropped`` are ids in file order; ``reasons`` maps each dropped id to why
    (``"wer >= λ"``, ``"empty reference"``, ``"empty pseudo-label"``, ``"cut at
    max_new_tokens"``, ``"no reference"``);
    ``n_unscored`` counts kept utterances that had no reference to compare with.
    """

    max_wer: float | None
    kept: list[str]
    dropped: list[str]
    reasons: dict[str, str] = field(default_factory=dict)
    n_unscored: int = 0

    @property
    def n_total(self) -> int:
        return len(self.kept) + len(self.dropped)

    def counts(self) -> dict[str, int]:
        """``{"total", "kept", "dropped", "kept without reference", <each drop reason>}``."""
        out = {"total": self.n_total, "kept": len(self.kept), "dropped": len(self.dropped),
               "kept without reference": self.n_unscored}
        for reason in self.reasons.values():
            out[reason] = out.get(reason, 0) + 1
        return out

    def report(self) -> str:
        lam = "no filter" if self.max_wer is None else f"λ = {self.max_wer:g} (WER < {100 * self.max_wer:g} %)"
        share = f" ({100 * len(self.kept) / self.n_total:.0f} %)" if self.n_total else ""
        text = (f"WER filter {lam}, normaliser {decode.NORMALIZER}: kept {len(self.kept)} of "
                f"{self.n_total}{share}, dropped {len(self.dropped)}")
        by_reason = {k: v for k, v in self.counts().items()
                     if k not in ("total", "kept", "dropped", "kept without reference")}
        if by_reason:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in by_reason.items()) + ")"
        if self.n_unscored:
            text += f"; {self.n_unscored} kept without a reference (not filterable)"
        return text


def filter_pseudo_labels(records: str | os.PathLike | Iterable[dict[str, Any]],
                         max_wer: float | None = 0.10, *, keep_unscored: bool = True,
                         drop_cut: bool = True) -> FilterResult:
    """distil-whisper's WER filter over pseudo-labels (a pure function of the records).

    ``records``: a ``pseudo_labels.jsonl`` path (or its folder) or the records themselves.
    Kept when ``wer < max_wer`` (strict, as distil-whisper's ``wer < wer_threshold``);
    ``max_wer=None`` is no filter at all: every non-empty pseudo-label is kept. An empty
    pseudo-label is always dropped; an empty reference (after normalisation) is dropped, its
    WER being unknown; a record without any reference is kept when ``keep_unscored``
    (audio-only data), else dropped. ``drop_cut`` (when filtering): also drop a pseudo-label
    the decoder did not finish (``"finished": false``: it ran into ``max_new_tokens``), almost
    always a repetition loop and the only guard against loops where there is no reference to
    compare with (their ``avg_logprob`` is often *high*: on the embedded corpus whisper-base's
    two loops scored -0.10 and -0.13, while its mean over the other clips was about -0.8;
    among finished clips, avg_logprob and WER have a rank correlation of -0.81).
    """
    if isinstance(records, (str, os.PathLike)):
        path = Path(records)
        records = read_pseudo_labels(path / JSONL_NAME if path.is_dir() else path)
    kept: list[str] = []
    dropped: list[str] = []
    reasons: dict[str, str] = {}
    n_unscored = 0

    def drop(uid: str, why: str) -> None:
        dropped.append(uid)
        reasons[uid] = why

    for r in records:
        uid = r["id"]
        if not usable_transcript(r.get("text")):
            drop(uid, "empty pseudo-label")
        elif drop_cut and max_wer is not None and r.get("finished") is False:
            drop(uid, "cut at max_new_tokens")
        elif r.get("reference") is None:
            if keep_unscored:
                kept.append(uid)
                n_unscored += 1
            else:
                drop(uid, "no reference")
        elif max_wer is None:
            kept.append(uid)
        elif r.get("wer") is None:
            drop(uid, "empty reference")
        elif r["wer"] < max_wer:
            kept.append(uid)
        else:
            drop(uid, "wer >= λ")
    return FilterResult(max_wer, kept, dropped, reasons, n_unscored)


def wer_sweep(records: str | os.PathLike | Iterable[dict[str, Any]],
              thresholds: Sequence[float] = (0.1, 0.2, 0.3)) -> list[dict[str, Any]]:
    """Kept/dropped counts (and kept hours) at each λ, for choosing one: one dict per λ."""
    if isinstance(records, (str, os.PathLike)):
        path = Path(records)
        records = read_pseudo_labels(path / JSONL_NAME if path.is_dir() else path)
    records = list(records)
    seconds = {r["id"]: float(r.get("duration") or 0.0) for r in records}
    rows = []
    for lam in thresholds:
        result = filter_pseudo_labels(records, lam)
        rows.append(dict(max_wer=lam, kept=len(result.kept), dropped=len(result.dropped),
                         kept_hours=sum(seconds[i] for i in result.kept) / 3600.0))
    return rows


# --------------------------------------------------------------------------------------------
# 3. Training folder
# --------------------------------------------------------------------------------------------
@dataclass
class TrainingFolder:
    """What `training_folder` wrote: the folder, the filter's verdict, how many lines per target."""

    path: Path
    split: str
    targets: str
    filter: FilterResult
    n_pseudo: int
    n_references: int

    def report(self) -> str:
        return (f"{self.path}/{self.split}: targets {self.targets!r}, {self.n_pseudo} pseudo-labels "
                f"+ {self.n_references} references\n  {self.filter.report()}\n"
                f"  train on it with --set data_root={self.path} --set train_split={self.split}")


def _link_other_splits(data_dir: Path, out: Path, split: str) -> None:
    """Link every split folder of ``data_dir`` but ``split`` into ``out`` (dev and test stay the
    originals, with their human references) and copy ``speakers.tsv``."""
    for other in sorted(p for p in data_dir.iterdir() if p.is_dir() and p.name != split):
        if not (other / "transcripts.txt").is_file():
            continue
        target = out / other.name
        if target.is_symlink():
            target.unlink()
        if not target.exists():
            target.symlink_to(other.absolute(), target_is_directory=True)
    if (data_dir / "speakers.tsv").is_file():
        shutil.copy2(data_dir / "speakers.tsv", out / "speakers.tsv")


def subset_folder(data_dir: str | os.PathLike, split: str, ids: Iterable[str], out: str | os.PathLike, *,
                  language: str | None = None, link: str = "symlink") -> int:
    """An MLS-shaped folder whose ``<split>`` holds only the utterances ``ids`` of
    ``<data_dir>/<split>``, with their references; the other splits are linked unchanged.
    Returns how many utterances it lists. Use it to keep two uses of one split apart, e.g. adapt
    a teacher on one half of the train split and pseudo-label the other half, so the labelling
    teacher has never seen the clips it labels. An id that is not in the split is an error."""

    data_dir, out = Path(data_dir), Path(out)
    if out.resolve() == data_dir.resolve():
        raise ValueError(f"{out}: the subset folder must not be the source data folder")
    wanted = list(dict.fromkeys(ids))
    scan = scan_mls(data_dir, split, min_duration=0.0, max_duration=MAX_SECONDS, language=language)
    by_id = {u.id: u for u in scan.utterances}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise ValueError(f"{data_dir}/{split}: no utterance {missing[:5]} ({len(missing)} missing; "
                         f"scan: {scan.report()})")
    records = [{"id": i, "reference": by_id[i].text, "audio": str(by_id[i].audio)} for i in wanted]
    out.mkdir(parents=True, exist_ok=True)
    write_split(records, out, split, targets="references", link=link)
    _link_other_splits(data_dir, out, split)
    return len(records)


def training_folder(data_dir: str | os.PathLike, pseudo_dir: str | os.PathLike, split: str = "train",
                    *, targets: str = "pseudo", max_wer: float | None = 0.10,
                    out: str | os.PathLike, keep_unscored: bool = True,
                    link: str = "symlink") -> TrainingFolder:
    """Build an MLS-shaped training folder from pseudo-labels (see the module docstring).

    ``<out>/<split>/`` holds the chosen targets (``"pseudo"``, ``"references"`` or ``"both"``)
    for the utterances of ``<pseudo_dir>/pseudo_labels.jsonl``; every other split folder of
    ``data_dir`` (dev, test) is linked unchanged, and ``speakers.tsv`` copied, so dev WER is
    still measured against real references. Point the trainer at it with
    ``data_root=<out>, train_split=<split>`` (``python -m kdlib train --set data_root=...``).
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    data_dir, out = Path(data_dir), Path(out)
    if out.resolve() == data_dir.resolve():
        raise ValueError(f"{out}: the training folder must not be the source data folder")
    records = read_pseudo_labels(Path(pseudo_dir) / JSONL_NAME)
    if not records:
        raise FileNotFoundError(f"{Path(pseudo_dir) / JSONL_NAME}: no pseudo-labels; run "
                                "python -m kdlib pseudo-label first")
    verdict = filter_pseudo_labels(records, max_wer, keep_unscored=keep_unscored)
    kept = set(verdict.kept)
    chosen: list[dict[str, Any]] = []
    for r in records:
        if targets == "pseudo" and r["id"] in kept:
            chosen.append(dict(r, target="pseudo"))
        elif targets == "references" and r["id"] in kept and r.get("reference"):
            chosen.append(dict(r, target="references"))
        elif targets == "both":
            if r["id"] in kept:
                chosen.append(dict(r, target="pseudo"))
            elif r.get("reference"):
                chosen.append(dict(r, target="references"))
    if targets == "references" and not any(r.get("reference") for r in records):
        raise ValueError(f"{pseudo_dir}: no references (audio-only data); targets='references' "
                         "has nothing to train on")
    out.mkdir(parents=True, exist_ok=True)
    write_split(chosen, out, split, targets=targets, link=link)
    _link_other_splits(data_dir, out, split)
    n_pseudo = sum(1 for r in chosen if r["target"] == "pseudo" and usable_transcript(r.get("text")))
    n_refs = sum(1 for r in chosen if r["target"] == "references")
    summary = dict(data_dir=str(data_dir), pseudo_dir=str(pseudo_dir), split=split,
                   targets=targets, max_wer=max_wer, keep_unscored=keep_unscored,
                   normalizer=decode.NORMALIZER, counts=verdict.counts(),
                   n_pseudo=n_pseudo, n_references=n_refs)
    files.atomic_write_text(out / "training_folder.json",
                               json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return TrainingFolder(out, split, targets, verdict, n_pseudo, n_refs)
