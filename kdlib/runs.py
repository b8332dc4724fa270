"""Run folders: what a stage builds, saves and hands on, and how a finished run is loaded again.

A run folder is the unit of this book's work (the thesis layout; `kdlib.train` writes it):
``training_config.json`` (the exact `TrainConfig`; paths stored relative to the folder, so runs
move together), ``checkpoint.pt`` (trainable weights, optimizer, scheduler, scaler, RNG states,
progress; tensors and plain values only, so it loads with ``weights_only=True``),
``checkpoint.prev.pt`` (the checkpoint before it), ``adapter_final/`` and, with early stopping,
``adapter_best/`` (peft adapter + ``projector.pt`` + ``digests.json``), ``training_history.json``,
``summary.json``, ``trainable.json`` and ``tb/``. Checkpoints and adapters carry digests, checked
on every load (`read_checkpoint`, `checked_adapter`).

This module owns

* building a stage: `load_pair` (teacher and base student of a config), `build_models` (LoRA,
  projector, what trains: `set_trainable`), `build_data` (train and dev sets);
* saving: RNG states (`rng_state`), `save_checkpoint` / `load_checkpoint`, `save_adapter`;
* lineage: `exported_adapter` (which adapter a run hands on), `check_references` (a run whose
  upstream run is missing says so), `reusable_run` (a finished run of the same config is reused, a
  folder of another config refused);
* loading: `load_trained`, `export_merged`, `untrained_student`, `teacher_model`,
  `final_dev_scores`, `load_history`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdlib import data, models
from kdlib.config import TrainConfig
from kdlib.losses import TERMS
from kdlib.models import RiemannianProjector, RunModels, resolve_device
from kdlib.files import (DamagedFile, atomic_write_json, check_folder_digests, exclusive, fresh_tmp_dir, read_checked,
                         replace_dir, shown, write_checked, write_folder_digests)

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the one before: the fallback when checkpoint.pt is damaged
ADAPTER_DIR = "adapter_final"
BEST_ADAPTER_DIR = "adapter_best"  # with early stopping: the adapter of the best dev evaluation
PROJECTOR_FILE = "projector.pt"
HISTORY = "training_history.json"


# --------------------------------------------------------------------------------------------
# Building a stage: models and data
# --------------------------------------------------------------------------------------------


def load_pair(config: TrainConfig):
    """Teacher bundle and the base (un-adapted) student bundle for this config. The student
    bundle carries the student's own tokenizer and feature extractor (they differ from the
    teacher's for the thesis pair); a student built from the teacher shares the teacher's."""
    if config.teacher in models.TINY_RANDOM:
        teacher, student = models.tiny_random_named(config.teacher, seed=config.seed)
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
    teacher_bundle, student_bundle = load_pair(config)
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

        student = PeftModel.from_pretrained(base_student, str(checked_adapter(init_adapter)), is_trainable=True)
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
        if split == config.train_split and not utterances:  # a run on nothing would wait forever for a batch
            raise data.NoUsableData(f"{root / split}: no usable training clips ({result.report()}); "
                                    "check data_root and the skip reasons")
    # safe=True: a file that breaks after the scan is dropped and counted, not a crash mid-run.
    train_set = data.MLSDataset(scans[config.train_split][0], feature_extractor, tokenizer, task=config.task,
                                safe=True, teacher_feature_extractor=teacher_feature_extractor)
    dev_set = data.MLSDataset(scans[config.dev_split][0], feature_extractor, tokenizer, task=config.task,
                              safe=True, teacher_feature_extractor=teacher_feature_extractor)
    report = {split: result.report() for split, (_, result) in scans.items()}
    return train_set, dev_set, report


# --------------------------------------------------------------------------------------------
# Saving: RNG states, checkpoints, adapters
# --------------------------------------------------------------------------------------------


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
    """``checkpoint.pt``, written atomically with its digest (`kdlib.files.write_checked`: it still
    loads with ``torch.load``); once it is complete, the one it replaces becomes
    ``checkpoint.prev.pt``, so the last two are kept. The space is checked before anything moves. ``rng_per_rank``: every rank's RNG state
    (distributed runs), so each rank's dropout stream replays on resume; ``rng`` is this process's."""
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
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    run_dir = Path(run_dir)
    write_checked(run_dir / CHECKPOINT, buffer.getvalue(), previous=run_dir / PREVIOUS_CHECKPOINT,
                  advice=f"the last checkpoint ({CHECKPOINT}) is intact; free space and rerun the same command")


def has_checkpoint(run_dir: str | Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in (CHECKPOINT, PREVIOUS_CHECKPOINT))


def read_checkpoint(run_dir: str | Path, log=print) -> dict:
    """The newest good checkpoint's payload: ``checkpoint.pt`` if its digest holds, else (with a
    message naming what is wrong) ``checkpoint.prev.pt``; `DamagedFile` when neither is good.

    Loaded with ``weights_only=True``: tensors and plain values only, so a shared run folder cannot
    run code."""
    run_dir = Path(run_dir)
    problems = []
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = run_dir / name
        if not path.exists():
            problems.append(f"{name} does not exist")
            continue
        try:
            payload = torch.load(io.BytesIO(read_checked(path)), map_location="cpu", weights_only=True)
        except DamagedFile as err:
            problems.append(str(err))
            continue
        except pickle.UnpicklingError as err:  # a good digest and a pickle inside: not ours to run
            problems.append(f"{path}: holds more than tensors and plain values, so it is not loaded "
                            f"({str(err).splitlines()[0]})")
            continue
        if problems:
            log(f"{'; '.join(problems)}: resuming from the previous checkpoint, {shown(path)}")
        return payload
    raise DamagedFile(f"{run_dir}: no checkpoint can be loaded ({'; '.join(problems)}). Remove "
                      f"{CHECKPOINT} and {PREVIOUS_CHECKPOINT} to train the stage again from its start.")


def save_adapter(run_dir: Path, models: RunModels, name: str = ADAPTER_DIR) -> Path:
    """``adapter_final/`` (or ``name``): the peft adapter (save_pretrained) plus ``projector.pt``,
    with ``digests.json`` (sha256 of each file), all moved into place together."""
    tmp = fresh_tmp_dir(run_dir / name)
    models.student.save_pretrained(str(tmp))
    if models.projector is not None:
        torch.save(models.projector.state_dict(), tmp / PROJECTOR_FILE)
    write_folder_digests(tmp)
    return replace_dir(tmp, run_dir / name)


def load_checkpoint(run_dir: Path, models: RunModels, optimizer, scheduler, scaler, state: dict, ctx,
                    log=print) -> tuple[dict, list[dict]]:
    """Resume from the newest good checkpoint (`read_checkpoint`): trainable weights, optimizer,
    scheduler, scaler and RNG states restored in place; returns ``(progress state, training history
    up to its step)``. Distributed: each rank takes its own RNG state when the worker count is
    unchanged."""
    payload = read_checkpoint(run_dir, log)
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
    state = {**state, **payload["progress"]}
    history = []
    if (Path(run_dir) / HISTORY).exists():
        history = [h for h in load_history(run_dir) if h["step"] <= state["step"]]
    log(f"resumed from {shown(run_dir)} at step {state['step']} (epoch {state['epoch']}, batch {state['position']})")
    return state, history


def checked_adapter(folder: Path) -> Path:
    """``folder`` after `kdlib.files.check_folder_digests` (`DamagedFile` when a file changed)."""
    check_folder_digests(folder)
    return folder


# --------------------------------------------------------------------------------------------
# Lineage: which adapter a run hands on, which runs it was built on
# --------------------------------------------------------------------------------------------


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


def note_evaluation(state: dict, evaluation: dict) -> bool:
    """Record a dev evaluation in the run's progress ``state`` (saved in the checkpoint): the best
    so far (dev WER, else dev loss: ``best_wer``, ``best_step``, ``best_metric``) and the
    evaluations in a row without improvement (``bad_evals``, early stopping's count). True when
    this evaluation is the new best."""
    metric = "dev_wer" if evaluation.get("dev_wer") is not None else "dev_loss"
    value = evaluation[metric]
    if state["best_wer"] is not None and not value < state["best_wer"]:
        state["bad_evals"] += 1
        return False
    state.update(best_wer=value, bad_evals=0, best_step=evaluation["step"], best_metric=metric)
    return True


def exported_info(config: TrainConfig, state: dict, last_eval: dict) -> dict:
    if config.early_stopping_patience and state.get("best_step") is not None:
        return {"folder": BEST_ADAPTER_DIR, "step": state["best_step"], "metric": state["best_metric"],
                "value": state["best_wer"]}
    metric = "dev_wer" if last_eval.get("dev_wer") is not None else "dev_loss" if last_eval else None
    return {"folder": ADAPTER_DIR, "step": state["step"], "metric": metric,
            "value": last_eval.get(metric) if metric else None}


def run_summary(config: TrainConfig, state: dict, history: list[dict], last_eval: dict, stopped_early: bool,
                report: str, world: int, digest: str, placement: Optional[dict] = None) -> dict:
    """``summary.json`` of a finished stage: last loss parts, last dev scores, what was exported."""
    def final(key: str):
        values = [h[key] for h in history if h.get(key) is not None]
        return values[-1] if values else None

    def weighted(term: str) -> bool:  # the term had a weight in some step of the run
        return any((h.get(f"w_{term}") or 0) > 0 for h in history)

    summary = {
        "stage": config.stage,
        "steps": state["step"],
        "final_total": final("total"),
        # final_<term> for every loss term (kdlib.losses.TERMS); None for a term the run did not use
        **{f"final_{term}": final(term) if weighted(term) else None for term in TERMS},
        "dev_loss": last_eval.get("dev_loss"),
        "dev_wer": last_eval.get("dev_wer"),
        "dev_cer": last_eval.get("dev_cer"),
        "dev_utterances": last_eval.get("dev_utterances"),  # clips behind dev_wer / dev_cer
        "nonfinite_steps": state["nonfinite_total"],
        "stopped_early": stopped_early,
        # Which adapter load_trained / export_merged / the next stage use, from which step.
        "exported_adapter": exported_info(config, state, last_eval),
        "trainable_report": report,
        # A pseudo-labelled training folder (kdlib.pseudo.training_folder) says which targets and
        # which WER threshold λ made it, and how many clips were kept: the run records it.
        "training_data": _training_folder_info(config),
        "world_size": world,
        # Where the teacher, the student and the projector ran, in which dtype (models.placement)
        "placement": placement or {},
        # Exact fingerprint of the trained weights: equal on every rank of a distributed run.
        "trainable_digest": digest,
    }
    return summary


# --------------------------------------------------------------------------------------------
# Loading a finished run
# --------------------------------------------------------------------------------------------


def load_trained(run_dir: str | Path, *, merge: bool = True, adapter: Optional[str] = None):
    """Rebuild a run's model from ``training_config.json`` + its exported adapter
    (`exported_adapter`: ``adapter_best/`` when early stopping kept one, else ``adapter_final/``;
    ``adapter="adapter_final"`` or ``"adapter_best"`` picks one).

    Returns ``(model, tokenizer, feature_extractor, projector_or_None)``; with ``merge=True`` the
    LoRA adapters are folded into plain weights (``merge_and_unload``). ``model.kdlib_adapter``
    says which adapter was loaded (folder, step, metric, value; see ``summary.json``)."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    config = TrainConfig.from_json(run_dir / "training_config.json")
    check_references(config, run_dir)
    adapter = run_dir / adapter if adapter else exported_adapter(run_dir)
    if not adapter.exists():
        raise FileNotFoundError(f"{adapter} does not exist: the run has not finished")
    checked_adapter(adapter)
    teacher, student = load_pair(config)
    owner = teacher if config.stage == 0 else student  # stage 0 trained the teacher itself
    model = PeftModel.from_pretrained(owner.model, str(adapter))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    model.kdlib_adapter = _adapter_info(run_dir, adapter.name)
    projector = None
    if (adapter / PROJECTOR_FILE).exists():
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
    # one exporter per destination; a killed export's temporary folder is removed once held
    with exclusive(out.parent, f"export {out.name}", lock=f".{out.name}.lock",
                   leftovers=(f".{out.name}.tmp-*", f".{out.name}.stale-*")):
        tmp = fresh_tmp_dir(out)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        feature_extractor.save_pretrained(str(tmp))
        atomic_write_json(tmp / "kdlib_export.json", {"run_dir": str(run_dir), **model.kdlib_adapter})
        write_folder_digests(tmp)
        replace_dir(tmp, out)
    return out


# Fields that do not change what a run learns: a finished run with other values is the same run.
# (encoder_cache only decides where frozen-encoder states are kept; they are the same values.)
CADENCE_FIELDS = ("run_dir", "eval_every", "save_every", "log_every", "encoder_cache")


class RunFolderConflict(FileExistsError, ValueError):
    """A run folder holds a run of another config; it is refused, never overwritten."""


def reusable_run(config: TrainConfig, run_dir: str | Path, *, ignore: tuple[str, ...] = ()) -> Optional[dict]:
    """The ``summary.json`` of ``run_dir`` when it holds a finished run of this very config, else
    None (nothing there yet, or an unfinished run of this config, which resumes). A folder holding
    a run of *another* config raises `RunFolderConflict` naming the fields that differ; it is never
    overwritten. `CADENCE_FIELDS` and ``ignore`` are left out of the comparison."""
    run_dir = Path(run_dir)
    saved = run_dir / "training_config.json"
    if not saved.is_file():
        return None
    skip = set(CADENCE_FIELDS) | set(ignore)
    there, now = TrainConfig.from_json(saved).absolute_paths().to_dict(), config.absolute_paths().to_dict()
    diff = {k: (there.get(k), v) for k, v in now.items() if k not in skip and there.get(k) != v}
    if diff:
        fields = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise RunFolderConflict(f"{run_dir}: holds a run of another config ({fields}); "
                                "remove the folder or use another one")
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


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


def load_history(run_dir: str | Path, *, missing_ok: bool = False) -> list[dict]:
    """``training_history.json`` of a run: one dict per optimizer step. ``missing_ok``: an empty
    list for a run that has not written one yet (a runner watching a run that just started)."""
    path = Path(run_dir) / HISTORY
    if missing_ok and not path.is_file():
        return []
    return json.loads(path.read_text())


def untrained_student(config: TrainConfig):
    """The student of ``config`` before any training: ``(model, tokenizer, feature_extractor)``.
    It is built from the pretrained teacher, so a stage-0 adapter (``teacher_from``) is not loaded."""
    _, student = load_pair(dataclasses.replace(config, teacher_from=None))
    return student.model.eval(), student.tokenizer, student.feature_extractor


def teacher_model(config: TrainConfig):
    """The teacher of ``config`` (adapted by ``teacher_from`` when set): ``(model, tokenizer, fe)``."""
    teacher, _ = load_pair(config)
    return teacher.model.eval(), teacher.tokenizer, teacher.feature_extractor
