"""Every knob of a distillation run in one dataclass, with presets and JSON in and out.

A run is described completely by a `TrainConfig`; it is saved as ``training_config.json`` in the
run folder, so any result can be traced back to the exact settings that produced it. Presets:

- ``smoke``: the tiny random teacher/student pair (real tokenizer), a few steps, seconds; tests.
- ``demo``: real whisper-base teacher (offline weights) → ``distil-base`` student built from it,
  LoRA + projector, the embedded Italian corpus, CPU, minutes. Every chapter's default.
- ``distil``: distil-whisper's recipe on the demo pair (frozen shared encoder, 4 of the 6 decoder
  layers, 0.8·CE + KL·T² at T = 2); stage 1 only.
- ``thesis``: whisper-large-v3 → whisper-small on MLS Italian, batch 64, 8,000 steps, the pilot's
  loss weights; runs unchanged on a CUDA machine with a Hugging Face hub.
- ``thesis-tiny``: the thesis pair's structure (v3-shaped teacher, 128 vs 80 mel bins, 51,866 vs
  51,865 tokens) and machinery (fp16 + GradScaler, checkpointing, workers), batches of 2 clips; CI.

Overrides (papermill parameters, ``--set field=value``) are checked before any work starts: an
unknown field or a value of the wrong type is a `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kdlib.files import atomic_write_text


class ConfigError(ValueError):
    """A configuration field is unknown or has a value of the wrong type."""


@dataclass
class TrainConfig:
    # --- identity -------------------------------------------------------------------------
    preset: str = "demo"
    stage: int = 1  # 0: teacher adaptation, 1: KD, 2: representation alignment, 3: decoder FT
    seed: int = 0
    run_dir: Optional[str] = None
    init_from: Optional[str] = None  # previous stage's run folder (its exported adapter is loaded)
    # Stages II and III build on the stage before them; without init_from they are refused unless
    # this says so (an ablation that skips a stage must ask for it: nothing trains silently from
    # an untrained student).
    from_untrained: bool = False

    # --- models ---------------------------------------------------------------------------
    # HF id, local folder, offline name, "tiny-random", or "tiny-random-v3" (a tiny teacher that
    # disagrees with the student like large-v3 with small: 128 mels, 51,866 tokens; for tests)
    teacher: str = "whisper-base"
    teacher_from: Optional[str] = None  # a stage-0 run folder whose adapted teacher replaces it
    student: str = "distil-base"  # "distil-base": built from the teacher; or an HF id / folder
    student_encoder_layers: Optional[int] = None  # None: keep all teacher encoder layers
    student_decoder_layers: int = 2  # maximally spaced teacher decoder layers (first, last)
    # Student shape (kdlib.models: set_encoder_window, merge_encoder_frames). Whisper's encoder
    # always sees 30 s (1500 frames). A window of W s gives 50·W frames and stays a standard
    # Whisper (transformers, pipeline, CTranslate2); clips longer than W are skipped at scan time
    # and counted. Merging k frames after encoder layer j (the thesis notes' 3:1) shortens what
    # later layers and the decoder read; CTranslate2 cannot convert it (transformers only).
    student_window_seconds: Optional[int] = None  # None: 30 s; demo: 10 (500 frames, T ~ 499)
    student_frame_factor: int = 1  # k: merge k encoder frames into one inside the encoder
    student_merge_layer: Optional[int] = None  # j: merge after this encoder layer (None: middle)
    language: str = "it"
    task: str = "transcribe"

    # --- LoRA and projector ---------------------------------------------------------------
    lora_preset: str = "qkv_all"
    # Does the student's encoder train in this stage? None: yes in stages 0-II, no in stage III.
    # A frozen encoder's outputs are computed once per utterance and reused (encoder_cache).
    train_encoder: Optional[bool] = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    projector: bool = True

    # --- data -----------------------------------------------------------------------------
    data_root: Optional[str] = None  # MLS language folder; None: the embedded corpus
    train_split: str = "train"
    dev_split: str = "dev"
    max_train_utterances: Optional[int] = None
    max_dev_utterances: Optional[int] = None
    min_duration: float = 1.0  # seconds
    max_duration: float = 30.0  # seconds
    batch_size: int = 8
    grad_accum: int = 1
    num_workers: int = 0
    pin_memory: bool = False  # page-locked batches for a fast host → GPU copy (CUDA only; ignored on CPU)
    length_grouped: bool = True
    # "memory": frozen encoders (the teacher's always; the student's when it does not train) run
    # once per utterance and their outputs are kept in RAM (1500 x d_model floats per clip: fine
    # for the embedded corpus, not for MLS at thesis scale). "disk": the same, and the outputs are
    # also kept in ~/.cache/kdlib/encoder_states (or $KDLIB_CACHE), keyed by the encoder's exact
    # weights, so every later run with the same frozen encoder (another stage, a control run,
    # another chapter) reads them instead of running the encoder. "off": recompute every step.
    encoder_cache: str = "memory"
    # Offline KD: a folder written by `python -m kdlib cache-teacher` (kdlib.teacher_cache). The
    # teacher's encoder states and top-k logits are read from it instead of running the teacher;
    # the KL becomes kdlib.losses.kl_divergence_topk. A cache of another teacher or data is refused.
    teacher_cache: Optional[str] = None

    # --- optimisation ---------------------------------------------------------------------
    max_steps: int = 60
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 6
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    # auto: fp16+GradScaler on CUDA (bf16 if supported and amp_dtype=bf16), fp32 on CPU. "fp16" on
    # CPU: autocast + torch's CPU GradScaler, the thesis' GPU path in CI (thesis-tiny); the autocast
    # dtype is bf16 on a CPU that emulates fp16 matmuls (5x slower; kdlib.models.amp_settings).
    amp: str = "auto"
    amp_dtype: str = "fp16"  # fp16 | bf16
    grad_checkpointing: bool = False
    max_nonfinite_in_row: int = 5

    # --- loss -----------------------------------------------------------------------------
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    kl_warmup_steps: int = 0  # KL weight ramps linearly 0 → kl_weight over these steps
    temperature: float = 2.0
    kd_kind: str = "kl"  # kl | taid
    taid_t_start: float = 0.4
    geo_weight: float = 1.0
    geo_kind: str = "geodesic"  # geodesic | mse
    alignment: str = "point"  # point | curve
    contrastive_weight: float = 0.5
    contrastive_temperature: float = 0.07
    contrastive_final_weight: Optional[float] = None  # stage III: decays linearly to this

    # --- evaluation, logging, checkpoints ---------------------------------------------------
    eval_every: int = 20
    eval_wer: bool = True
    # Greedy decoding for dev WER stops here: an untrained student can repeat itself up to
    # Whisper's 224-token limit on every clip, which costs minutes on a CPU for no information.
    eval_max_new_tokens: int = 224
    log_every: int = 1
    save_every: int = 20
    early_stopping_patience: Optional[int] = None  # also keeps adapter_best/, which is then exported
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    teacher_device: Optional[str] = None  # None: same as device

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path, *, paths_relative: bool = False) -> None:
        """Write the config as JSON. ``paths_relative=True`` (a run folder's
        ``training_config.json``): the `PATH_FIELDS` are written relative to the file's folder
        and listed under ``RELATIVE_KEY``, so `from_json` finds them from any working directory
        and after the runs are moved together."""
        values = self.to_dict()
        if paths_relative:
            folder = os.path.abspath(Path(path).parent)
            relative = [name for name in PATH_FIELDS if _is_path(name, values[name])]
            for name in relative:
                values[name] = os.path.relpath(os.path.abspath(os.path.expanduser(values[name])), folder)
            values[RELATIVE_KEY] = relative
        atomic_write_text(path, json.dumps(values, indent=2, sort_keys=False) + "\n")

    def absolute_paths(self) -> "TrainConfig":
        """A copy with every path field absolute (relative ones taken from the working
        directory): the form in which configs written from two folders compare equal."""
        changes = {name: os.path.abspath(os.path.expanduser(getattr(self, name)))
                   for name in PATH_FIELDS if _is_path(name, getattr(self, name))}
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return replace(cls(), **values)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        folder = os.path.abspath(Path(path).parent)
        for name in values.pop(RELATIVE_KEY, None) or ():  # written relative to this folder
            if values.get(name) is not None:
                values[name] = os.path.normpath(os.path.join(folder, values[name]))
        return cls.from_dict(values)


# Fields that hold paths. A run folder's training_config.json stores them relative to the run
# folder (`TrainConfig.to_json(paths_relative=True)`): chapters run with --cwd notebooks, and
# run folders get moved and copied between machines. teacher/student count only when they name
# a local folder (not an offline name or a hub id).
PATH_FIELDS = ("run_dir", "init_from", "teacher_from", "data_root", "teacher_cache", "teacher", "student")
RELATIVE_KEY = "paths_relative_to_this_folder"


def _is_path(name: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    if name in ("teacher", "student"):
        return Path(value).expanduser().is_dir()
    return True


# Which loss terms each stage switches on; the preset sets their magnitudes. A term a stage does
# not use has its weight set to 0 (an explicit override can still switch it back on: that is
# how an ablation such as "no stage II" or "KL in stage II" is a config diff, not a code fork).
STAGE_TERMS: dict[int, tuple[str, ...]] = {
    0: ("ce",),  # teacher adaptation: plain fine-tuning of the teacher on the training split
    1: ("ce", "kl"),  # knowledge distillation
    2: ("ce", "geo", "contrastive"),  # representation alignment through the projector
    3: ("ce", "kl", "contrastive"),  # decoder fine-tuning; contrastive only if the encoder trains (make_config)
}
#: The config field of each stage-switched term: ``<term>_weight`` (a naming rule, checked here).
TERM_WEIGHTS = {term: f"{term}_weight" for term in sorted({t for terms in STAGE_TERMS.values() for t in terms})}
assert all(name in TrainConfig.__dataclass_fields__ for name in TERM_WEIGHTS.values()), TERM_WEIGHTS

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "teacher": "tiny-random",
        "student": "tiny-random",
        "max_train_utterances": 8,
        "max_dev_utterances": 4,
        "batch_size": 4,
        "max_steps": 4,
        "warmup_steps": 1,
        "eval_every": 2,
        "save_every": 2,
        "eval_wer": False,
        "eval_max_new_tokens": 8,
        "lora_r": 4,
        "lora_alpha": 8,
    },
    # Embedded clips last at most ~10 s (under 50 tokens). See PRESET_STAGE for per-stage choices.
    # LoRA on q,k,v,out of every attention at rank 32 and lr 3e-3: the 2-layer student decoder
    # starts far from the teacher (it only repeats <|it|>), and rank 8 on q,k,v at 1e-3 left its
    # CE near 5.6 nats after 30 steps where this reaches ~1.5 (measured on the demo, stage I).
    # Dev WER only at the end of a demo run (eval_every = max_steps): a greedy pass over the 20
    # dev clips costs about as much as 10 training steps on the 2-core CPU, and the chapters
    # report the final value from summary.json instead of decoding the same model again.
    # The demo student reads a 10 s window: 500 encoder frames instead of 1500 (the thesis notes'
    # T ~ 499), a standard Whisper that CTranslate2 runs. Every embedded clip is under 10 s. It
    # keeps the teacher's 6 decoder layers: measured on the demo (stage I, seed 0, dev), 6 layers
    # reach WER 0.425 / CER 0.152 against the adapted teacher's 0.420 / 0.167, where 4 layers
    # reach 0.575 / 0.270; the window alone makes it ~3x faster in transformers (benchmarks/).
    "demo": {"eval_max_new_tokens": 64, "eval_every": 60, "save_every": 10, "lr": 3e-3, "encoder_cache": "disk",
             "lora_r": 32, "lora_alpha": 64, "lora_preset": "qkvo_all",
             "student_window_seconds": 10, "student_decoder_layers": 6},
    # distil-whisper's recipe (arXiv 2311.00430, its training code) at demo size: the student
    # keeps the teacher's whole encoder, frozen and shared (the teacher's decoder reads the
    # student's encoder states: one encoder forward per batch), and N maximally spaced decoder
    # layers (first and last kept); loss 0.8·CE + 1.0·KL·T² at T = 2 over real tokens, no
    # warm-up, no projector. One deviation: distil-whisper trains the whole decoder, here LoRA on
    # every decoder linear layer trains (``decoder_all``). Stage 1 only.
    # N = 4 of whisper-base's 6 (layers 0, 1, 3, 5), as distil-small.en keeps 4 of whisper-small's
    # 12. Measured on 48 pseudo-labelled demo clips: 2 layers (distil-large's N) still loop after
    # 120 steps (dev WER 1.03, CER 0.68); 4 layers reach WER 0.68-0.76, CER 0.33-0.40 in 40.
    "distil": {"eval_max_new_tokens": 64, "eval_every": 60, "save_every": 10, "lr": 3e-3, "encoder_cache": "disk",
               "lora_r": 32, "lora_alpha": 64, "lora_preset": "decoder_all", "train_encoder": False,
               "ce_weight": 0.8, "kl_weight": 1.0, "temperature": 2.0, "kl_warmup_steps": 0,
               "projector": False, "student_decoder_layers": 4},
    # The thesis student reads ~500 frames (the notes' T ~ 499): MLS segments last up to ~20 s,
    # longer than a 10 s window, so it keeps the 30 s window and merges 3 frames into one after
    # encoder layer 5 of 12 (the middle): layers 6-11 and the decoder read 500 frames. Projected
    # from FLOPs (benchmarks/flops_projection.py, 60 tokens): 10.6x fewer than large-v3, against
    # 6.6x for whisper-small unmerged. A merged student runs in transformers, not CTranslate2.
    "thesis": {
        "teacher": "openai/whisper-large-v3",
        "student": "openai/whisper-small",
        "student_frame_factor": 3,
        "student_merge_layer": 5,
        "data_root": "data/mls_italian_opus",
        "batch_size": 64,
        "max_steps": 8000,
        "lr": 2.6e-4,
        "weight_decay": 0.01,
        "betas": (0.9, 0.999),
        "warmup_steps": 1000,
        "min_lr": 1e-6,
        "amp": "auto",
        "amp_dtype": "fp16",
        "grad_clip": 1.0,
        "temperature": 2.0,
        "kl_weight": 0.020584,
        "kl_warmup_steps": 1000,
        "geo_weight": 0.969909,
        "eval_every": 500,
        "save_every": 250,
        "num_workers": 8,
        "pin_memory": True,
        "lora_r": 32,
        "lora_alpha": 64,
        "early_stopping_patience": 5,
        "encoder_cache": "off",
    },
}

# Per (preset, stage) choices. On a 2-core CPU a Whisper encoder forward+backward over 30 s
# clips costs seconds per clip, so the demo trains the student's encoder only where the stage
# is about the encoder (II: representation alignment) and otherwise reuses cached encoder
# outputs; the thesis preset trains encoder LoRA in stages 0-II as the thesis does.
PRESET_STAGE: dict[tuple[str, int], dict[str, Any]] = {
    # 30 steps (2.5 epochs of the 96 train clips): adapted, the teacher's dev WER falls from 0.58;
    # 40 steps cost chapter 05 another 20 s for a teacher that has memorised the train split anyway.
    ("demo", 0): {"train_encoder": False, "max_steps": 30},
    ("demo", 1): {"train_encoder": False},
    # Stage II moves the student's encoder: at the demo's lr 3e-3 with contrastive 0.5 it moved
    # *away* from the teacher (mean geodesic 0.16 -> 0.56 rad over 12 steps; dev WER 0.39 -> 0.68,
    # seed 0): with 4 utterances a batch the contrastive term keeps rewarding utterance means
    # spread further apart than the teacher's, and the large step follows it. lr 3e-4 with
    # contrastive 0.1 aligns: geodesic 0.19 -> 0.14 rad (first/last quarter), dev WER 0.393 -> 0.393,
    # CER 0.156 -> 0.144 (measured, seed 0; lr 3e-4 with contrastive 0.5: WER 0.420).
    ("demo", 2): {"batch_size": 4, "max_steps": 12, "eval_every": 12, "save_every": 6, "lr": 3e-4,
                  "contrastive_weight": 0.1},
    # Stage III fine-tunes the decoder that stage I already trained for 60 steps at 3e-3. At that
    # lr again it over-trains the 96 clips: dev loss 0.726 -> 0.749, dev WER 0.393 -> 0.416 (seed 0).
    # At lr 3e-4 (stage II's): dev loss 0.726 -> 0.705, dev WER 0.393 -> 0.388, CER 0.146 (measured,
    # seed 0, chosen on dev).
    ("demo", 3): {"train_encoder": False, "lr": 3e-4},
}


# ``thesis-tiny``: the thesis pair's every structural difference at tiny width, for CPU and CI.
# Teacher: large-v3's vocabulary layout and names (51,866 tokens, ``<|yue|>`` at 50,358), 128 mel
# bins; student: a model of its own (not built from the teacher) with pre-v3 names, 80 mel bins,
# its own tokenizer and feature extractor, 3:1 frame pooling. The thesis' training machinery is on:
# a teacher saved and loaded in float16 (as large-v3's config names it; `models.tiny_random_named`),
# fp16 autocast with an enabled GradScaler (torch's CPU GradScaler here), gradient checkpointing,
# early stopping, 2 DataLoader workers with pin_memory, no encoder cache, the pilot's loss weights.
# Sizes are below smoke's: fp16 matrix products on a CPU run at about half fp32's speed, so batches
# of 2 clips and 2 dev clips (a run of 4 steps: ~40 s at batch 4, ~24 s at 2, measured on the 2-core
# CI machine). ``python -m kdlib train --preset thesis-tiny``.
PRESETS["thesis-tiny"] = {
    **{k: v for k, v in PRESETS["thesis"].items() if k not in ("teacher", "student", "data_root")},
    "student_merge_layer": 0,  # the tiny student's encoder has 2 layers: merge 3:1 after the first
    "teacher": "tiny-random-v3",
    "student": "tiny-random",
    "amp": "fp16",
    "grad_checkpointing": True,
    "early_stopping_patience": 2,
    "num_workers": 2,
    "pin_memory": True,
    "max_train_utterances": 8, "max_dev_utterances": 2, "batch_size": 2,
    "max_steps": 4, "warmup_steps": 1, "kl_warmup_steps": 1, "eval_every": 2, "save_every": 2,
    "eval_max_new_tokens": 4, "lr": 1e-3, "lora_r": 4, "lora_alpha": 8,
}
# Stage 0 at thesis size: encoder LoRA on large-v3 at batch 64 does not fit next to its
# activations, so the teacher adapts its decoder only (the encoder runs without a graph), and not
# its cross-attention k/v, whose LoRA reads all 1500 encoder frames in each of 32 layers:
# benchmarks/stage0_memory.py measured 46.1 MiB per layer per clip with decoder_all against 31.1
# with decoder_no_cross_kv (fp32, 100 tokens), projected at fp16 x 32 layers x 64 clips + the
# weights to 49 and 34 GiB (issue 25).
PRESET_STAGE.update({
    ("thesis", 0): {"train_encoder": False, "lora_preset": "decoder_no_cross_kv"},
    ("thesis-tiny", 0): {"train_encoder": False, "lora_preset": "decoder_no_cross_kv"},
})


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Check (and gently convert) one value against its annotated type."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of `config` with `changes`, each checked: unknown names and wrong types raise."""
    kinds = _field_types()
    checked = {}
    for name, value in changes.items():
        if name not in kinds:
            close = difflib.get_close_matches(name, kinds, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config field {name!r}{hint}")
        checked[name] = _coerce(name, value, kinds[name])
    new = dataclasses.replace(config, **checked)
    validate(new)
    return new


def validate(config: TrainConfig) -> None:
    """Checks that need more than a type: choices and ranges."""
    choices = {
        "amp": ("auto", "fp16", "bf16", "fp32"),
        "amp_dtype": ("fp16", "bf16"),
        "kd_kind": ("kl", "taid"),
        "geo_kind": ("geodesic", "mse"),
        "encoder_cache": ("memory", "disk", "off"),
        "alignment": ("point", "curve"),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name}: {getattr(config, name)!r} is not one of {allowed}")
    if config.stage not in STAGE_TERMS:
        raise ConfigError(f"stage: {config.stage} is not one of {sorted(STAGE_TERMS)}")
    if config.preset not in PRESETS:
        raise ConfigError(f"preset: {config.preset!r} is not one of {sorted(PRESETS)}")
    # Cadences divide the step count and counts size loops: 0 would fail mid-run (ZeroDivisionError
    # after the models are built), so every one of them is refused here, before anything loads.
    for name in ("batch_size", "grad_accum", "max_steps", "lora_r", "eval_every", "save_every", "log_every",
                 "max_nonfinite_in_row"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0:  # also NaN
        raise ConfigError(f"lr: must be positive, got {config.lr}")
    if not 0 <= config.min_lr <= config.lr:
        raise ConfigError(f"min_lr: must be in [0, lr = {config.lr}], got {config.min_lr}")
    for name in ("warmup_steps", "kl_warmup_steps", "num_workers", "weight_decay"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name}: must be at least 0, got {getattr(config, name)}")
    if not config.grad_clip > 0:
        raise ConfigError(f"grad_clip: must be positive, got {config.grad_clip}")
    if not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"lora_dropout: must be in [0, 1), got {config.lora_dropout}")
    if config.early_stopping_patience is not None and config.early_stopping_patience < 1:
        raise ConfigError(f"early_stopping_patience: must be at least 1 (or None), got {config.early_stopping_patience}")
    if config.temperature <= 0:
        raise ConfigError(f"temperature: must be positive, got {config.temperature}")
    if config.student_window_seconds is not None and not 1 <= config.student_window_seconds <= 30:
        raise ConfigError(f"student_window_seconds: must be 1..30, got {config.student_window_seconds}")
    if config.student_frame_factor < 1:
        raise ConfigError(f"student_frame_factor: must be at least 1, got {config.student_frame_factor}")
    if config.min_duration >= config.max_duration:
        raise ConfigError("min_duration must be below max_duration")
    if config.teacher_cache and config.kd_kind == "taid":
        raise ConfigError("teacher_cache: TAID needs the teacher's full logits; a teacher cache keeps the top k "
                          "(use kd_kind=kl or the live teacher)")


def parse_override(text: str) -> tuple[str, Any]:
    """``"lr=3e-4"`` → ``("lr", 3e-4)``; values are read as JSON, else kept as strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected field=value")
    name, raw = text.split("=", 1)
    raw = raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        lowered = raw.lower()
        value = {"true": True, "false": False, "none": None, "null": None}.get(lowered, raw)
    return name.strip(), value


def make_config(preset: str = "demo", stage: int = 1, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> TrainConfig:
    """Preset → stage defaults → explicit overrides (dict, then ``field=value`` strings)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    if stage not in STAGE_TERMS:
        raise ConfigError(f"stage: {stage} is not one of {sorted(STAGE_TERMS)}")
    if preset == "distil" and stage != 1:
        raise ConfigError(f"preset 'distil' is distil-whisper's one-stage recipe: stage must be 1, got {stage}")
    config = replace(TrainConfig(), preset=preset, stage=stage, **PRESETS[preset])
    stage_changes: dict[str, Any] = {
        weight: 0.0 for term, weight in TERM_WEIGHTS.items() if term not in STAGE_TERMS[stage]
    }
    stage_changes.update(PRESET_STAGE.get((preset, stage), {}))
    if stage == 0:
        stage_changes["projector"] = False
    if stage == 3:
        # Stage III's contrastive term reaches the student only through its encoder. With the
        # encoder frozen (the default) its gradient trains the projector alone, which no later
        # stage and no exported model uses: it is dropped (chapter 07 shows the measurement).
        # With ``train_encoder=True`` it stays on and decays linearly to 0.1.
        wanted = {**stage_changes, **(overrides or {})}
        if wanted.get("train_encoder", config.train_encoder) is True:
            if config.contrastive_final_weight is None:
                stage_changes["contrastive_final_weight"] = 0.1
        else:
            stage_changes["contrastive_weight"] = 0.0
    config = replace(config, **stage_changes)
    if overrides:
        config = replace(config, **overrides)
    for text in sets or []:
        name, value = parse_override(text)
        config = replace(config, **{name: value})
    return config
