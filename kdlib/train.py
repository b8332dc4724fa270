"""The training loop: one function, read top to bottom.

`train(config)` does, in order: build teacher and student → data → optimizer, schedule, scaler →
resume from ``checkpoint.pt`` if there is one → for each step: forward (student, and the frozen
teacher), loss, backward, clip, step, schedule, log, evaluate, checkpoint → final adapter, summary.

Stages (see `kdlib.config.STAGE_TERMS`):
  0  teacher adaptation: LoRA fine-tuning of the teacher itself with CE (its own run folder);
  I  knowledge distillation: CE + KL(teacher ‖ student)·T², student LoRA trained;
  II representation alignment: CE + geodesic (point or curve) + InfoNCE through the projector;
  III decoder fine-tuning: encoder frozen, decoder LoRA trained with CE + KL; the contrastive
     term (decayed linearly to ``contrastive_final_weight``, 0.1) only when the encoder trains
     (``train_encoder=True``): with it frozen the term would train the projector alone.
Each stage starts from the previous stage's folder (``init_from``): its exported adapter (``adapter_best/`` when early stopping kept one, else ``adapter_final/``).

The run folder (thesis layout): ``tb/`` TensorBoard scalars, ``checkpoint.pt`` (trainable
weights, optimizer, scheduler, scaler, RNG states, step, epoch, data position),
``adapter_final/`` (peft adapter + ``projector.pt``), ``training_history.json``,
``training_config.json``, ``summary.json``. With early stopping also ``adapter_best/``, the
adapter of the best dev evaluation (dev WER, else dev loss): the one exported and built on
(`exported_adapter`; ``summary.json``'s ``exported_adapter`` says which, its step and metric).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from kdlib.config import TrainConfig

CHECKPOINT = "checkpoint.pt"
ADAPTER_DIR = "adapter_final"
BEST_ADAPTER_DIR = "adapter_best"  # with early stopping: the adapter of the best dev evaluation
PROJECTOR_FILE = "projector.pt"


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left untouched."""


# --------------------------------------------------------------------------------------------
# Small pure helpers: schedules, devices, atomic files
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the base LR at `step`: linear warm-up to 1, then cosine down to min_lr/lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ramp(step: int, warmup_steps: int, value: float) -> float:
    """Linear ramp from 0 to `value` over `warmup_steps` (the KL weight warm-up)."""
    if warmup_steps <= 0:
        return value
    return value * min(1.0, step / warmup_steps)


def linear_decay(step: int, max_steps: int, start: float, end: Optional[float]) -> float:
    """Linear interpolation start → end over the run (stage III's contrastive weight)."""
    if end is None:
        return start
    return start + (end - start) * min(1.0, step / max(1, max_steps - 1))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_settings(config: TrainConfig, device: torch.device) -> tuple[bool, Optional[torch.dtype], bool]:
    """(autocast on, autocast dtype, use GradScaler). fp32 on CPU unless asked otherwise;
    ``amp="fp16"`` is fp16 autocast + GradScaler on CUDA and on the CPU alike."""
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
    if device.type == "cpu" and cpu_fp16_is_slow():
        # fp16 on a CPU: torch autocasts to float16 there and has a CPU GradScaler, so the
        # thesis' fp16 path (scale, unscale, inf check, skipped step) runs in CI as on a GPU. But a
        # CPU without fp16 matrix instructions emulates them: the tiny Whisper student's fwd+bwd
        # took 13-14 s in fp16 against 2.5-3.6 s in bf16 and 2.5-5.6 s in fp32 (batch 4, 2-core
        # EPYC with avx512_bf16). There the autocast dtype is bf16; the scaler stays enabled.
        return True, torch.bfloat16, True
    return True, torch.float16, True


