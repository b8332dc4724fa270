"""Multilingual LibriSpeech (MLS) folders -> audio-text pairs -> Whisper batches.

The five stages, each a plain object you can look at:

1. **scan** (`scan_mls`, `scan_many`): read ``<root>/<split>/transcripts.txt`` (lines
   ``<speaker>_<book>_<utt>\\t<text>``), find ``<split>/audio/<speaker>/<book>/<id>.opus`` (or
   ``.flac`` / ``.wav``), read each clip's duration from its header. Bad input is skipped and
   counted by reason (`ScanResult.skipped`, `ScanResult.report()`), never raised halfway.
2. **pairs**: a list of `Utterance` records (id, speaker, book, audio path, text, duration in
   seconds, Whisper language code).
3. **Dataset** (`MLSDataset`): decode (soundfile), mix to mono, resample to 16 kHz (torchaudio),
   log-mel features ``(n_mels, 3000)`` from a transformers ``WhisperFeatureExtractor`` and token
   labels ``<|lang|><|task|><|notimestamps|> text <|endoftext|>`` from a Whisper tokenizer.
4. **DataLoader + collate** (`collate`, `WhisperCollator`): this is where padding happens:
   labels are padded with -100, and masks say which label positions and which feature frames are
   real. `LengthGroupedBatchSampler` puts clips of similar length together to cut that padding.
5. **batches**: dicts of tensors ready for ``WhisperForConditionalGeneration``.

Also here: `embedded_corpus` (the tiny espeak-ng corpus shipped in the package), the MLS language
table, and `extract_mls_archive` (stream chosen languages/splits out of an MLS ``.tar.gz``).

This module never imports `kdlib.models`: the feature extractor and tokenizer are arguments.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import DataLoader, Dataset, Sampler

from kdlib import cache_dir
from kdlib.config import TrainConfig
from kdlib.files import atomic_write_text
from kdlib.distributed import Dist, shard
from kdlib.progress import progress_bar
from kdlib.text import usable_transcript


# --------------------------------------------------------------------------------------------
# Constants: Whisper's input geometry and the MLS languages
# --------------------------------------------------------------------------------------------
SAMPLE_RATE = 16_000          # Hz, what Whisper expects
HOP_LENGTH = 160              # samples per log-mel frame (10 ms)
N_FRAMES = 3_000              # log-mel frames in Whisper's fixed 30 s window
MAX_SECONDS = 30.0            # Whisper's window; longer clips are dropped by the scan
AUDIO_EXTENSIONS = (".opus", ".flac", ".wav")   # in order of preference when an id has several

#: MLS folder language name -> Whisper language code.
MLS_LANGUAGES: dict[str, str] = {
    "english": "en", "german": "de", "dutch": "nl", "french": "fr",
    "spanish": "es", "italian": "it", "portuguese": "pt", "polish": "pl",
}
#: Whisper language code -> MLS folder language name.
MLS_NAMES: dict[str, str] = {code: name for name, code in MLS_LANGUAGES.items()}
#: Hours of training audio per MLS language (MLS paper, Pratap et al. 2020, table 1).
MLS_TRAIN_HOURS: dict[str, float] = {
    "english": 44_659.74, "german": 1_966.51, "dutch": 1_554.24, "french": 1_076.58,
    "spanish": 917.68, "italian": 247.38, "portuguese": 160.96, "polish": 103.65,
}

MLS_ID = re.compile(r"^([^_\s]+)_([^_\s]+)_([^_\s]+)$")  # <speaker>_<book>_<utterance>


def parse_mls_id(utt_id: str) -> tuple[str, str, str] | None:
    """``(speaker, book, utterance)`` of an MLS utterance id (``10087_10388_000000``), else None.
    The one reader of MLS ids in kdlib: scanning, per-speaker WER and pseudo-label folders."""
    m = MLS_ID.match(utt_id)
    return m.groups() if m else None
_ARCHIVE_ROOT_RE = re.compile(r"^mls_(?P<lang>[a-z]+?)(?:_opus|_flac)?$")


def language_code(language: str) -> str:
    """Whisper code for an MLS name or a code: ``"italian"`` -> ``"it"``, ``"it"`` -> ``"it"``."""
    key = language.strip().lower()
    if key in MLS_LANGUAGES:
        return MLS_LANGUAGES[key]
    if key in MLS_NAMES:
        return key
    raise ValueError(f"unknown MLS language {language!r}; expected one of "
                     f"{sorted(MLS_LANGUAGES)} or {sorted(MLS_NAMES)}")


def mls_name(language: str) -> str:
    """MLS folder name for a code or a name: ``"it"`` -> ``"italian"``."""
    return MLS_NAMES[language_code(language)]


def infer_language(root: str | os.PathLike) -> str | None:
    """Whisper code guessed from a folder name such as ``italian`` or ``mls_italian_opus``."""
    for part in reversed(Path(root).resolve().parts):
        for name, code in MLS_LANGUAGES.items():
            if re.search(rf"(^|[_\-]){name}($|[_\-])", part.lower()):
                return code
    return None


def embedded_corpus(language: str = "it") -> Path:
    """Path of the embedded corpus's language folder (MLS layout, holds ``train/ dev/ test/``).

    ``language`` is a code or an MLS name: ``embedded_corpus("it") == embedded_corpus("italian")``.
    The corpus is synthesised by ``scripts/make_corpus.py`` (espeak-ng, several voices and speeds,
    Ogg/Opus at 16 kHz) and shipped inside the package.
    """
    base = Path(__file__).resolve().parent / "corpus"
    path = base / mls_name(language)
    if not path.is_dir():
        have = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise FileNotFoundError(f"no embedded corpus for {language!r} at {path}; available: {have}")
    return path


def read_speakers(root: str | os.PathLike) -> dict[str, str]:
    """``speakers.tsv`` of a corpus language folder as ``{speaker id: voice}`` ({} if absent)."""
    path = Path(root) / "speakers.tsv"
    if not path.is_file():
        return {}
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return {row[0]: row[1] for row in rows if len(row) >= 2}


# --------------------------------------------------------------------------------------------
# Stage 1-2: scan a folder into audio-text pairs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Utterance:
    """One audio-text pair. ``duration`` in seconds, ``language`` a Whisper code (``"it"``)."""

    id: str
    speaker: str
    book: str
    audio: Path
    text: str
    duration: float
    language: str


#: Skip reasons, in the order the report lists them.
SKIP_REASONS = (
    "malformed line", "undecodable text", "empty text", "duplicate id", "missing audio", "audio without transcript",
    "corrupt audio", "too short", "too long", "longer than window",
)


@dataclass
class ScanResult:
    """What a scan kept and what it skipped.

    ``skipped`` maps a reason (one of `SKIP_REASONS`) to ``[(path, message), ...]``. An audio file
    with no transcript line is counted under "audio without transcript" but is not an utterance,
    so it is not part of ``n_total``.
    """

    utterances: list[Utterance]
    skipped: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    @property
    def n_kept(self) -> int:
        return len(self.utterances)

    @property
    def n_skipped(self) -> int:
        """Transcript lines that did not become utterances (orphan audio files not included)."""
        return sum(len(v) for k, v in self.skipped.items() if k != "audio without transcript")

    @property
    def n_total(self) -> int:
        return self.n_kept + self.n_skipped

    @property
    def hours(self) -> float:
        return sum(u.duration for u in self.utterances) / 3600.0

    def counts(self) -> dict[str, int]:
        """``{reason: number skipped}`` for the reasons that occurred."""
        return {k: len(v) for k, v in self.skipped.items() if v}

    def report(self, examples: int = 3) -> str:
        """A readable summary, e.g. ``kept 95 of 100 (0.10 h); skipped 5: corrupt audio 5``."""
        counts = self.counts()
        head = f"kept {self.n_kept} of {self.n_total} ({self.hours:.2f} h)"
        if self.sources:
            head = f"{', '.join(self.sources)}: " + head
        if not counts:
            return head + "; skipped none"
        parts = ", ".join(f"{reason} {n}" for reason, n in counts.items())
        lines = [f"{head}; skipped {self.n_skipped}: {parts}"]
        for reason, items in self.skipped.items():
            for _, message in items[:examples]:
                lines.append(f"  [{reason}] {message}")
            if len(items) > examples:
                lines.append(f"  [{reason}] ... and {len(items) - examples} more")
        return "\n".join(lines)

    def __add__(self, other: "ScanResult") -> "ScanResult":
        skipped = {k: list(v) for k, v in self.skipped.items()}
        for k, v in other.skipped.items():
            skipped.setdefault(k, []).extend(v)
        return ScanResult(self.utterances + other.utterances, skipped, self.sources + other.sources)


def _index_audio(audio_dir: Path) -> dict[str, Path]:
    """``{utterance id: path}`` for every audio file below ``audio_dir`` (os.walk: fast on 100k files)."""
    found: dict[str, Path] = {}
    rank = {ext: i for i, ext in enumerate(AUDIO_EXTENSIONS)}
    for dirpath, _, filenames in os.walk(audio_dir):
        for name in filenames:
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext not in rank:
                continue
            old = found.get(stem)
            if old is None or rank[ext] < rank[old.suffix.lower()]:
                found[stem] = Path(dirpath) / name
    return found


def scan_mls(root: str | os.PathLike, split: str, *, min_duration: float = 1.0,
             max_duration: float = MAX_SECONDS, language: str | None = None,
             progress: bool | None = None, window_seconds: float | None = None) -> ScanResult:
    """Scan one split of an MLS language folder into `Utterance` records.

    Args:
        root: the language folder, e.g. ``.../mls_italian_opus`` or ``embedded_corpus("it")``.
        split: ``"train"``, ``"dev"`` or ``"test"`` (any sub-folder name works).
        min_duration, max_duration: keep clips with ``min <= seconds <= max``. Whisper sees at
            most 30 s, so a longer clip would be cut and no longer match its transcript.
        language: Whisper code or MLS name; ``None`` guesses it from the folder name.
        progress: show a tqdm bar while reading audio headers; ``None``: only for more than
            2,000 files (a real MLS split), so small scans stay quiet.
        window_seconds: the encoder window of the model that will read the clips (a student
            with a shorter window, `kdlib.models.set_encoder_window`); a longer clip is skipped
            as "longer than window" and counted, because its features would be cut.

    Returns a `ScanResult`. Every problem with one utterance is a counted skip with a message
    that names the file and the problem; only a missing split folder or ``transcripts.txt``
    raises (`FileNotFoundError`), because then nothing can be scanned at all.
    """
    if max_duration > MAX_SECONDS:
        warnings.warn(f"max_duration {max_duration} s > {MAX_SECONDS} s: Whisper's feature extractor cuts "
                      "longer clips, so their features will no longer match their transcripts", stacklevel=2)
    root = Path(root)
    split_dir = root / split
    transcripts = split_dir / "transcripts.txt"
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    if not transcripts.is_file():
        raise FileNotFoundError(f"transcripts file not found: {transcripts}")
    if language is None:
        code = infer_language(root)
        if code is None:
            raise ValueError(f"cannot tell the language of {root} from its name; pass language='it' (or similar)")
    else:
        code = language_code(language)

    skipped: dict[str, list[tuple[Path, str]]] = {}

    def skip(reason: str, path: Path, message: str) -> None:
        skipped.setdefault(reason, []).append((path, message))

    audio = _index_audio(split_dir / "audio")
    rel = f"{split}/transcripts.txt"
    pairs: list[tuple[str, str, str, Path, str]] = []   # id, speaker, book, audio path, text
    seen: set[str] = set()
    # Bytes, decoded line by line: a line that is not UTF-8 is a counted skip naming its line, never
    # text with U+FFFD in it to train on. A byte-order mark (some editors add one) is dropped.
    with open(transcripts, "rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            if lineno == 1 and raw_bytes.startswith(b"\xef\xbb\xbf"):
                raw_bytes = raw_bytes[3:]
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                uid = raw_bytes.partition(b"\t")[0].decode("ascii", "replace").strip()
                audio.pop(uid, None)  # its audio is accounted for here, not as an orphan
                skip("undecodable text", transcripts,
                     f"{rel} line {lineno}: not UTF-8 (byte {err.start}: {raw_bytes[err.start:err.start + 1]!r}) "
                     f"in {raw_bytes[:60]!r}")
                continue
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            uid, tab, text = line.partition("\t")
            uid, text = uid.strip(), " ".join(text.split())
            parts = parse_mls_id(uid)
            if not tab or parts is None:
                skip("malformed line", transcripts,
                     f"{rel} line {lineno}: expected '<speaker>_<book>_<utt><TAB><text>', got {line[:60]!r}")
                continue
            if uid in seen:
                skip("duplicate id", transcripts, f"{rel} line {lineno}: id {uid} already seen")
                continue
            seen.add(uid)
            speaker, book, _ = parts
            path = audio.pop(uid, None)   # popped first: its audio is not an orphan either way
            if not usable_transcript(text):  # the rule evaluation scores by (kdlib.text)
                skip("empty text", transcripts, f"{rel} line {lineno}: no words in the transcript of {uid}"
                     + (f" ({text!r} is empty after normalisation)" if text else ""))
                continue
            if path is None:
                expected = f"audio/{speaker}/{book}/{uid}{AUDIO_EXTENSIONS[0]}"
                skip("missing audio", split_dir / expected, f"{rel} line {lineno}: no audio at {expected}")
                continue
            pairs.append((uid, speaker, book, path, text))
    for uid, path in sorted(audio.items()):
        skip("audio without transcript", path,
             f"{path.relative_to(root)}: audio file with no line in {rel}")

    utterances: list[Utterance] = []
    headers = HeaderCache(split_dir)
    iterator: Iterable = pairs
    if progress or (progress is None and len(pairs) > 2_000 and headers.misses_expected(pairs)):
        iterator = progress_bar(pairs, desc=f"scan {root.name}/{split}", unit="file")
    for uid, speaker, book, path, text in iterator:
        where = path.relative_to(root)
        try:
            frames, rate = headers.frames_and_rate(path)
        except Exception as err:   # soundfile raises several types for broken files
            skip("corrupt audio", path, f"{where}: cannot read header ({_first_line(err)})")
            continue
        if frames <= 0 or rate <= 0:
            skip("corrupt audio", path, f"{where}: no samples (frames={frames}, rate={rate})")
            continue
        seconds = frames / rate
        if seconds < min_duration:
            skip("too short", path, f"{where}: {seconds:.2f} s < min_duration {min_duration} s")
            continue
        if seconds > max_duration:
            skip("too long", path, f"{where}: {seconds:.2f} s > max_duration {max_duration} s")
            continue
        if window_seconds is not None and seconds > window_seconds:
            skip("longer than window", path, f"{where}: {seconds:.2f} s > the student's encoder window of "
                 f"{window_seconds:g} s (a longer window, or merging frames, keeps it)")
            continue
        utterances.append(Utterance(uid, speaker, book, path, text, seconds, code))

    headers.save()
    ordered = {k: skipped[k] for k in SKIP_REASONS if k in skipped}
    return ScanResult(utterances, ordered, [f"{root.name}/{split}"])


class HeaderCache:
    """Audio header facts (frames, sample rate) of one split folder, kept across scans in
    ``kdlib.cache_dir()/scans/<hash of the folder's absolute path>.json`` and keyed by each file's
    size and modification time: a rescan of MLS Italian train (60k files) then stats the files
    instead of opening 60k OPUS headers, and a file that changed is read again. Written
    atomically (temporary file, then rename), so ranks that scan at once never see half a file;
    an unreadable cache is ignored. Broken files are never cached (their error is reported anew)."""

    def __init__(self, split_dir: Path):
        import hashlib

        key = hashlib.sha256(str(Path(split_dir).resolve()).encode()).hexdigest()[:20]
        self.path = cache_dir() / "scans" / f"{key}.json"
        self.entries: dict[str, list[int]] = {}
        self.changed = False
        try:
            import json

            self.entries = json.loads(self.path.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            self.entries = {}

    def misses_expected(self, pairs) -> bool:
        return len(self.entries) < len(pairs) // 2  # a progress bar only when most headers are unknown

    def frames_and_rate(self, path: Path) -> tuple[int, int]:
        stat = os.stat(path)
        name = str(path)
        hit = self.entries.get(name)
        if hit is not None and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
            return hit[2], hit[3]
        info = sf.info(name)
        self.entries[name] = [stat.st_size, stat.st_mtime_ns, int(info.frames), int(info.samplerate)]
        self.changed = True
        return info.frames, info.samplerate

    def save(self) -> None:
        if not self.changed:
            return
        import json

        try:
            atomic_write_text(self.path, json.dumps({"files": self.entries}))
        except OSError:  # a read-only cache folder costs speed, never the scan
            pass


def scan_many(specs: Iterable[tuple[str | os.PathLike, str, str | None]], **kwargs: Any) -> ScanResult:
    """Scan several ``(root, split, language)`` triples and concatenate them.

    Each utterance keeps its own language code, so `MLSDataset` gives each sample its own
    language token: ``scan_many([(it_root, "train", "it"), (es_root, "train", "es")])``.
    ``kwargs`` go to `scan_mls` (``min_duration``, ``max_duration``, ``progress``).
    """
    result = ScanResult([], {}, [])
    for root, split, language in specs:
        result = result + scan_mls(root, split, language=language, **kwargs)
    return result


def _first_line(err: BaseException) -> str:
    """First line of an error, without soundfile's "Error opening '<path>': " (we name the file)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return re.sub(r"^Error opening .*?': ", "", line)


