"""Frozen encoders and a frozen teacher run once per utterance: the caches of a run.

A frozen Whisper encoder gives the same states for a clip every epoch, and a frozen teacher's
decoder gives the same logits for a clip's fixed reference tokens. `build_caches` decides, for a
run, which of them are computed live, kept in memory (`EncoderCache`, `LogitCache`), kept on disk
across runs (`EncoderStore`, keyed by the encoder's exact weights), or read from an offline
teacher cache (`kdlib.teacher_cache.TeacherCache`); `kdlib.models.same_encoder` finds distil-whisper's shared
frozen encoder, whose states the student and the teacher then share.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from kdlib import cache_dir
from kdlib.config import TrainConfig
from kdlib.files import NotEnoughSpace, atomic_write_bytes, available_memory_bytes, gb, require_free_space
from kdlib.models import RunModels, function_weights, same_encoder, tensor_digest
from kdlib.teacher_cache import TeacherCache

class EncoderCache:
    """Outputs of a frozen Whisper encoder, computed without autograd and (``keep=True``) kept
    per utterance id, so every later epoch skips the encoder entirely.

    The encoder is the most expensive part of Whisper (3000 log-mel frames in, 1500 states out,
    whatever the clip's length), and a frozen one gives the same output every epoch. Outputs are
    computed in eval mode (no dropout) and stored as float32 on the CPU: ``(1500, d_model)`` each.

    ``disk``: a verified `kdlib.teacher_cache.TeacherCache` of this (teacher) encoder; utterances
    it holds are read from it (offline KD), the others computed as above.

    ``persistent``: a folder of encoder states that outlives the run (``encoder_cache="disk"``),
    see `EncoderStore`: states it holds are read instead of computed, computed ones are added.
    """

    def __init__(self, model: torch.nn.Module, keep: bool = True, disk=None,
                 persistent: Optional["EncoderStore"] = None):
        self.model = model
        self.keep = keep
        self.store: dict[str, torch.Tensor] = {}
        self.disk = disk if disk is not None and disk.has_hidden else None
        self.persistent = persistent

    @classmethod
    def stored(cls, model: torch.nn.Module, audio: dict[str, Path]) -> "EncoderCache":
        """``model``'s encoder states for the clips in ``audio`` (id → file), read from and added
        to the disk `EncoderStore`, nothing kept in RAM: for decoding without the encoder."""
        return cls(model, keep=False, persistent=EncoderStore(model.get_encoder(), audio))

    def encode_hook(self, ids: list[str], device: Optional[torch.device] = None):
        """The ``encode(features, positions)`` hook of `kdlib.decode.generate_token_ids` for
        clips whose utterance ids are ``ids`` (in the order of the decoded audio)."""
        def encode(features: torch.Tensor, positions: list[int]) -> torch.Tensor:
            return self(features, [ids[i] for i in positions], device or features.device)
        return encode

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, ids: list[str], device: torch.device) -> torch.Tensor:
        """``features`` (batch, n_mels, 3000) → encoder states (batch, 1500, d_model) on ``device``."""
        if self.disk is not None and self.disk.has_all(ids):
            return self.disk.hidden(ids, device)
        fresh = {}
        if self.persistent is not None:
            fresh = self.persistent.load([key for key in ids if key not in self.store])
        missing = [i for i, key in enumerate(ids) if key not in self.store and key not in fresh]
        if missing:
            encoder = self.model.get_encoder()
            was_training = encoder.training
            encoder.eval()
            param = next(encoder.parameters())
            out = encoder(features[missing].to(param.device, param.dtype)).last_hidden_state
            encoder.train(was_training)
            if not self.keep and self.persistent is None and len(missing) == len(ids):
                # encoder_cache="off": nothing is stored, so the states stay where and as they were
                # computed (the thesis: on the GPU, in the teacher's dtype), no fp32 trip to the CPU
                return out.to(device)
            computed = {ids[i]: out[j].float().cpu() for j, i in enumerate(missing)}
            if self.persistent is not None:
                self.persistent.save(computed)
            fresh.update(computed)
        if self.keep:
            self.store.update(fresh)
        rows = [fresh[key] if key in fresh else self.store[key] for key in ids]
        return torch.stack(rows).to(device)


class EncoderStore:
    """Frozen-encoder states on disk, shared by every run with the same encoder weights.

    ``<cache>/encoder_states/<key>/<utterance id>-<audio size>-<audio mtime ns>.pt``: float32
    ``(1500, d_model)``, exactly what the encoder returned. ``key`` hashes the encoder's
    parameters (LoRA included) bit for bit and its dtype, so another encoder (a stage-II student,
    another model) never reads these states; the audio file's size and modification time are in
    the file name, so a changed clip is computed again. Written atomically (temporary file, then
    rename), so a run killed mid-write leaves no half file. On the demo every run with whisper-base's
    frozen encoder (teacher, adapted teacher, distil-base student) shares one folder: the encoder
    runs once per clip for the whole book instead of once per run.
    """

    def __init__(self, encoder: torch.nn.Module, audio: dict[str, Path], root: Optional[Path] = None):
        # A zero-B LoRA wrapper has its base encoder's function weights, hence its folder.
        digest = tensor_digest(function_weights(encoder))
        dtype = str(next(encoder.parameters()).dtype)
        key = hashlib.sha256(f"{digest}:{dtype}".encode()).hexdigest()[:20]
        self.folder = Path(root or cache_dir()) / "encoder_states" / key
        self.audio = audio

    def _path(self, utt_id: str) -> Optional[Path]:
        audio = self.audio.get(utt_id)
        if audio is None:
            return None
        try:
            stat = os.stat(audio)
        except OSError:
            return None
        return self.folder / f"{utt_id}-{stat.st_size}-{stat.st_mtime_ns}.pt"

    def load(self, ids: list[str]) -> dict[str, torch.Tensor]:
        found = {}
        for utt_id in ids:
            path = self._path(utt_id)
            if path is not None and path.is_file():
                try:
                    found[utt_id] = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as err:  # a damaged file is computed again, never fatal
                    print(f"encoder store: ignoring {path} ({err})")
        return found

    def save(self, states: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for utt_id, state in states.items():
            path = self._path(utt_id)
            if path is not None and not path.exists():
                atomic_write_bytes(path, lambda h, s=state: torch.save(s.clone(), h))


@dataclass
class EncoderCaches:
    teacher: Optional[EncoderCache] = None
    student: Optional[EncoderCache] = None  # None: the student's encoder trains (runs live)
    shared: bool = False  # the student reuses the teacher's cache
    logits: Optional[LogitCache] = None  # the teacher's logits per utterance
    disk: Any = None  # kdlib.teacher_cache.TeacherCache: offline teacher (top-k logits, encoder states)


#: Label tokens per second of Italian read speech (about 2.5 words/s, ~1.5 tokens per word): the
#: logit cache's size before the labels are tokenised.
TOKENS_PER_SECOND = 4


def cache_footprint(models: RunModels, config: TrainConfig, utterances) -> dict[str, float]:
    """Bytes that ``config.encoder_cache`` would keep for these utterances: ``memory`` (host RAM:
    float32 encoder states with "memory", the teacher's logits at every label token with both) and
    ``disk`` (float32 encoder states in the store with "disk"). Zero for "off"."""
    if config.encoder_cache not in ("memory", "disk"):
        return {"memory": 0.0, "disk": 0.0}
    states = 0.0
    for model in (models.teacher, models.student):
        if model is None or (model is models.student and models.teacher is not None
                             and same_encoder(models.student, models.teacher)):
            continue
        cfg = model.config
        states += cfg.max_source_positions * cfg.d_model * 4  # (frames, d_model) float32 per clip
    n, seconds = len(utterances), sum(u.duration for u in utterances)
    logits = (seconds * TOKENS_PER_SECOND + 4 * n) * models.teacher.config.vocab_size * 4 \
        if models.teacher is not None else 0.0
    if config.encoder_cache == "memory":
        return {"memory": n * states + logits, "disk": 0.0}
    return {"memory": logits, "disk": n * states}


def check_cache_fits(models: RunModels, config: TrainConfig, utterances) -> None:
    """Refuse, before the first step, an ``encoder_cache`` that cannot fit this machine (MLS scale:
    ~60,000 clips x (large-v3's 1500 x 1280 states + logits) is about a terabyte)."""
    need = cache_footprint(models, config, utterances)
    advice = 'set encoder_cache="off" (the thesis preset\'s: frozen encoders then run every step)'
    what = f'encoder_cache="{config.encoder_cache}" for {len(utterances):,} clips'
    ram = available_memory_bytes()
    if ram is not None and need["memory"] > 0.8 * ram:
        raise NotEnoughSpace(f"{what} would hold about {gb(need['memory'])} in memory (encoder states and the "
                             f"teacher's logits) and this machine has {gb(ram)} available: {advice}")
    if need["disk"]:
        require_free_space(cache_dir(), need["disk"], f"{what} (encoder states)", advice=advice)


def build_caches(models: RunModels, config: TrainConfig, train_set=None, dev_set=None) -> EncoderCaches:
    """Encoder/logit caches of a run. With ``config.teacher_cache`` the disk cache is opened and
    verified against this teacher, feature extractor and ``train_set`` (refused if stale); the
    teacher then runs only for utterances the cache does not hold (the dev set). A cache that would
    not fit in memory or on disk is refused first (`check_cache_fits`)."""
    keep = config.encoder_cache in ("memory", "disk")
    check_cache_fits(models, config, [u for s in (train_set, dev_set) if s is not None for u in s.utterances])
    audio = {u.id: Path(u.audio) for s in (train_set, dev_set) if s is not None for u in s.utterances}

    def store(model):
        return EncoderStore(model.get_encoder(), audio) if config.encoder_cache == "disk" else None

    disk = None
    if config.teacher_cache and models.teacher is not None:
        need_hidden = config.geo_weight > 0 or config.contrastive_weight > 0
        disk = TeacherCache(config.teacher_cache).verify(
            teacher=models.teacher, feature_extractor=models.teacher_feature_extractor or models.feature_extractor,
            dataset=train_set,
            temperature=config.temperature, need_hidden=need_hidden,
        )
    teacher = EncoderCache(models.teacher, keep, disk, persistent=store(models.teacher)) if models.teacher is not None else None
    logits = LogitCache() if keep and models.teacher is not None else None
    encoder_trains = any(p.requires_grad for n, p in models.student.named_parameters() if ".encoder." in n)
    if encoder_trains:
        return EncoderCaches(teacher=teacher, logits=logits, disk=disk)
    if teacher is not None and same_encoder(models.student, models.teacher):
        return EncoderCaches(teacher=teacher, student=teacher, shared=True, logits=logits, disk=disk)
    return EncoderCaches(teacher=teacher, student=EncoderCache(models.student, keep, persistent=store(models.student)),
                         logits=logits, disk=disk)


class LogitCache:
    """Teacher logits per utterance, real token positions only: ``(tokens_i, vocab)`` float32 on
    the CPU (about 8 MB for a 40-token clip with Whisper's 51,865-token vocabulary)."""

    def __init__(self):
        self.store: dict[str, torch.Tensor] = {}

    def get(self, ids: list[str], lengths: list[int], width: int, device) -> Optional[torch.Tensor]:
        if not all(key in self.store for key in ids):
            return None
        vocab = self.store[ids[0]].shape[-1]
        out = torch.zeros(len(ids), width, vocab)  # padding positions are masked by the losses
        for row, key in enumerate(ids):
            out[row, : self.store[key].shape[0]] = self.store[key]
        return out.to(device)

    def put(self, ids: list[str], lengths: list[int], logits: torch.Tensor) -> None:
        for row, key in enumerate(ids):
            self.store[key] = logits[row, : lengths[row]].float().cpu()