def cpu_fp16_is_slow() -> bool:
    """True when the CPU lacks fp16 matrix instructions (AVX512-FP16 / AMX-FP16) but has bf16 ones."""
    from kdlib.models import cpu_has_fast_bf16

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return cpu_has_fast_bf16() and not ("avx512_fp16" in flags or "amx_fp16" in flags)


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`.

    An interrupted save leaves the previous file intact (rename is atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, lambda h: h.write((json.dumps(value, indent=2) + "\n").encode()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as tensors, lists, ints, floats and strings only, so that a checkpoint
    loads with ``torch.load(..., weights_only=True)`` (nothing in it is unpickled as code)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Models and data for a run
# --------------------------------------------------------------------------------------------


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


def _load_pair(config: TrainConfig):
    """Teacher bundle and the base (un-adapted) student bundle for this config. The student
    bundle carries the student's own tokenizer and feature extractor (they differ from the
    teacher's for the thesis pair); a student built from the teacher shares the teacher's."""
    from kdlib import models

    if config.teacher in ("tiny-random", "tiny-random-v3"):
        teacher, student = models.tiny_random_pair(seed=config.seed, teacher_like_v3=config.teacher == "tiny-random-v3")
        if config.student != "from-teacher":
            return _adapted_teacher(teacher, config), _shaped(student, config)
    else:
        teacher = models.load_whisper(config.teacher)
    # The student is built from the *pretrained* teacher (before any stage-0 adaptation), so
    # what it gains later is what distillation taught it, not weights copied from an adapted model.
    if config.student in ("distil-base", "from-teacher"):
        student = models.WhisperBundle(
            models.student_from_teacher(
                teacher.model,
                encoder_layers=config.student_encoder_layers,
                decoder_layers=config.student_decoder_layers,
            ),
            teacher.tokenizer, teacher.feature_extractor, None, config.student,
        )
    else:
        student = models.load_whisper(config.student)
    return _adapted_teacher(teacher, config), _shaped(student, config)


def _shaped(student, config: TrainConfig):
    from kdlib import models

    return models.shape_student(student, window_seconds=config.student_window_seconds,
                                frame_factor=config.student_frame_factor, merge_layer=config.student_merge_layer)


def _adapted_teacher(teacher, config: TrainConfig):
    """The teacher with a stage-0 adapter (``teacher_from``) merged in, when one is set."""
    if config.teacher_from:
        adapter = exported_adapter(config.teacher_from)
        if not adapter.exists():
            raise FileNotFoundError(f"teacher_from: {adapter} does not exist (run stage 0 first)")
        from peft import PeftModel

        teacher.model = PeftModel.from_pretrained(teacher.model, str(adapter)).merge_and_unload()
    return teacher


def build_models(config: TrainConfig, device: torch.device) -> RunModels:
    """Teacher (frozen), student with LoRA, projector; what is trainable set for the stage."""
    from kdlib import models

    teacher_bundle, student_bundle = _load_pair(config)
    base_student = student_bundle.model
    if config.stage == 0:
        # Stage 0 adapts the teacher itself: it is the model being trained, nobody teaches it.
        base_student, teacher_model, student_bundle = teacher_bundle.model, None, teacher_bundle
    else:
        teacher_model = teacher_bundle.model
        models.freeze_teacher(teacher_model)
        teacher_model.to(resolve_device(config.teacher_device) if config.teacher_device else device)

    init_adapter = exported_adapter(config.init_from) if config.init_from else None
    if init_adapter is not None and not init_adapter.exists():
        raise FileNotFoundError(f"init_from: {init_adapter} does not exist (run the previous stage first)")
    if init_adapter is not None:
        from peft import PeftModel

        student = PeftModel.from_pretrained(base_student, str(init_adapter), is_trainable=True)
    else:
        student = models.apply_lora(
            base_student, config.lora_preset, r=config.lora_r, alpha=config.lora_alpha,
            dropout=config.lora_dropout,
        )
    if config.grad_checkpointing:
        # Non-reentrant checkpointing: the reentrant kind gives no gradient to LoRA weights inside
        # a layer whose input needs none (frozen conv / embeddings before it) unless the inputs are
        # made to require grad; transformers' default for it has changed between versions.
        base = student.base_model.model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    student.to(device)

    projector = None
    if config.projector and teacher_model is not None:
        projector = models.RiemannianProjector(
            base_student.config.d_model, teacher_model.config.d_model
        )
        if init_adapter is not None and (init_adapter / PROJECTOR_FILE).exists():
            projector.load_state_dict(torch.load(init_adapter / PROJECTOR_FILE, map_location="cpu", weights_only=True))
        projector.to(device)

    trainable = set_trainable(student, projector, config)
    teacher_fe = vocab = None
    if teacher_model is not None:
        # The teacher reads its own log-mels when the pair disagrees on mel bins (large-v3: 128)
        # or on the window (a student with a shorter encoder window reads fewer frames).
        if (teacher_model.config.num_mel_bins != base_student.config.num_mel_bins
                or teacher_bundle.feature_extractor.n_samples != student_bundle.feature_extractor.n_samples):
            teacher_fe = teacher_bundle.feature_extractor
        vocab = models.vocab_index(student_bundle.tokenizer, teacher_bundle.tokenizer, base_student.config.vocab_size)
        if vocab is not None:
            vocab = vocab.to(device)
    return RunModels(
        student=student,
        teacher=teacher_model,
        projector=projector,
        tokenizer=student_bundle.tokenizer,
        feature_extractor=student_bundle.feature_extractor,
        trainable=trainable,
        teacher_feature_extractor=teacher_fe,
        vocab_index=vocab,
    )


def set_trainable(student: torch.nn.Module, projector: Optional[torch.nn.Module], config: TrainConfig) -> dict:
    """Make exactly the stage's parameters trainable; return their names (logged and tested).

    LoRA parameters train; the encoder's only when ``config.train_encoder`` says so (default:
    stages 0–II yes, stage III no). The projector trains whenever a term that goes through it
    (geodesic/contrastive) is on.
    """
    train_encoder = config.train_encoder if config.train_encoder is not None else config.stage != 3
    names: dict[str, list[str]] = {"student": [], "projector": []}
    for name, param in student.named_parameters():
        param.requires_grad = "lora_" in name and (train_encoder or ".encoder." not in name)
        if param.requires_grad:
            names["student"].append(name)
    if projector is not None:
        uses_projector = config.geo_weight > 0 or config.contrastive_weight > 0
        for name, param in projector.named_parameters():
            param.requires_grad = uses_projector
            if uses_projector:
                names["projector"].append(name)
    return names


def build_data(config: TrainConfig, feature_extractor, tokenizer, teacher_feature_extractor=None):
    """Train and dev datasets from an MLS folder (or the embedded corpus); returns (train, dev, report).
    ``teacher_feature_extractor``: the teacher's own log-mels too (a pair with other mel bins)."""
    from kdlib import data

    root = Path(config.data_root) if config.data_root else data.embedded_corpus(config.language)
    scans = {}
    for split, limit in ((config.train_split, config.max_train_utterances), (config.dev_split, config.max_dev_utterances)):
        result = data.scan_mls(
            root, split, min_duration=config.min_duration, max_duration=config.max_duration,
            language=config.language,
            # stage 0 trains the teacher itself, which keeps Whisper's 30 s window
            window_seconds=config.student_window_seconds if config.stage != 0 else None,
        )
        utterances = result.utterances[:limit] if limit else result.utterances
        scans[split] = (utterances, result)
    # safe=True: a file that breaks after the scan is dropped and counted, not a crash mid-run.
    train_set = data.MLSDataset(scans[config.train_split][0], feature_extractor, tokenizer, task=config.task,
                                safe=True, teacher_feature_extractor=teacher_feature_extractor)
    dev_set = data.MLSDataset(scans[config.dev_split][0], feature_extractor, tokenizer, task=config.task,
                              teacher_feature_extractor=teacher_feature_extractor)
    report = {split: result.report() for split, (_, result) in scans.items()}
    return train_set, dev_set, report


def epoch_batches(dataset, config: TrainConfig, epoch: int) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch): resume replays them exactly."""
    from kdlib import data

    lengths = [u.duration for u in dataset.utterances]
    if config.length_grouped:
        sampler = data.LengthGroupedBatchSampler(lengths, config.batch_size, shuffle=True, seed=config.seed + epoch)
        return list(sampler)
    order = np.random.default_rng(config.seed + epoch).permutation(len(lengths)).tolist()
    return [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]


class EpochBatches:
    """The batch sampler of a whole run: `epoch_batches` of ``epoch`` from ``position`` on, then
    of every later epoch, forever. One DataLoader iterates it for the whole run, so its worker
    processes start once, not once per epoch (at thesis scale: 8 workers, each importing torch
    and building two feature extractors, every ~930 steps). Distributed: each rank's slices."""

    def __init__(self, dataset, config: TrainConfig, epoch: int, position: int, ctx: Optional["Dist"] = None):
        from kdlib.distributed import Dist

        self.dataset, self.config, self.ctx = dataset, config, ctx or Dist()
        self.start = (epoch, position)
        self._batches: dict[int, list[list[int]]] = {}
        self._lengths: dict[int, int] = {}

    def batches(self, epoch: int) -> list[list[int]]:
        from kdlib.distributed import shard

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
                 ctx: Optional["Dist"] = None) -> Iterator[tuple[int, int, Optional[dict]]]:
    """Yield (epoch, position_after, batch) forever, starting at `position` of `epoch`.

    Distributed (``ctx.world > 1``): every rank walks the same global batches and collates its
    slice ``batch[rank::world]``; a global batch smaller than the world is left out on every rank
    alike, and a slice whose clips all failed to decode yields ``None`` (the rank then adds no
    gradient) instead of being skipped, which would put the ranks out of step."""
    from torch.utils.data import DataLoader

    from kdlib.distributed import Dist

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


# --------------------------------------------------------------------------------------------
# Frozen encoders: run once per utterance, no autograd graph
# --------------------------------------------------------------------------------------------


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
        """The ``encode(features, positions)`` hook of `kdlib.evaluate.generate_token_ids` for
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
        import hashlib

        from kdlib import cache_dir
        from kdlib.models import function_weights, tensor_digest

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


def same_encoder(student: torch.nn.Module, teacher: torch.nn.Module) -> bool:
    """True when the student's encoder computes exactly the teacher's function: same base
    weights and every LoRA B matrix still zero (distil-whisper's shared frozen encoder)."""
    from kdlib.models import function_weights

    s_w, t_w = function_weights(student.get_encoder()), function_weights(teacher.get_encoder())
    return s_w.keys() == t_w.keys() and all(
        torch.equal(s_w[n].detach().cpu(), t_w[n].detach().cpu()) for n in t_w)


@dataclass
class EncoderCaches:
    teacher: Optional[EncoderCache] = None
    student: Optional[EncoderCache] = None  # None: the student's encoder trains (runs live)
    shared: bool = False  # the student reuses the teacher's cache
    logits: Optional["LogitCache"] = None  # the teacher's logits per utterance
    disk: Any = None  # kdlib.teacher_cache.TeacherCache: offline teacher (top-k logits, encoder states)


def build_caches(models: RunModels, config: TrainConfig, train_set=None, dev_set=None) -> EncoderCaches:
    """Encoder/logit caches of a run. With ``config.teacher_cache`` the disk cache is opened and
    verified against this teacher, feature extractor and ``train_set`` (refused if stale); the
    teacher then runs only for utterances the cache does not hold (the dev set)."""
    keep = config.encoder_cache in ("memory", "disk")
    audio = {u.id: Path(u.audio) for s in (train_set, dev_set) if s is not None for u in s.utterances}

    def store(model):
        return EncoderStore(model.get_encoder(), audio) if config.encoder_cache == "disk" else None

    disk = None
    if config.teacher_cache and models.teacher is not None:
        from kdlib.teacher_cache import TeacherCache

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


# --------------------------------------------------------------------------------------------
# Forward and loss
# --------------------------------------------------------------------------------------------


def decoder_inputs(labels: torch.Tensor, config_model) -> torch.Tensor:
    """Teacher-forcing inputs: labels shifted right behind the decoder start token."""
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    return shift_tokens_right(labels, config_model.pad_token_id, config_model.decoder_start_token_id)


def forward_losses(models: RunModels, loss_fn, batch: dict, device: torch.device,
                   autocast: tuple[bool, Optional[torch.dtype]], taid_t: Optional[float] = None,
                   caches: Optional[EncoderCaches] = None) -> dict:
    """One forward of student (and frozen teacher) and the combined loss dict (``total`` has grad)."""
    enabled, dtype = autocast
    features = batch["input_features"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    student_model = models.student
    base_config = student_model.base_model.model.config
    dec_in = decoder_inputs(labels, base_config)
    w = loss_fn.weights
    need_hidden = any(getattr(w, term) > 0 for term in loss_fn.HIDDEN_TERMS)
    need_logits = any(getattr(w, term) > 0 for term in ("kl", "l2", "taid"))
    with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=enabled):
        caches = caches or EncoderCaches()
        encoded = None
        if caches.student is not None:  # frozen student encoder: cached or no-grad states
            encoded = caches.student(features, batch["ids"], device)
            student_out = student_model(encoder_outputs=(encoded,), decoder_input_ids=dec_in, use_cache=False)
        else:
            student_out = student_model(input_features=features, decoder_input_ids=dec_in, use_cache=False)
        teacher_logits = teacher_hidden = None
        if models.teacher is not None and (need_logits or need_hidden):
            # Identical frozen encoders (distil-whisper's student): the teacher's decoder reads the
            # student's encoder states, so each batch costs one encoder forward, not two.
            teacher_features = batch.get("teacher_input_features", batch["input_features"])
            teacher_logits, teacher_hidden = teacher_forward(
                models.teacher, caches, batch["ids"], teacher_features, dec_in, labels, need_logits, device,
                encoded=encoded if caches.shared else None, vocab_index=models.vocab_index,
                need_hidden=need_hidden,
            )
        student_hidden = student_mask = None
        if need_hidden:
            from kdlib.frames import teacher_on_student_frames
            from kdlib.models import merge_factor

            # (batch, frames_s, d_student): what the student's decoder reads (window, merged)
            student_hidden = student_out.encoder_last_hidden_state
            # The teacher's states on the student's frame grid: student frame i is teacher frame
            # i inside the window, or teacher frames k·i .. k·i+k-1 when k frames are merged.
            teacher_hidden, student_mask = teacher_on_student_frames(
                teacher_hidden, batch["num_frames"].to(device),
                window_frames=base_config.max_source_positions, factor=merge_factor(base_config))
        return loss_fn(
            student_logits=student_out.logits,
            labels=labels,
            teacher_logits=teacher_logits,
            student_hidden=student_hidden,
            teacher_hidden=teacher_hidden if need_hidden else None,
            hidden_mask=student_mask,
            projector=models.projector,
            taid_t=taid_t,
            teacher_hidden_mask=student_mask,
        )


@torch.no_grad()
def teacher_forward(teacher, caches: EncoderCaches, ids: list[str], features: torch.Tensor,
                    dec_in: torch.Tensor, labels: torch.Tensor, need_logits: bool, device: torch.device,
                    encoded: Optional[torch.Tensor] = None, vocab_index: Optional[torch.Tensor] = None,
                    need_hidden: bool = True):
    """Frozen teacher: ``(logits (batch, tokens, vocab) or None, encoder states (batch, 1500, d))``.

    With caches, the encoder runs once per utterance and so does the decoder: its logits depend
    only on the (fixed) reference tokens of the utterance, so they are stored per utterance and
    every later epoch reads them instead of running the teacher at all. ``encoded``: the
    teacher's encoder states when the caller already has them (a shared, identical encoder).

    With a disk cache (``caches.disk``) holding every utterance of the batch, the logits are a
    `kdlib.losses.TopKLogits` read from it and the teacher does not run.

    ``vocab_index`` (a teacher with another vocabulary, e.g. large-v3 for a small student): the
    student's token ids are translated for the teacher's decoder, and the returned logits are
    the teacher's at the student's tokens, in the student's order ``(batch, tokens, vocab_student)``.
    ``features`` are the teacher's own log-mels."""
    tdev = next(teacher.parameters()).device
    if caches.disk is not None and caches.disk.has_all(ids):
        if vocab_index is not None:
            raise ValueError("teacher_cache: the cache holds top-k ids in the teacher's vocabulary, which "
                             "differs from the student's here; train with the live teacher (teacher_cache=None)")
        logits = caches.disk.topk(ids, labels.shape[1], device, labels=labels) if need_logits else None
        encoded = caches.teacher(features, ids, device) if need_hidden and caches.disk.has_hidden else None
        return logits, encoded
    if vocab_index is not None:
        dec_in = vocab_index.to(dec_in.device)[dec_in]
    if caches.teacher is None and encoded is None:  # nothing cached: the whole teacher, every step
        out = teacher(input_features=features.to(tdev), decoder_input_ids=dec_in.to(tdev), use_cache=False)
        logits = out.logits if vocab_index is None else out.logits[..., vocab_index.to(tdev)]
        return (logits.to(device) if need_logits else None), out.encoder_last_hidden_state.to(device)
    if encoded is None:
        encoded = caches.teacher(features, ids, tdev)  # (batch, 1500, d_teacher)
    encoded = encoded.to(tdev)
    logits = None
    if need_logits:
        lengths = (labels != -100).sum(dim=1).tolist()
        logits = caches.logits.get(ids, lengths, labels.shape[1], device) if caches.logits else None
        if logits is None:
            logits = teacher(encoder_outputs=(encoded,), decoder_input_ids=dec_in.to(tdev), use_cache=False).logits
            if vocab_index is not None:
                logits = logits[..., vocab_index.to(tdev)]
            if caches.logits is not None:
                caches.logits.put(ids, lengths, logits)
            logits = logits.to(device)
    return logits, encoded.to(device)


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


def stage_weights(config: TrainConfig, step: int):
    """`LossWeights` at `step`: KL warm-up and stage III's contrastive decay applied.

    ``kd_kind="taid"`` puts the KD weight on the TAID term instead of KL; ``alignment="curve"``
    puts the geometric weight on the curve term instead of the per-frame (point) term."""
    from kdlib.losses import LossWeights

    kd = ramp(step, config.kl_warmup_steps, config.kl_weight)
    curve = config.alignment == "curve" and config.geo_weight > 0
    return LossWeights(
        ce=config.ce_weight,
        kl=kd if config.kd_kind == "kl" else 0.0,
        taid=kd if config.kd_kind == "taid" else 0.0,
        temperature=config.temperature,
        geo=0.0 if curve else config.geo_weight,
        geo_kind=config.geo_kind,
        curve=config.geo_weight if curve else 0.0,
        alignment="curve" if curve else "point",
        contrastive=linear_decay(step, config.max_steps, config.contrastive_weight, config.contrastive_final_weight),
        contrastive_temperature=config.contrastive_temperature,
    )


# --------------------------------------------------------------------------------------------
# Evaluation during training
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def dev_loss(models: RunModels, dataset, collate, config: TrainConfig, device: torch.device,
             caches: Optional[EncoderCaches] = None, ctx: Optional["Dist"] = None) -> float:
    """Mean token cross-entropy of the student on the dev set (teacher forcing). Distributed:
    each rank scores every ``world``-th clip and the token-weighted sums are combined."""
    from torch.utils.data import DataLoader

    from kdlib.distributed import Dist, sum_over_ranks
    from kdlib.losses import cross_entropy

    ctx = ctx or Dist()
    models.student.eval()
    total, count = 0.0, 0
    loader = DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate,
                        sampler=range(ctx.rank, len(dataset), ctx.world))
    base_config = models.student.base_model.model.config
    for batch in loader:
        if batch is None:
            continue
        labels = batch["labels"].to(device)
        dec_in = decoder_inputs(labels, base_config)
        if caches is not None and caches.student is not None:  # frozen encoder: reuse its states
            encoded = caches.student(batch["input_features"], batch["ids"], device)
            out = models.student(encoder_outputs=(encoded,), decoder_input_ids=dec_in, use_cache=False)
        else:
            out = models.student(input_features=batch["input_features"].to(device), decoder_input_ids=dec_in,
                                 use_cache=False)
        tokens = int((labels != -100).sum())
        total += float(cross_entropy(out.logits.float(), labels)) * tokens
        count += tokens
    models.student.train()
    total, count = sum_over_ranks([total, count], ctx)
    return total / max(1, count)


@torch.no_grad()
def dev_wer(models: RunModels, dataset, config: TrainConfig, device: torch.device,
            ctx: Optional["Dist"] = None, caches: Optional[EncoderCaches] = None) -> dict:
    """Greedy dev WER and CER (Whisper basic normaliser) of the student as it is now.
    A frozen student encoder's states come from ``caches`` (``dev_loss`` has just computed
    them), so decoding runs the decoder only; a training encoder runs live.
    Distributed: each rank transcribes every ``world``-th clip; all ranks score all of them."""
    from kdlib import evaluate
    from kdlib.data import AudioError, load_audio
    from kdlib.distributed import Dist, gather_objects

    ctx = ctx or Dist()
    models.student.eval()
    audios, refs, ids = [], [], []
    for u in dataset.utterances[ctx.rank :: ctx.world]:
        try:
            audios.append(load_audio(u.audio).numpy())
            refs.append(u.text)
            ids.append(u.id)
        except AudioError as err:  # broke after the scan: skipped, not a crash mid-run
            print(f"dev WER: skipping {err}")
    encode = caches.student.encode_hook(ids, device) if caches is not None and caches.student is not None else None
    hyps = evaluate.transcribe(
        models.student, models.feature_extractor, models.tokenizer, audios,
        language=config.language, task=config.task, batch_size=config.batch_size, device=device,
        max_new_tokens=config.eval_max_new_tokens, encode=encode,
    )
    models.student.train()
    if ctx.enabled:
        shards = gather_objects((refs, hyps), ctx)
        refs = [r for shard_refs, _ in shards for r in shard_refs]
        hyps = [h for _, shard_hyps in shards for h in shard_hyps]
    scores = evaluate.wer_cer(refs, hyps)
    return {"dev_wer": scores["wer"], "dev_cer": scores["cer"], "dev_utterances": len(refs)}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def trainable_state(models: RunModels) -> dict[str, torch.Tensor]:
    state = {f"student.{n}": p.detach().cpu().clone() for n, p in models.student.named_parameters() if "lora_" in n}
    if models.projector is not None:
        state.update({f"projector.{n}": p.detach().cpu().clone() for n, p in models.projector.named_parameters()})
    return state


def load_trainable_state(models: RunModels, state: dict[str, torch.Tensor]) -> None:
    params = dict(models.student.named_parameters())
    if models.projector is not None:
        params.update({f"__p.{n}": p for n, p in models.projector.named_parameters()})
    with torch.no_grad():
        for key, value in state.items():
            name = key.split(".", 1)[1]
            target = params[name] if key.startswith("student.") else params[f"__p.{name}"]
            target.copy_(value.to(target.device))


def save_checkpoint(run_dir: Path, models: RunModels, optimizer, scheduler, scaler, progress: dict,
                    rng_per_rank: Optional[list[dict]] = None) -> None:
    """Atomic ``checkpoint.pt``. ``rng_per_rank``: every rank's RNG state (distributed runs), so
    each rank's dropout stream replays on resume; ``rng`` is this process's."""
    payload = {
        "trainable": trainable_state(models),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "progress": progress,
    }
    if rng_per_rank is not None:
        payload["rng_per_rank"] = rng_per_rank
    atomic_write_bytes(run_dir / CHECKPOINT, lambda h: torch.save(payload, h))


def save_adapter(run_dir: Path, models: RunModels, name: str = ADAPTER_DIR) -> Path:
    """``adapter_final/`` (or ``name``): the peft adapter (save_pretrained) plus ``projector.pt``."""
    out = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    models.student.save_pretrained(str(tmp))
    if models.projector is not None:
        torch.save(models.projector.state_dict(), tmp / PROJECTOR_FILE)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(config: TrainConfig, run_dir: str | Path | None = None, *, progress: bool = True,
          on_eval=None) -> dict:
    """Run one stage; returns the summary dict (also written to ``summary.json``).

    ``on_eval(step, metrics)`` is called after every dev evaluation (metrics: ``dev_loss`` and,
    when ``eval_wer``, ``dev_wer``); it may raise to stop the run (e.g. ``optuna.TrialPruned``).
    """
    from kdlib import distributed

    run_dir = Path(run_dir or config.run_dir or f"runs/stage{config.stage}")
    device = resolve_device(config.device)
    ctx = distributed.setup(device.type)  # torchrun / accelerate launch: one process per worker
    try:
        return _train(config, run_dir, device, ctx, progress=progress, on_eval=on_eval)
    finally:
        distributed.teardown(ctx)


def _train(config: TrainConfig, run_dir: Path, device: torch.device, ctx, *, progress: bool, on_eval) -> dict:
    from torch.utils.tensorboard import SummaryWriter
    from kdlib.progress import progress_bar

    from kdlib import data, distributed
    from kdlib.losses import DistillationLoss, TAIDSchedule
    from kdlib.models import build_optimizer, tensor_digest, trainable_report

    main = ctx.is_main  # only rank 0 writes the run folder and prints
    log = print if main else (lambda *a, **k: None)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_json(run_dir / "training_config.json", paths_relative=True)  # movable run folders
    seed_everything(config.seed)  # the same on every rank: identical initial LoRA weights
    autocast_on, autocast_dtype, use_scaler = amp_settings(config, device)

    models = build_models(config, device)
    report = trainable_report(models.student, [models.projector] if models.projector is not None else [])
    log(f"stage {config.stage} · {report}" + (f" · {ctx.world} data-parallel workers" if ctx.enabled else ""))
    if main:
        atomic_write_json(run_dir / "trainable.json", models.trainable)
    if ctx.enabled:
        seed_everything(config.seed + ctx.rank)  # from here on: a dropout stream of its own per rank

    train_set, dev_set, data_report = build_data(config, models.feature_extractor, models.tokenizer,
                                                 models.teacher_feature_extractor)
    for split, text in data_report.items():
        log(f"[{split}] {text}")
    collate = data.WhisperCollator()

    modules = [models.student] + ([models.projector] if models.projector is not None else [])
    optimizer = build_optimizer(modules, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                               lr=config.lr, min_lr=config.min_lr),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    caches = build_caches(models, config, train_set, dev_set)
    log("encoder outputs: teacher " + ("from the disk cache " + config.teacher_cache if caches.disk
                                       else "cached" if caches.teacher and caches.teacher.keep else "live")
          + ", student " + ("trains (live)" if caches.student is None else
                            "shares the teacher's (identical frozen encoder)" if caches.shared else "frozen, cached"))
    loss_fn = DistillationLoss()
    taid = TAIDSchedule(t_start=config.taid_t_start, total_steps=config.max_steps) if config.kd_kind == "taid" else None

    # ---- resume -------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "position": 0, "nonfinite_total": 0, "best_wer": None, "bad_evals": 0}
    history: list[dict] = []
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.exists():
        try:  # tensors and plain values only: a shared run folder cannot run code on load
            payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise RuntimeError(
                f"{checkpoint}: holds more than tensors and plain values (written by an older kdlib, "
                f"which pickled numpy RNG states), so it is not loaded ({str(err).splitlines()[0]}). "
                "Remove it to start the stage again, or resume with the older kdlib."
            ) from err
        load_trainable_state(models, payload["trainable"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        per_rank = payload.get("rng_per_rank")
        if ctx.enabled and per_rank is not None and len(per_rank) == ctx.world:
            set_rng_state(per_rank[ctx.rank])
        elif not ctx.enabled:
            set_rng_state(payload["rng"])
        else:  # another number of workers than the run started with: data order kept, dropout reseeded
            log(f"checkpoint has RNG states for {len(per_rank or [1])} worker(s), not {ctx.world}: reseeding dropout")
        state.update(payload["progress"])
        history_file = run_dir / "training_history.json"
        if history_file.exists():
            history = [h for h in json.loads(history_file.read_text()) if h["step"] <= state["step"]]
        if taid is not None and "taid" in state:
            taid.load_state_dict(state["taid"])
        log(f"resumed from {checkpoint} at step {state['step']} (epoch {state['epoch']}, batch {state['position']})")
    else:
        log("no checkpoint: fresh optimizer, schedule and scaler")

    writer = SummaryWriter(str(run_dir / "tb")) if main else None
    stream = batch_stream(train_set, collate, config, state["epoch"], state["position"], ctx)
    models.student.train()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    nonfinite_in_row = 0
    bar = progress_bar(total=config.max_steps, initial=state["step"], desc=f"stage {config.stage}", disable=not (progress and main))
    last_eval: dict = {}
    stopped_early = False

    while state["step"] < config.max_steps:
        step = state["step"]
        loss_fn.weights = stage_weights(config, step)
        taid_t = taid.t if taid is not None else None
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        finite = True
        for _ in range(config.grad_accum):
            epoch, position, batch = next(stream)
            if batch is None or not finite:  # an undecodable slice (distributed), or a step already lost
                continue
            # forward + loss
            parts = forward_losses(models, loss_fn, batch, device, (autocast_on, autocast_dtype),
                                   taid_t=taid_t, caches=caches)
            if not torch.isfinite(parts["total"]):
                finite = False  # the rest of this step's micro-batches are drawn and left unused
                continue
            # backward
            scaler.scale(parts["total"] / config.grad_accum).backward()
            for key, value in parts.items():
                if value is not None:
                    parts_sum[key] = parts_sum.get(key, 0.0) + float(value.detach()) / config.grad_accum
        # all-reduce (distributed: average the trainable gradients; skip together or not at all)
        finite = distributed.all_true(finite, ctx)
        if finite:
            distributed.average_gradients(params, ctx)
        # clip
        grad_norm = float("nan")
        unscaled = False  # GradScaler.update() may only follow an unscale_ (its inf checks)
        if finite:
            scaler.unscale_(optimizer)
            unscaled = True
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            finite = math.isfinite(grad_norm)
        if not finite:
            # Skip the step: no update, no schedule advance; counted, and bounded in a row.
            optimizer.zero_grad(set_to_none=True)
            if unscaled:  # overflowing gradients: the scaler lowers its scale
                scaler.update()
            nonfinite_in_row += 1
            state["nonfinite_total"] += 1
            state["epoch"], state["position"] = epoch, position
            if nonfinite_in_row >= config.max_nonfinite_in_row:
                raise TrainingDiverged(
                    f"{nonfinite_in_row} non-finite steps in a row at step {step}: stopping. "
                    f"The last good checkpoint ({checkpoint}) is intact; lower lr or check the data."
                )
            continue
        nonfinite_in_row = 0
        # step + schedule
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if taid is not None:  # distributed: every rank needs the same t, so use the mean TAID loss
            taid.update(distributed.sum_over_ranks([parts_sum["taid"]], ctx)[0] / ctx.world)
            state["taid"] = taid.state_dict()
        state.update(step=step + 1, epoch=epoch, position=position)

        # log
        record = {"step": step + 1, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "seconds": time.perf_counter() - started,
                  **{f"w_{k}": getattr(loss_fn.weights, k) for k in ("ce", "kl", "taid", "geo", "curve", "contrastive")}}
        if taid_t is not None:
            record["taid_t"] = taid_t
        record.update(parts_sum)
        history.append(record)
        if main and (step + 1) % config.log_every == 0:
            for key, value in record.items():
                if key != "step" and value is not None:
                    writer.add_scalar(f"train/{key}", value, step + 1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in parts_sum.items() if k in ("total", "ce", "kl", "geo", "contrastive")})
        bar.update(1)

        # evaluate
        if (step + 1) % config.eval_every == 0 or step + 1 == config.max_steps:
            last_eval = {"step": step + 1, "dev_loss": dev_loss(models, dev_set, collate, config, device, caches, ctx)}
            if config.eval_wer:
                last_eval.update(dev_wer(models, dev_set, config, device, ctx, caches))
            history[-1].update({k: v for k, v in last_eval.items() if k != "step"})
            for key, value in last_eval.items():
                if main and key != "step" and value is not None:
                    writer.add_scalar(f"dev/{key}", value, step + 1)
            if main:
                bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k not in ("step", "dev_utterances") and v is not None))
            metric = last_eval.get("dev_wer") if last_eval.get("dev_wer") is not None else last_eval["dev_loss"]
            if state["best_wer"] is None or metric < state["best_wer"]:
                state["best_wer"], state["bad_evals"] = metric, 0
                state["best_step"] = step + 1
                state["best_metric"] = "dev_wer" if last_eval.get("dev_wer") is not None else "dev_loss"
                if main and config.early_stopping_patience:  # the adapter early stopping hands on
                    save_adapter(run_dir, models, BEST_ADAPTER_DIR)
            else:
                state["bad_evals"] += 1
            if on_eval is not None:
                on_eval(step + 1, dict(last_eval))
            if config.early_stopping_patience and state["bad_evals"] >= config.early_stopping_patience:
                log(f"early stopping: no dev improvement in {state['bad_evals']} evaluations")
                stopped_early = True

        # checkpoint
        if (step + 1) % config.save_every == 0 or step + 1 == config.max_steps or stopped_early:
            rng_per_rank = distributed.gather_objects(rng_state(), ctx) if ctx.enabled else None
            if main:
                save_checkpoint(run_dir, models, optimizer, scheduler, scaler, dict(state), rng_per_rank)
                atomic_write_json(run_dir / "training_history.json", history)
        if stopped_early:
            break
    bar.close()
    if main:
        writer.close()
        save_adapter(run_dir, models)
        atomic_write_json(run_dir / "training_history.json", history)

    def final(key: str):
        values = [h[key] for h in history if h.get(key) is not None]
        return values[-1] if values else None

    summary = {
        "stage": config.stage,
        "steps": state["step"],
        "final_total": final("total"),
        "final_ce": final("ce"),
        "final_kl": final("kl") if config.kl_weight > 0 and config.kd_kind == "kl" else None,
        "final_geo": final("geo") if config.geo_weight > 0 and config.alignment == "point" else None,
        "final_curve": final("curve") if config.geo_weight > 0 and config.alignment == "curve" else None,
        "final_taid": final("taid") if config.kd_kind == "taid" else None,
        "final_contrastive": final("contrastive") if config.contrastive_weight > 0 else None,
        "dev_loss": last_eval.get("dev_loss"),
        "dev_wer": last_eval.get("dev_wer"),
        "dev_cer": last_eval.get("dev_cer"),
        "dev_utterances": last_eval.get("dev_utterances"),  # clips behind dev_wer / dev_cer
        "nonfinite_steps": state["nonfinite_total"],
        "stopped_early": stopped_early,
        # Which adapter load_trained / export_merged / the next stage use, from which step.
        "exported_adapter": _exported_info(config, state, last_eval),
        "trainable_report": report,
        # A pseudo-labelled training folder (kdlib.pseudo.training_folder) says which targets and
        # which WER threshold λ made it, and how many clips were kept: the run records it.
        "training_data": _training_folder_info(config),
        "world_size": ctx.world,
        # Exact fingerprint of the trained weights: equal on every rank of a distributed run.
        "trainable_digest": tensor_digest(trainable_state(models)),
    }
    if main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _exported_info(config: TrainConfig, state: dict, last_eval: dict) -> dict:
    if config.early_stopping_patience and state.get("best_step") is not None:
        return {"folder": BEST_ADAPTER_DIR, "step": state["best_step"], "metric": state["best_metric"],
                "value": state["best_wer"]}
    metric = "dev_wer" if last_eval.get("dev_wer") is not None else "dev_loss" if last_eval else None
    return {"folder": ADAPTER_DIR, "step": state["step"], "metric": metric,
            "value": last_eval.get(metric) if metric else None}


def exported_adapter(run_dir: str | Path) -> Path:
    """The adapter a run hands on: ``adapter_best/`` when early stopping kept one (the best dev
    evaluation), else ``adapter_final/``."""
    run_dir = Path(run_dir)
    best = run_dir / BEST_ADAPTER_DIR
    return best if best.is_dir() else run_dir / ADAPTER_DIR


def _training_folder_info(config: TrainConfig) -> Optional[dict]:
    info = Path(config.data_root) / "training_folder.json" if config.data_root else None
    if info is None or not info.is_file():
        return None
    try:
        return json.loads(info.read_text())
    except json.JSONDecodeError as err:
        return {"error": f"{info}: not valid JSON ({err})"}


# --------------------------------------------------------------------------------------------
# After training: the student as a plain Hugging Face model
# --------------------------------------------------------------------------------------------


def load_trained(run_dir: str | Path, *, merge: bool = True, adapter: Optional[str] = None):
    """Rebuild a run's model from ``training_config.json`` + its exported adapter
    (`exported_adapter`: ``adapter_best/`` when early stopping kept one, else ``adapter_final/``;
    ``adapter="adapter_final"`` or ``"adapter_best"`` picks one).

    Returns ``(model, tokenizer, feature_extractor, projector_or_None)``; with ``merge=True`` the
    LoRA adapters are folded into plain weights (``merge_and_unload``). ``model.kdlib_adapter``
    says which adapter was loaded (folder, step, metric, value; see ``summary.json``)."""
    from peft import PeftModel

    from kdlib.config import TrainConfig

    run_dir = Path(run_dir)
    config = TrainConfig.from_json(run_dir / "training_config.json")
    check_references(config, run_dir)
    adapter = run_dir / adapter if adapter else exported_adapter(run_dir)
    if not adapter.exists():
        raise FileNotFoundError(f"{adapter} does not exist: the run has not finished")
    teacher, student = _load_pair(config)
    owner = teacher if config.stage == 0 else student  # stage 0 trained the teacher itself
    model = PeftModel.from_pretrained(owner.model, str(adapter))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    model.kdlib_adapter = _adapter_info(run_dir, adapter.name)
    projector = None
    if (adapter / PROJECTOR_FILE).exists():
        from kdlib.models import RiemannianProjector

        state = torch.load(adapter / PROJECTOR_FILE, map_location="cpu", weights_only=True)
        projector = RiemannianProjector(state["linear.weight"].shape[1], state["linear.weight"].shape[0])
        projector.load_state_dict(state)
    return model, owner.tokenizer, owner.feature_extractor, projector


def check_references(config: TrainConfig, run_dir: Path, fields=("teacher_from",)) -> None:
    """Raise a `FileNotFoundError` naming the run, the field and the missing run it refers to
    (paths in ``training_config.json`` are relative to the run folder: a run moved without the
    runs it was built on, or one deleted, lands here)."""
    for name in fields:
        value = getattr(config, name)
        if value and not Path(value).is_dir():
            raise FileNotFoundError(
                f"{run_dir}: its training_config.json says {name} = {value} (stored relative to the run "
                "folder), and that run folder does not exist. Move or copy the runs it was built on "
                "together with it, keeping their places relative to each other, or train it again.")


def _adapter_info(run_dir: Path, folder: str) -> dict:
    """Step and dev metric of ``folder``, from ``summary.json`` (``{"folder": ...}`` only when the
    summary says nothing about it)."""
    summary_file = run_dir / "summary.json"
    info = json.loads(summary_file.read_text()).get("exported_adapter") if summary_file.is_file() else None
    return info if info and info.get("folder") == folder else {"folder": folder}


def export_merged(run_dir: str | Path, out_dir: str | Path | None = None, *, adapter: Optional[str] = None) -> Path:
    """Merge LoRA into the student and save a Hugging Face folder (model, tokenizer, feature
    extractor, generation config) that ``transformers.pipeline("automatic-speech-recognition")``
    loads. Default destination: ``<run_dir>/merged``. The adapter is the run's exported one
    (`exported_adapter`) unless ``adapter`` names another; ``kdlib_export.json`` in the folder
    says which (folder, step, dev metric and value)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "merged"
    model, tokenizer, feature_extractor, _ = load_trained(run_dir, merge=True, adapter=adapter)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    feature_extractor.save_pretrained(str(tmp))
    atomic_write_json(tmp / "kdlib_export.json", {"run_dir": str(run_dir), **model.kdlib_adapter})
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# Chapters and scripts: run a stage once, reuse it afterwards
# --------------------------------------------------------------------------------------------


# Fields that do not change what a run learns: a finished run with other values is the same run.
# (encoder_cache only decides where frozen-encoder states are kept; they are the same values.)
CADENCE_FIELDS = ("run_dir", "eval_every", "save_every", "log_every", "encoder_cache")


class RunFolderConflict(FileExistsError, ValueError):
    """A run folder holds a run of another config; it is refused, never overwritten."""


def run_stage(config: TrainConfig, run_dir: str | Path, *, reuse: bool = True, progress: bool = True,
              on_eval=None, train_fn=None, quiet: bool = False, ignore: tuple[str, ...] = ()) -> dict:
    """Train one stage into ``run_dir`` unless it already holds a finished run of this very
    config (then its ``summary.json`` is returned). A folder holding a *different* config is
    refused (`RunFolderConflict` naming the fields) rather than overwritten, and an unfinished
    run of this config resumes.

    For runners (`kdlib.tune`): ``train_fn`` replaces `train` (same signature; ``on_eval`` is
    passed only when it takes one), ``quiet`` sends the trainer's printout to
    ``<run_dir>/train.log``, and ``ignore`` names more fields left out of the comparison (the
    pipeline's folders are already keyed by their upstream, so it ignores ``init_from``)."""
    import contextlib
    import inspect

    run_dir = Path(run_dir)
    saved = run_dir / "training_config.json"
    if saved.is_file():
        skip = set(CADENCE_FIELDS) | set(ignore)
        there, now = TrainConfig.from_json(saved).absolute_paths().to_dict(), config.absolute_paths().to_dict()
        diff = {k: (there.get(k), v) for k, v in now.items() if k not in skip and there.get(k) != v}
        if diff:
            fields = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
            raise RunFolderConflict(f"{run_dir}: holds a run of another config ({fields}); "
                                    "remove the folder or use another one")
        if reuse and (run_dir / "summary.json").is_file():
            if not quiet:
                print(f"{run_dir}: finished run of this config found, reusing it")
            return json.loads((run_dir / "summary.json").read_text())
    train_fn = train_fn or train
    kwargs: dict[str, Any] = {"progress": progress}
    if on_eval is not None:
        try:
            takes_on_eval = "on_eval" in inspect.signature(train_fn).parameters
        except (TypeError, ValueError):
            takes_on_eval = False
        if takes_on_eval:
            kwargs["on_eval"] = on_eval
    if not quiet:
        return train_fn(config, run_dir, **kwargs)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a", encoding="utf-8") as logfile, \
            contextlib.redirect_stdout(logfile), contextlib.redirect_stderr(logfile):
        return train_fn(config, run_dir, **kwargs)


def finished_run(run_dir: str | Path, preset: Optional[str] = None) -> bool:
    """Does ``run_dir`` hold a finished run (``adapter_final/`` + config), of ``preset`` if given?
    Chapters use it to decide whether an earlier chapter's run can be built on."""
    run_dir = Path(run_dir)
    config_file = run_dir / "training_config.json"
    if not ((run_dir / ADAPTER_DIR).exists() and config_file.exists()):
        return False
    return preset is None or TrainConfig.from_json(config_file).preset == preset


def final_dev_scores(run_dir: str | Path) -> Optional[dict]:
    """A finished run's last dev evaluation, ``{"wer", "cer", "n"}`` (greedy, Whisper basic
    normaliser, ``n`` clips), from ``summary.json``; ``None`` when the run scored no dev WER.
    Chapters report it instead of decoding the same model again."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    if summary.get("dev_wer") is None or not summary.get("dev_utterances"):
        return None
    return {"wer": summary["dev_wer"], "cer": summary["dev_cer"], "n": summary["dev_utterances"]}


def load_history(run_dir: str | Path) -> list[dict]:
    """``training_history.json`` of a run: one dict per optimizer step."""
    return json.loads((Path(run_dir) / "training_history.json").read_text())


def untrained_student(config: TrainConfig):
    """The student of ``config`` before any training: ``(model, tokenizer, feature_extractor)``."""
    _, student = _load_pair(config)
    return student.model.eval(), student.tokenizer, student.feature_extractor


def teacher_model(config: TrainConfig):
    """The teacher of ``config`` (adapted by ``teacher_from`` when set): ``(model, tokenizer, fe)``."""
    teacher, _ = _load_pair(config)
    return teacher.model.eval(), teacher.tokenizer, teacher.feature_extractor