# --------------------------------------------------------------------------------------------
# Audio: decode, mono, resample
# --------------------------------------------------------------------------------------------
class NoUsableData(ValueError):
    """A split that a run needs holds no usable clip (the scan's report says why)."""


class AudioError(Exception):
    """An audio file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


_RESAMPLERS: dict[tuple[int, int], torchaudio.transforms.Resample] = {}


def resampler(orig_sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    """A cached ``torchaudio.transforms.Resample`` (its sinc kernel is built once per rate pair)."""
    key = (int(orig_sr), int(target_sr))
    if key not in _RESAMPLERS:
        _RESAMPLERS[key] = torchaudio.transforms.Resample(*key)
    return _RESAMPLERS[key]


def load_audio(path: str | os.PathLike, target_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode an OPUS/FLAC/WAV file to a mono float32 waveform at ``target_sr`` Hz, shape ``(samples,)``.

    Channels are averaged; other sample rates are resampled with a cached torchaudio resampler.
    Raises `AudioError` for a file that cannot be decoded, has no samples, or holds NaN/inf.
    """
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)   # (samples, channels)
    except Exception as err:
        raise AudioError(path, f"cannot decode audio ({_first_line(err)})") from err
    if data.shape[0] == 0:
        raise AudioError(path, "audio has no samples")
    wave = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
    if not torch.isfinite(wave).all():
        raise AudioError(path, "audio contains NaN or infinite samples")
    if rate != target_sr:
        with torch.no_grad():
            wave = resampler(rate, target_sr)(wave)
    return wave.contiguous()


def num_frames(samples: int, hop_length: int = HOP_LENGTH, max_frames: int = N_FRAMES) -> int:
    """Log-mel frames that hold real audio: ``ceil(samples / hop_length)``, at most ``max_frames``."""
    return min(math.ceil(samples / hop_length), max_frames)


# --------------------------------------------------------------------------------------------
# Stage 3: Dataset
# --------------------------------------------------------------------------------------------
class MLSDataset(Dataset):
    """Utterances -> ``{"input_features", "labels", ...}`` for Whisper.

    Each item:
        input_features: ``(n_mels, 3000)`` float32 log-mel (80 or 128 mels, from the extractor).
        labels: ``(n_tokens,)`` int64, ``<|lang|><|task|><|notimestamps|> text <|endoftext|>``.
        num_frames: int, log-mel frames holding real audio (``ceil(samples / 160)``, <= 3000).
        duration: float seconds; id, speaker, language (code), text: str.

    Labels and ``<|startoftranscript|>``: ``WhisperForConditionalGeneration`` builds its decoder
    inputs by shifting labels right and putting ``decoder_start_token_id``
    (``<|startoftranscript|>``) in front (``shift_tokens_right``). So the labels here leave that
    token out: decoder input ``<|sot|><|it|><|transcribe|><|notimestamps|> ciao`` predicts label
    ``<|it|><|transcribe|><|notimestamps|> ciao <|endoftext|>``, the same convention as
    distil-whisper's and the transformers fine-tuning collators (which strip a leading sot).
    The language token is chosen per sample, so mixed-language batches are right.

    ``leading_space=True`` tokenises ``" " + text``: Whisper itself emits text tokens that start
    with a space, so the labels match what the teacher predicts.

    ``threads=1``: decode, resample and featurise one item with a single torch thread (what a
    DataLoader worker does anyway). These are small operations; measured on the 2-core CPU with
    other jobs running, two intra-op threads made the log-mel step 3-5x *slower* than one
    (``benchmarks/data_throughput.py``). ``None`` leaves torch's thread setting alone.

    ``safe=True``: a file that fails to decode (it passed the scan but broke later, e.g. a
    truncated download) gives ``None`` with a warning instead of raising; `collate` drops ``None``
    items and counts them in ``batch["n_dropped"]``, so a long run does not stop halfway.

    ``teacher_feature_extractor``: a second extractor whose log-mels go to the teacher, for a
    pair that disagrees on mel bins (whisper-large-v3 takes 128, whisper-small 80). Each item
    then also has ``teacher_input_features`` ``(n_mels_teacher, 3000)``, from the same waveform.
    """

    def __init__(self, utterances: Sequence[Utterance], feature_extractor: Any, tokenizer: Any, *,
                 task: str = "transcribe", safe: bool = False, leading_space: bool = True,
                 threads: int | None = 1, teacher_feature_extractor: Any = None):
        if task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
        self.utterances = list(utterances)
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.task = task
        self.safe = safe
        self.leading_space = leading_space
        self.threads = threads
        self.teacher_feature_extractor = teacher_feature_extractor
        self.sampling_rate = int(getattr(feature_extractor, "sampling_rate", SAMPLE_RATE))
        self.hop_length = int(getattr(feature_extractor, "hop_length", HOP_LENGTH))
        self.max_frames = int(getattr(feature_extractor, "nb_max_frames", N_FRAMES))
        self.eot_id = self._token_id("<|endoftext|>")
        self._prefix: dict[str, list[int]] = {}
        for code in sorted({u.language for u in self.utterances}):
            self.prefix_ids(code)   # fail now, not in a worker, if the tokenizer lacks a token

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk and token != self.tokenizer.unk_token):
            raise ValueError(f"tokenizer has no token {token}")
        return int(tid)

    def prefix_ids(self, language: str) -> list[int]:
        """Label prefix for one language: ids of ``<|lang|><|task|><|notimestamps|>`` (no sot)."""
        code = language_code(language)
        if code not in self._prefix:
            self._prefix[code] = [self._token_id(f"<|{code}|>"), self._token_id(f"<|{self.task}|>"),
                                  self._token_id("<|notimestamps|>")]
        return self._prefix[code]

    def labels_for(self, text: str, language: str) -> list[int]:
        """Token ids of one label sequence (see the class docstring)."""
        body = (" " + text.strip()) if self.leading_space else text.strip()
        ids = self.tokenizer(body, add_special_tokens=False).input_ids
        return self.prefix_ids(language) + list(ids) + [self.eot_id]

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if self.threads is None or torch.get_num_threads() == self.threads:
            return self._item(index)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)   # cheap (microseconds); restored for the caller
        try:
            return self._item(index)
        finally:
            torch.set_num_threads(before)

    def _item(self, index: int) -> dict[str, Any] | None:
        u = self.utterances[index]
        try:
            wave = load_audio(u.audio, self.sampling_rate)   # (samples,)
        except AudioError as err:
            if not self.safe:
                raise
            warnings.warn(f"skipping {err}", RuntimeWarning, stacklevel=2)
            return None
        features = self.feature_extractor(wave.numpy(), sampling_rate=self.sampling_rate,
                                          return_tensors="pt").input_features[0]   # (n_mels, 3000)
        item = {
            "input_features": features.float(),
            "labels": torch.tensor(self.labels_for(u.text, u.language), dtype=torch.long),
            "num_frames": num_frames(wave.shape[0], self.hop_length, self.max_frames),
            "duration": wave.shape[0] / self.sampling_rate,
            "id": u.id, "speaker": u.speaker, "language": u.language, "text": u.text,
        }
        if self.teacher_feature_extractor is not None:
            item["teacher_input_features"] = self.teacher_feature_extractor(
                wave.numpy(), sampling_rate=self.sampling_rate, return_tensors="pt"
            ).input_features[0].float()
        return item


# --------------------------------------------------------------------------------------------
# Stage 4: collate (padding happens here) and the length-grouped sampler
# --------------------------------------------------------------------------------------------
def collate(batch: Sequence[dict[str, Any] | None], label_pad_id: int = -100) -> dict[str, Any] | None:
    """Stack a list of `MLSDataset` items into a batch; ``None`` items are dropped and counted.

    Returns (B = kept items, L = longest label sequence, F = 3000 frames):
        input_features: ``(B, n_mels, F)`` float32; Whisper wants every clip padded to 30 s,
            which the feature extractor has already done.
        labels: ``(B, L)`` int64, padded with ``label_pad_id`` (-100: ignored by cross-entropy).
        decoder_attention_mask: ``(B, L)`` int64, 1 on real label positions. After the model's
            shift-right, decoder input position t is real exactly when label position t is.
        feature_mask: ``(B, F)`` bool, True on log-mel frames that hold audio (``num_frames``).
        num_frames: ``(B,)`` int64; durations: ``(B,)`` float32 seconds.
        ids, speakers, languages, texts: lists of str; n_dropped: int (``None`` items removed).
        teacher_input_features: ``(B, n_mels_teacher, F)``, only when the items carry them.
    Returns ``None`` when every item was ``None``; a training loop should skip that batch.
    """
    items = [b for b in batch if b is not None]
    n_dropped = len(batch) - len(items)
    if not items:
        return None
    features = torch.stack([b["input_features"] for b in items])            # (B, n_mels, F)
    lengths = torch.tensor([len(b["labels"]) for b in items])
    labels = torch.full((len(items), int(lengths.max())), label_pad_id, dtype=torch.long)
    for i, b in enumerate(items):
        labels[i, : len(b["labels"])] = b["labels"]
    decoder_mask = (torch.arange(labels.shape[1])[None, :] < lengths[:, None]).long()   # (B, L)
    frames = torch.tensor([b["num_frames"] for b in items], dtype=torch.long)
    feature_mask = torch.arange(features.shape[-1])[None, :] < frames[:, None]          # (B, F)
    out = {
        "input_features": features,
        "labels": labels,
        "decoder_attention_mask": decoder_mask,
        "feature_mask": feature_mask,
        "num_frames": frames,
        "durations": torch.tensor([b["duration"] for b in items], dtype=torch.float32),
        "ids": [b["id"] for b in items],
        "speakers": [b.get("speaker", "") for b in items],
        "languages": [b["language"] for b in items],
        "texts": [b.get("text", "") for b in items],
        "n_dropped": n_dropped,
    }
    if "teacher_input_features" in items[0]:
        out["teacher_input_features"] = torch.stack([b["teacher_input_features"] for b in items])
    return out


class WhisperCollator:
    """``collate`` as a picklable object for ``DataLoader(collate_fn=...)``.

    ``self.n_dropped`` counts dropped items when collation runs in the main process
    (``num_workers=0``); with workers, each batch's ``n_dropped`` field is the reliable count.
    """

    def __init__(self, label_pad_id: int = -100):
        self.label_pad_id = label_pad_id
        self.n_dropped = 0

    def __call__(self, batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        out = collate(batch, self.label_pad_id)
        self.n_dropped += len(batch) - (0 if out is None else len(out["ids"]))
        return out


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar-length items, so less of each batch is padding.

    The megabatch recipe (as in transformers' ``LengthGroupedSampler``): shuffle all indices,
    cut them into megabatches of ``bucket_factor * batch_size``, sort each megabatch by length
    (longest first), cut it into batches, then shuffle the order of all batches. Small
    ``bucket_factor`` keeps more randomness; large cuts more padding. Each epoch yields every
    index exactly once; the order depends only on ``seed`` and the epoch (`set_epoch`).
    ``shuffle=False`` sorts everything by length (evaluation). ``longest_first`` moves the batch
    with the longest item to the front, so a batch size too big for the GPU fails at the first
    step rather than hours into the run (as transformers' sampler does).

    ``lengths``: one number per item in any unit (seconds, frames, tokens).
    """

    def __init__(self, lengths: Sequence[float], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 bucket_factor: int = 50, drop_last: bool = False, longest_first: bool = True):
        if batch_size < 1 or bucket_factor < 1:
            raise ValueError("batch_size and bucket_factor must be >= 1")
        self.lengths = [float(x) for x in lengths]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.bucket_factor, self.drop_last = bucket_factor, drop_last
        self.longest_first = longest_first
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches as lists of indices."""
        n, bs = len(self.lengths), self.batch_size
        lengths = self.lengths
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: -lengths[i])
            batches = [order[i:i + bs] for i in range(0, n, bs)]
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(n, generator=g).tolist()
            mega = bs * self.bucket_factor
            batches = []
            for start in range(0, n, mega):
                chunk = sorted(perm[start:start + mega], key=lambda i: -lengths[i])
                batches += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
            if self.longest_first and batches:
                # the batch holding the longest item goes first: out-of-memory shows at step 1
                k = max(range(len(batches)), key=lambda j: max(lengths[i] for i in batches[j]))
                batches.insert(0, batches.pop(k))
        if self.drop_last:
            batches = [b for b in batches if len(b) == bs]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        if not self.drop_last:
            return math.ceil(n / self.batch_size)
        return len(self.batches())


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Plain shuffled batches (what ``DataLoader(shuffle=True)`` does), for comparison."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def padding_waste(lengths: Sequence[float], batches: Iterable[Sequence[int]]) -> float:
    """Fraction of padded positions: ``1 - sum(lengths) / sum(batch size * longest in batch)``."""
    real = padded = 0.0
    for batch in batches:
        if len(batch) == 0:
            continue
        ls = [lengths[i] for i in batch]
        real += sum(ls)
        padded += max(ls) * len(ls)
    return 0.0 if padded == 0 else 1.0 - real / padded


# --------------------------------------------------------------------------------------------
# Archives: stream chosen languages and splits out of MLS .tar.gz files
# --------------------------------------------------------------------------------------------
#: Reference sizes for planning disk space (OPUS archives).
STORAGE_ESTIMATES = (
    # (selection, hours, files, size on disk)
    ("it + pt + pl (OPUS)", 511, 135_000, "15-20 GB"),
    ("it + pt + pl + es (OPUS)", 1_429, 363_000, "45-60 GB"),
)
FREE_SPACE_FACTOR = 2.5   # keep this many times the estimate free (archive + extracted + caches)
GB_PER_HOUR = 0.04        # OPUS archive size per hour of training audio (upper end: 20 GB / 511 h)


@dataclass
class ExtractReport:
    """What `extract_mls_archive` did (or, with ``dry_run``, would do)."""

    archive: Path
    out_dir: Path
    dry_run: bool = False
    files: Counter = field(default_factory=Counter)      # (language, split) -> files written
    bytes_written: int = 0
    members_seen: int = 0
    skipped_members: int = 0                              # not in the chosen languages/splits
    refused: list[tuple[str, str]] = field(default_factory=list)   # (member name, why)
    stopped_early: bool = False                           # max_files reached

    @property
    def n_files(self) -> int:
        return sum(self.files.values())

    def __str__(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        lines = [f"{self.archive.name}: {verb} {self.n_files} files ({self.bytes_written / 1e6:.1f} MB) "
                 f"to {self.out_dir}; read {self.members_seen} members, skipped {self.skipped_members} "
                 f"not chosen, refused {len(self.refused)} unsafe"
                 + ("; stopped at max_files" if self.stopped_early else "")]
        for (lang, split), n in sorted(self.files.items()):
            lines.append(f"  {lang}/{split}: {n} files")
        for name, why in self.refused[:10]:
            lines.append(f"  refused {name!r}: {why}")
        return "\n".join(lines)


def storage_estimate(out_dir: str | os.PathLike, languages: Sequence[str] | None = None,
                     archive: str | os.PathLike | None = None) -> str:
    """The storage table printed before extracting: reference sizes, the chosen languages' hours,
    what this archive needs (OPUS does not compress, so extracted ~= archive size) and free space
    at ``out_dir`` (or its nearest existing parent)."""
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    lines = ["MLS storage estimate (OPUS archives):",
             f"  {'selection':<28}{'hours':>8}{'files':>10}{'on disk':>12}"]
    for sel, hours, files, disk in STORAGE_ESTIMATES:
        lines.append(f"  {sel:<28}{hours:>8,}{files:>10,}{disk:>12}")
    need = None
    if languages:
        names = [mls_name(x) for x in languages]
        hours = sum(MLS_TRAIN_HOURS[n] for n in names)
        need = hours * GB_PER_HOUR * 1e9
        lines.append(f"  chosen {', '.join(names)}: about {hours:,.0f} h of training audio (MLS paper), "
                     f"about {need / 1e9:.0f} GB")
    if archive is not None and Path(archive).is_file():
        size = Path(archive).stat().st_size
        need = size if need is None else min(need, size)   # a filtered extract needs less
        lines.append(f"  this archive: {Path(archive).name}, {size / 1e9:.2f} GB")
    if need is not None:
        want = need * FREE_SPACE_FACTOR
        verdict = "ok" if free >= want else "NOT ENOUGH: extraction may fill the disk"
        lines.append(f"  keep {FREE_SPACE_FACTOR}x free = {want / 1e9:.1f} GB; free at {probe}: "
                     f"{free / 1e9:.1f} GB ({verdict})")
    else:
        lines.append(f"  free at {probe}: {free / 1e9:.1f} GB (keep {FREE_SPACE_FACTOR}x what you extract)")
    return "\n".join(lines)


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a member is unsafe to extract, or None. Only plain files and folders with relative
    paths that stay inside the output folder are allowed (no links, devices, '..', absolute)."""
    name = member.name
    if not (member.isfile() or member.isdir()):
        return "not a regular file or folder (link, device or fifo)"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in Path(name.replace("\\", "/")).parts:
        return "path goes outside the output folder ('..')"
    return None


def extract_mls_archive(archive: str | os.PathLike, out_dir: str | os.PathLike, *,
                        languages: Sequence[str] | None = None,
                        splits: Sequence[str] = ("train", "dev", "test"),
                        max_files: int | None = None, dry_run: bool = False,
                        progress: bool = True) -> ExtractReport:
    """Stream chosen languages and splits out of an MLS ``.tar.gz`` without unpacking all of it.

    Members look like ``mls_italian_opus/train/audio/<speaker>/<book>/<id>.opus`` and
    ``mls_italian_opus/dev/transcripts.txt``; they land at the same relative path under
    ``out_dir``, so ``scan_mls(out_dir / "mls_italian_opus", "dev")`` reads them. The archive is
    read once, front to back (``tarfile`` mode ``"r|gz"``), so memory stays flat whatever its size.

    Args:
        languages: MLS names or codes to keep (``None``: all).
        splits: splits to keep. Top-level files (``metainfo.txt``, ``LICENSE``) are always kept.
        max_files: stop after this many audio files (a quick sample); reading continues, without
            writing audio, only until every chosen split's ``transcripts.txt`` has been seen.
        dry_run: count what would be written, write nothing.

    Prints a storage estimate first. Unsafe members (absolute paths, ``..``, links, devices)
    are refused and listed in the report, never written.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    print(storage_estimate(out_dir, languages, archive))
    wanted_langs = {mls_name(x) for x in languages} if languages else None
    wanted_splits = set(splits)
    report = ExtractReport(archive, out_dir, dry_run)
    out_root = out_dir.resolve()
    transcripts_seen: set[tuple[str, str]] = set()
    audio_written = 0

    bar = None
    if progress:
        bar = progress_bar(desc=f"extract {archive.name}", unit="file")
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                report.members_seen += 1
                problem = _member_problem(member)
                if problem is not None:
                    report.refused.append((member.name, problem))
                    continue
                parts = Path(member.name).parts
                if parts and parts[0] == ".":
                    parts = parts[1:]
                m = _ARCHIVE_ROOT_RE.match(parts[0]) if parts else None
                if m is None or (wanted_langs is not None and m["lang"] not in wanted_langs):
                    report.skipped_members += 1
                    continue
                if member.isdir():
                    continue
                lang = m["lang"]
                split = parts[1] if len(parts) > 2 else ""
                if len(parts) > 2 and split not in wanted_splits:
                    report.skipped_members += 1
                    continue
                is_audio = Path(member.name).suffix.lower() in AUDIO_EXTENSIONS
                if is_audio and max_files is not None and audio_written >= max_files:
                    report.skipped_members += 1
                    report.stopped_early = True
                    chosen = {(lang, s) for s in wanted_splits}
                    if chosen <= transcripts_seen:
                        break
                    continue
                target = out_dir.joinpath(*parts)
                if out_root not in target.resolve().parents:
                    report.refused.append((member.name, "resolves outside the output folder"))
                    continue
                if parts[-1] == "transcripts.txt" and len(parts) == 3:
                    transcripts_seen.add((lang, split))
                if not dry_run:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    if src is None:
                        report.refused.append((member.name, "no data"))
                        continue
                    with src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, length=1 << 20)
                report.files[(lang, split or "(top level)")] += 1
                report.bytes_written += member.size
                audio_written += int(is_audio)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    print(report)
    return report


# --------------------------------------------------------------------------------------------
# The batches of a run: a pure function of (seed, epoch), replayed exactly on resume
# --------------------------------------------------------------------------------------------


def epoch_batches(dataset, config: TrainConfig, epoch: int) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch): resume replays them exactly."""
    lengths = [u.duration for u in dataset.utterances]
    if config.length_grouped:
        sampler = LengthGroupedBatchSampler(lengths, config.batch_size, shuffle=True, seed=config.seed + epoch)
        return list(sampler)
    order = np.random.default_rng(config.seed + epoch).permutation(len(lengths)).tolist()
    return [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]


class EpochBatches:
    """The batch sampler of a whole run: `epoch_batches` of ``epoch`` from ``position`` on, then
    of every later epoch, forever. One DataLoader iterates it for the whole run, so its worker
    processes start once, not once per epoch (at thesis scale: 8 workers, each importing torch
    and building two feature extractors, every ~930 steps). Distributed: each rank's slices."""

    def __init__(self, dataset, config: TrainConfig, epoch: int, position: int, ctx: Optional[Dist] = None):
        self.dataset, self.config, self.ctx = dataset, config, ctx or Dist()
        self.start = (epoch, position)
        self._batches: dict[int, list[list[int]]] = {}
        self._lengths: dict[int, int] = {}

    def batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._batches:
            batches = epoch_batches(self.dataset, self.config, epoch)
            if self.ctx.enabled:
                batches = [shard(b, self.ctx) for b in batches if len(b) >= self.ctx.world]
            self._batches = {e: b for e, b in self._batches.items() if e >= epoch - 1}  # the loader runs ahead
            self._batches[epoch], self._lengths[epoch] = batches, len(batches)
        return self._batches[epoch]

    def length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            self.batches(epoch)
        return self._lengths[epoch]

    def __iter__(self):
        epoch, position = self.start
        while True:
            yield from self.batches(epoch)[position:]
            epoch, position = epoch + 1, 0


def batch_stream(dataset, collate, config: TrainConfig, epoch: int, position: int,
                 ctx: Optional[Dist] = None) -> Iterator[tuple[int, int, Optional[dict]]]:
    """Yield (epoch, position_after, batch) forever, starting at `position` of `epoch`.

    Distributed (``ctx.world > 1``): every rank walks the same global batches and collates its
    slice ``batch[rank::world]``; a global batch smaller than the world is left out on every rank
    alike, and a slice whose clips all failed to decode yields ``None`` (the rank then adds no
    gradient) instead of being skipped, which would put the ranks out of step."""
    ctx = ctx or Dist()
    sampler = EpochBatches(dataset, config, epoch, position, ctx)
    # A generator of its own: creating a loader iterator draws a seed, and drawing it from the
    # global RNG would shift dropout masks after a resume (the run would no longer replay).
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed + epoch),
        pin_memory=config.pin_memory and torch.cuda.is_available(),  # no-op without CUDA: torch warns
    )
    for batch in loader:
        while position >= sampler.length(epoch):  # the batch opens the next epoch
            epoch, position = epoch + 1, 0
        position += 1
        if batch is None and not ctx.enabled:  # every clip of the batch failed to decode (counted)
            continue
        yield epoch, position, batch
