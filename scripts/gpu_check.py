"""Check the thesis path on one GPU before a thesis run: real shapes, random weights, no hub.

    python scripts/gpu_check.py --out gpu_check.jsonl          # one GPU, about 5 minutes or less
    python scripts/gpu_check.py --tiny --out /tmp/check.jsonl  # CPU, cut-down sizes (the test)
    python scripts/gpu_check.py --cpu-rehearsal                # CPU: all of it at thesis-tiny, ~10 min

The teacher and student are built from `WhisperConfig`s equal to whisper-large-v3's (d_model
1280, 32 + 32 layers, 20 heads, 128 mel bins, 51,866 tokens) and whisper-small's (768, 12 + 12,
12 heads, 80 mel bins, 51,865 tokens), with random weights, and the offline tokenizers in both
token layouts (`kdlib.models.large_v3_tokenizer`). The training step goes through kdlib's own
pieces: `kdlib.config.make_config("thesis", ...)`, `kdlib.models.apply_lora`, the projector,
`kdlib.runs.set_trainable`, `build_caches`, `forward_losses` (the trainer's forward and loss),
`amp_settings` + `torch.amp.GradScaler`, `build_optimizer`, `save_checkpoint`; the data through
`kdlib.data` (MLS folder scan, decode, both feature extractors, collate).

One JSON line per check, printed and appended to ``--out``:

- ``stage1_step``: stage I KD at batch 64, clips of 15 s and of 30 s (label length grows with the
  clip): teacher forward without grad under fp16 autocast, student LoRA forward/backward under
  autocast, GradScaler, clip, AdamW step. Median step time and peak GPU memory. ``stage2_step``:
  the same for stage II (encoder LoRA trains, geodesic + contrastive through the projector).
- ``dev_decode``: greedy decoding (``eval_max_new_tokens`` bounded) of one batch by the student and
  by the teacher, scaled to seconds per 1,000 clips.
- ``dataloader``: clips per second through `kdlib.data.MLSDataset` + DataLoader with 8 and 14
  workers, synthetic OPUS files in MLS layout written to a temporary folder.
- ``resume``: a checkpoint saved after one step, loaded into fresh models: same trainable weights,
  the next step runs.
- ``nonfinite``: under fp16 + GradScaler, a forced non-finite loss (skipped before backward, no
  ``scaler.update()``) and a forced overflowing gradient (the scaler's inf check skips the step and
  lowers the scale): weights unchanged, the next step trains. Must not crash.

- ``train_chain`` (not with ``--tiny`` alone): `kdlib.train.train` itself for stages 0 → III at
  thesis-tiny on this device (a float16 teacher, fp16 autocast + GradScaler, the dev pass), and a
  stage I interrupted after its first checkpoint and resumed: the same weights as uninterrupted.
- ``chapters``: chapters 05 → 06 → 07 → 10 through papermill at thesis-tiny, chained; every model
  they and their trainings ran sits on this device (their ``placement``).

A check that fails (out of memory included) prints ``"ok": false`` with the error and the script
goes on; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kdlib

from kdlib import caches as C, data, decode, distill as DL, models as M, runs as R, train as T  # noqa: E402
from kdlib.config import make_config  # noqa: E402
from kdlib.losses import DistillationLoss  # noqa: E402

LARGE_V3 = dict(d_model=1280, layers=(32, 32), heads=20, ffn=5120, num_mel_bins=128, vocab_size=51866)
SMALL = dict(d_model=768, layers=(12, 12), heads=12, ffn=3072, num_mel_bins=80, vocab_size=51865)
TINY_TEACHER = dict(d_model=64, layers=(2, 2), heads=2, ffn=128, num_mel_bins=128, vocab_size=51866)
TINY_STUDENT = dict(d_model=32, layers=(2, 2), heads=2, ffn=64, num_mel_bins=80, vocab_size=51865)
TOKENS_PER_SECOND = 4  # Italian read speech: about 2.5 words/s, ~1.5 tokens per word


class Report:
    def __init__(self, out: Path | None):
        self.out, self.failed = out, False
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")

    def line(self, record: dict) -> None:
        text = json.dumps(record, default=str)
        print(text, flush=True)
        if self.out is not None:
            with open(self.out, "a") as handle:
                handle.write(text + "\n")
        self.failed |= not record.get("ok", True)

    def run(self, check: str, fn, **meta) -> None:
        started = time.perf_counter()
        try:
            result = fn()
            record = {"check": check, **meta, "ok": True, **result}
        except Exception as err:  # noqa: BLE001 — report and go on to the next check
            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            record = {"check": check, **meta, "ok": False, "error": f"{type(err).__name__}: {err}"[:500],
                      "where": traceback.format_exc(limit=-3)[-800:]}
        record["wall_s"] = round(time.perf_counter() - started, 2)
        self.line(record)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------
# Models: the thesis pair from configs, through kdlib's run wiring


def thesis_pair(tiny: bool, device):
    """(teacher bundle, student bundle) with random weights and the real offline tokenizers. The
    teacher is frozen and shared by every check (never copied: large-v3 is 6 GB in fp32)."""
    from transformers import WhisperForConditionalGeneration

    tokenizer = M.real_tokenizer()
    teacher_tok = M.large_v3_tokenizer(tokenizer)
    bundles = []
    for spec, tok, v3 in (((TINY_TEACHER if tiny else LARGE_V3), teacher_tok, True),
                          ((TINY_STUDENT if tiny else SMALL), tokenizer, False)):
        spec = dict(spec)
        mels = spec.pop("num_mel_bins")
        cfg = M.tiny_config(**spec, num_mel_bins=mels)
        with torch.device(device):  # random init on the GPU: seconds, not a minute on the CPU
            model = WhisperForConditionalGeneration(cfg).eval()
        gen = M._generation_config_for(model)
        model.generation_config = M.v3_generation_config(gen) if v3 else gen
        from kdlib import ct2

        bundles.append(M.WhisperBundle(model, tok, ct2.build_feature_extractor(mels), None,
                                       "large-v3-shaped" if v3 else "small-shaped"))
    return bundles[0], bundles[1]


def run_models(config, teacher, student, device) -> M.RunModels:
    """What `kdlib.runs.build_models` returns, from bundles built here instead of the hub."""
    import copy

    teacher_model = M.freeze_teacher(teacher.model).to(device)
    # the thesis student's shape from the config (3:1 frame merging after encoder layer 5)
    shaped = M.shape_student(M.WhisperBundle(copy.deepcopy(student.model), student.tokenizer,
                                             student.feature_extractor),
                             window_seconds=config.student_window_seconds,
                             frame_factor=config.student_frame_factor,
                             # --tiny: a 2-layer encoder has no layer 5; merge after its first
                             merge_layer=None if config.student_merge_layer is None else
                             min(config.student_merge_layer, student.config.encoder_layers - 2))
    lora = M.apply_lora(shaped.model, config.lora_preset, r=config.lora_r,
                        alpha=config.lora_alpha, dropout=config.lora_dropout)
    if config.grad_checkpointing:
        lora.base_model.model.gradient_checkpointing_enable()
        lora.base_model.model.config.use_cache = False
    lora.to(device)
    projector = M.RiemannianProjector(student.config.d_model, teacher.config.d_model).to(device) \
        if config.projector else None
    trainable = R.set_trainable(lora, projector, config)
    vocab = M.vocab_index(student.tokenizer, teacher.tokenizer, student.config.vocab_size)
    return M.RunModels(student=lora, teacher=teacher_model, projector=projector, tokenizer=student.tokenizer,
                       feature_extractor=student.feature_extractor, trainable=trainable,
                       teacher_feature_extractor=teacher.feature_extractor,
                       vocab_index=None if vocab is None else vocab.to(device))


def synthetic_batch(batch: int, seconds: float, tokenizer, device, *, mels=(80, 128)) -> dict:
    """A collated batch as `kdlib.data.WhisperCollator` makes it: random log-mels (both
    extractors' bins), labels of ``TOKENS_PER_SECOND * seconds`` text tokens behind the prompt."""
    g = torch.Generator().manual_seed(int(seconds))
    prompt = tokenizer.convert_tokens_to_ids(["<|it|>", "<|transcribe|>", "<|notimestamps|>"])
    n_text = max(2, int(TOKENS_PER_SECOND * seconds))
    text = torch.randint(0, 50000, (batch, n_text), generator=g)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    labels = torch.cat([torch.tensor(prompt).expand(batch, -1), text, torch.full((batch, 1), eot)], dim=1)
    frames = min(3000, int(seconds * 100))
    mask = torch.zeros(batch, 3000, dtype=torch.bool)
    mask[:, :frames] = True
    return {"input_features": torch.randn(batch, mels[0], 3000, generator=g),
            "teacher_input_features": torch.randn(batch, mels[1], 3000, generator=g),
            "labels": labels, "feature_mask": mask, "num_frames": mask.sum(1),
            "ids": [f"clip{i}" for i in range(batch)]}


class Trainer:
    """One optimizer step exactly as `kdlib.train` takes it: forward_losses under autocast,
    scaled backward, unscale, clip, scaler step/update, schedule. A non-finite step is skipped
    the way the trainer skips it (no optimizer step)."""

    def __init__(self, config, models: M.RunModels, device):
        self.config, self.models, self.device = config, models, device
        self.autocast_on, self.dtype, use_scaler = M.amp_settings(config, device)
        modules = [models.student] + ([models.projector] if models.projector is not None else [])
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.optimizer = M.build_optimizer(modules, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=config.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: T.lr_factor(
            s, warmup_steps=config.warmup_steps, max_steps=config.max_steps, lr=config.lr, min_lr=config.min_lr))
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.caches = C.build_caches(models, config)
        self.loss_fn = DistillationLoss(DL.stage_weights(config, config.warmup_steps))
        models.student.train()

    def step(self, batch: dict, *, force: str | None = None) -> dict:
        """``force="loss"``: the loss is made infinite (skipped before backward); ``"grad"``: one
        gradient is made infinite after the scaled backward (an fp16 overflow: the GradScaler's
        inf check finds it, the step is skipped and the scale lowered)."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = DL.forward_losses(self.models, self.loss_fn, batch, self.device, (self.autocast_on, self.dtype),
                                 caches=self.caches)
        total = parts["total"] * float("inf") if force == "loss" else parts["total"]
        grad_norm = float("nan")
        if not bool(torch.isfinite(total)):  # nothing unscaled: update() would raise "No inf checks were recorded"
            self.optimizer.zero_grad(set_to_none=True)
            return {"finite": False, "loss": float(total.detach()), "grad_norm": grad_norm}
        self.scaler.scale(total).backward()
        if force == "grad":
            with torch.no_grad():
                self.params[0].grad.view(-1)[0] = float("inf")
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip))
        finite = math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()  # inf checks were recorded by unscale_: a skipped step lowers the scale
        if finite:
            self.scheduler.step()
        return {"finite": finite, "loss": float(parts["total"].detach()), "grad_norm": grad_norm}


# --------------------------------------------------------------------------------------------
# Checks


def check_step(stage, seconds, batch, steps, pair, device, tiny):
    teacher, student = pair
    config = make_config("thesis", stage=stage, overrides={"device": str(device), "amp": "fp16"})
    models = run_models(config, teacher, student, device)
    trainer = Trainer(config, models, device)
    data_batch = synthetic_batch(batch, seconds, student.tokenizer, device)
    reset_peak(device)
    times, finite = [], []
    for i in range(steps + (0 if tiny else 1)):  # on a GPU the first step warms up kernels and the allocator
        sync(device)
        started = time.perf_counter()
        result = trainer.step(data_batch)
        sync(device)
        finite.append(result["finite"])
        if i or tiny:
            times.append(time.perf_counter() - started)
    # fp16 + GradScaler: dynamic loss scaling starts at 2**16, and a first step whose scaled
    # gradients overflow is skipped (the scale halves); what counts is that steps then train.
    out = {"step_s": round(statistics.median(times), 3), "peak_gb": peak_gb(device), "loss": result["loss"],
           "finite": result["finite"], "finite_steps": sum(finite), "steps": len(finite),
           "label_tokens": int(data_batch["labels"].shape[1]),
           "trainable": sum(p.numel() for p in trainer.params),
           "autocast": str(trainer.dtype), "grad_scaler": trainer.scaler.is_enabled(),
           "teacher_weights": "fp32 under fp16 autocast (this synthetic step; train_chain runs the float16 teacher)"}
    out["hours_for_8000_steps"] = round(out["step_s"] * 8000 / 3600, 2)
    del trainer, models
    return out


def check_decode(batch, seconds, max_new_tokens, pair, device):

    teacher, student = pair
    audio = [np.random.default_rng(i).standard_normal(int(16000 * seconds)).astype("float32") * 0.1
             for i in range(batch)]
    result = {"clips": batch, "seconds_per_clip": seconds, "max_new_tokens": max_new_tokens}
    for name, bundle in (("student", student), ("teacher", teacher)):
        model = bundle.model.to(device)
        if device.type == "cuda":
            model.half()
        reset_peak(device)
        sync(device)
        started = time.perf_counter()
        decode.transcribe(model, bundle.feature_extractor, bundle.tokenizer, audio, language="it",
                            batch_size=batch, device=device, max_new_tokens=max_new_tokens, progress=False)
        sync(device)
        spent = time.perf_counter() - started
        result[f"{name}_s_per_1000_clips"] = round(spent / batch * 1000, 1)
        result[f"{name}_peak_gb"] = peak_gb(device)
        model.float().cpu()
    return result


def write_mls(root: Path, n: int, seconds: float) -> Path:
    """``n`` clips of noise as OPUS in MLS layout: ``root/train/audio/<spk>/<book>/<id>.opus``."""
    import soundfile as sf

    split = root / "train"
    lines = []
    rng = np.random.default_rng(0)
    for i in range(n):
        speaker, book = 100 + i % 7, 200 + i % 3
        uid = f"{speaker}_{book}_{i:06d}"
        folder = split / "audio" / str(speaker) / str(book)
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / f"{uid}.opus", (rng.standard_normal(int(16000 * seconds)) * 0.1).astype("float32"),
                 16000, format="OGG", subtype="OPUS")
        lines.append(f"{uid}\tuna frase di prova numero {i}")
    (split / "transcripts.txt").write_text("\n".join(lines) + "\n")
    return root


def check_dataloader(workers_list, batch, n_files, seconds, pair, device):
    from torch.utils.data import DataLoader

    teacher, student = pair
    with tempfile.TemporaryDirectory(prefix="kdlib-gpu-check-") as tmp:
        root = write_mls(Path(tmp), n_files, seconds)
        utterances = data.scan_mls(root, "train", language="it").utterances
        dataset = data.MLSDataset(utterances, student.feature_extractor, student.tokenizer,
                                  teacher_feature_extractor=teacher.feature_extractor)
        result = {"clips": len(dataset), "seconds_per_clip": seconds, "batch": batch}
        for workers in workers_list:
            loader = DataLoader(dataset, batch_size=batch, collate_fn=data.WhisperCollator(), num_workers=workers,
                                pin_memory=device.type == "cuda", persistent_workers=False)
            started = time.perf_counter()
            first, first_count, count = None, 0, 0
            for out in loader:
                count += len(out["ids"])
                if first is None:
                    first, first_count = time.perf_counter() - started, count
            spent = time.perf_counter() - started
            steady = (count - first_count) / (spent - first) if count > first_count else None
            result[f"workers_{workers}_clips_per_s"] = round(count / spent, 1)
            result[f"workers_{workers}_after_first_batch_clips_per_s"] = None if steady is None else round(steady, 1)
            result[f"workers_{workers}_first_batch_s"] = round(first, 2)
        return result


def check_resume(pair, device, batch, seconds):
    teacher, student = pair
    config = make_config("thesis", stage=1, overrides={"device": str(device), "amp": "fp16"})
    models = run_models(config, teacher, student, device)
    trainer = Trainer(config, models, device)
    data_batch = synthetic_batch(batch, seconds, student.tokenizer, device)
    trainer.step(data_batch)
    with tempfile.TemporaryDirectory(prefix="kdlib-gpu-check-") as tmp:
        run_dir = Path(tmp)
        started = time.perf_counter()
        R.save_checkpoint(run_dir, models, trainer.optimizer, trainer.scheduler, trainer.scaler,
                          {"step": 1, "epoch": 0, "position": 1})
        save_s = time.perf_counter() - started
        size_mb = (run_dir / R.CHECKPOINT).stat().st_size / 2**20
        before = M.tensor_digest(R.trainable_state(models))
        fresh = run_models(config, teacher, student, device)
        resumed = Trainer(config, fresh, device)
        started = time.perf_counter()
        try:  # the trainer's own resume reads these keys; weights_only where the checkpoint allows it
            payload = torch.load(run_dir / R.CHECKPOINT, map_location="cpu", weights_only=True)
            weights_only = True
        except Exception:  # noqa: BLE001
            payload = torch.load(run_dir / R.CHECKPOINT, map_location="cpu", weights_only=False)
            weights_only = False
        R.load_trainable_state(fresh, payload["trainable"])
        resumed.optimizer.load_state_dict(payload["optimizer"])
        resumed.scheduler.load_state_dict(payload["scheduler"])
        resumed.scaler.load_state_dict(payload["scaler"])
        load_s = time.perf_counter() - started
        same = M.tensor_digest(R.trainable_state(fresh)) == before
        nxt = resumed.step(data_batch)
    if not same:
        raise AssertionError("the resumed trainable weights differ from the saved ones")
    return {"checkpoint_mb": round(size_mb, 1), "save_s": round(save_s, 2), "load_s": round(load_s, 2),
            "same_weights": same, "next_step_finite": nxt["finite"], "weights_only_load": weights_only}


def check_nonfinite(pair, device, batch, seconds):
    teacher, student = pair
    config = make_config("thesis", stage=1, overrides={"device": str(device), "amp": "fp16"})
    models = run_models(config, teacher, student, device)
    trainer = Trainer(config, models, device)
    data_batch = synthetic_batch(batch, seconds, student.tokenizer, device)
    trainer.step(data_batch)  # one normal step first: the scaler has recorded inf checks before
    result = {"grad_scaler": trainer.scaler.is_enabled(), "autocast": str(trainer.dtype)}
    for kind in ("loss", "grad"):
        before = M.tensor_digest(R.trainable_state(models))
        scale = trainer.scaler.get_scale()
        skipped = trainer.step(data_batch, force=kind)
        unchanged = M.tensor_digest(R.trainable_state(models)) == before
        after = trainer.step(data_batch)
        if skipped["finite"] or not unchanged or not after["finite"]:
            raise AssertionError(f"non-finite {kind} not skipped cleanly: {skipped}, unchanged={unchanged}, next={after}")
        result[f"inf_{kind}"] = {"skipped": True, "weights_unchanged": unchanged, "next_step_finite": True,
                                 "scale_before": scale, "scale_after_skip_and_next": trainer.scaler.get_scale()}
    if result["inf_grad"]["scale_after_skip_and_next"] >= result["inf_grad"]["scale_before"]:
        raise AssertionError("the GradScaler did not lower its scale after an overflowing gradient")
    return result


# --------------------------------------------------------------------------------------------
# The real code end to end: kdlib.train.train and the chapters, at thesis-tiny (fp16 teacher)


def _assert_on(placement: dict, device, where: str) -> None:
    """Every model of a run or a chapter on the run's device; the teacher in float16 (large-v3's dtype)."""
    problems = M.misplaced(placement, device, teacher_dtype="float16")
    if problems:
        raise AssertionError(f"{where}: " + "; ".join(problems))


def check_train_chain(root: Path, device) -> dict:
    """`kdlib.train.train` itself: stages 0 → III at thesis-tiny chained through ``teacher_from``
    and ``init_from`` (fp16 autocast + GradScaler, a float16 teacher, the dev pass at every
    evaluation), then stage I stopped after its first checkpoint (step 1 of 4) and resumed through
    ``checkpoint.pt``, which must end on the uninterrupted run's weights."""
    from kdlib.data import embedded_corpus

    base = {"device": str(device), "data_root": str(embedded_corpus("it"))}
    result, runs = {}, {}
    for stage in (0, 1, 2, 3):
        sets = dict(base)
        if stage:
            sets["teacher_from"] = str(runs[0])
        if stage >= 2:
            sets["init_from"] = str(runs[stage - 1])
        config = make_config("thesis-tiny", stage=stage, overrides=sets)
        reset_peak(device)
        started = time.perf_counter()
        summary = T.train(config, root / f"stage{stage}", progress=False)
        runs[stage] = root / f"stage{stage}"
        if summary["steps"] != config.max_steps or summary["dev_loss"] is None:
            raise AssertionError(f"stage {stage}: {summary['steps']} of {config.max_steps} steps, dev_loss {summary['dev_loss']}")
        _assert_on(summary["placement"], device, f"stage {stage}")
        result[f"stage{stage}"] = {"steps": summary["steps"], "nonfinite_steps": summary["nonfinite_steps"],
                                   "dev_loss": summary["dev_loss"], "dev_wer": summary["dev_wer"],
                                   "placement": summary["placement"], "seconds": round(time.perf_counter() - started, 1),
                                   "peak_gb": peak_gb(device)}

    class Interrupted(Exception):
        pass

    def stop_after_first(step, metrics):  # a step's evaluation comes before its checkpoint
        if step == 2:
            raise Interrupted

    config = make_config("thesis-tiny", stage=1, overrides={**base, "teacher_from": str(runs[0]), "save_every": 1,
                                                             "eval_every": 1, "early_stopping_patience": None})
    straight = T.train(config, root / "straight", progress=False)
    try:
        T.train(config, root / "resumed", progress=False, on_eval=stop_after_first)
        raise AssertionError("the interrupted run was not interrupted")
    except Interrupted:
        pass
    saved = torch.load(root / "resumed" / R.CHECKPOINT, map_location="cpu", weights_only=True)["progress"]
    resumed = T.train(config, root / "resumed", progress=False)
    same = resumed["trainable_digest"] == straight["trainable_digest"]
    if saved["step"] != 1 or not same:
        raise AssertionError(f"resume: checkpoint at step {saved['step']}, same weights as uninterrupted: {same}")
    result["resume"] = {"checkpoint_step": saved["step"], "same_weights_as_uninterrupted": same}
    return result


def check_chapters(root: Path, device) -> dict:
    """Chapters 05 → 06 → 07 → 10 through papermill at thesis-tiny, chained by their run
    parameters; each must finish and record its models on the run's device (results.json)."""
    import nbformat
    import papermill

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from prepare_chapters import prepare  # the copies the tests run: run paths inside ``root``

    from kdlib.data import embedded_corpus

    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    over = {"overrides": {"device": str(device)}}

    def run(name, **params):
        (prepared,) = prepare(root, "thesis-tiny", [notebooks / f"{name}.ipynb"],
                              {"data_root": str(embedded_corpus("it")), **params})
        out = root / f"executed_{name}.ipynb"
        started = time.perf_counter()
        papermill.execute_notebook(str(prepared), str(out), kernel_name="python3", language="python",
                                   cwd=str(notebooks), progress_bar=False, execution_timeout=1800)
        (injected,) = [c.source for c in nbformat.read(str(out), as_version=4).cells
                       if "injected-parameters" in c.metadata.get("tags", [])]
        out_dir = Path(ast.literal_eval(next(line.split(" = ", 1)[1] for line in injected.splitlines()
                                             if line.startswith("out_dir = "))))
        return out_dir, round(time.perf_counter() - started, 1)

    result = {}
    out05, result["05_seconds"] = run("05_stage1_kd", **over)
    out06, result["06_seconds"] = run("06_stage2_alignment", prev_run=str(out05 / "stage1"), **over)
    out07, result["07_seconds"] = run("07_stage3_decoder", stage1_run=str(out05 / "stage1"),
                                      ce_only_run=str(out05 / "ce_only"), stage2_run=str(out06 / "stage2"), **over)
    out10, result["10_seconds"] = run("10_latent_space", run_dir=str(out07 / "stage3"))
    for name, path in (("05", out05 / "results.json"), ("06", out06 / "results.json"), ("07", out07 / "results.json"),
                       ("10", out10 / "latent_space.json")):
        record = json.loads(path.read_text())
        _assert_on(record["placement"], device, f"chapter {name}")
        result[f"{name}_placement"] = record["placement"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="cut-down models and sizes (CPU test, < 1 min)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--batch", type=int, default=None, help="default 64 (--tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per shape (default 3)")
    parser.add_argument("--skip", nargs="*", default=[], help="checks to leave out, e.g. dataloader")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="the GPU run's conditions on the CPU: --tiny's checks, then train_chain and chapters "
                             "at thesis-tiny (fp16 autocast + GradScaler, a float16 teacher); exit 0 only if all pass")
    args = parser.parse_args(argv)
    if args.cpu_rehearsal:
        args.tiny, args.device = True, "cpu"
    tiny = args.tiny
    device = M.resolve_device(args.device)
    batch = args.batch or (2 if tiny else 64)
    steps = args.steps or 3
    clips = (1.0, 2.0) if tiny else (15.0, 30.0)
    report = Report(args.out)
    torch.manual_seed(0)
    pair = thesis_pair(tiny, device)
    report.line({"check": "setup", "ok": True, "device": str(device), "tiny": tiny, "batch": batch,
                 "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 "teacher": {k: getattr(pair[0].config, k) for k in ("d_model", "encoder_layers", "decoder_layers",
                                                                    "encoder_attention_heads", "num_mel_bins", "vocab_size")},
                 "student": {k: getattr(pair[1].config, k) for k in ("d_model", "encoder_layers", "decoder_layers",
                                                                    "encoder_attention_heads", "num_mel_bins", "vocab_size")}})
    checks = [
        *[(f"stage{s}_step", lambda s=s, c=c: check_step(s, c, batch, steps, pair, device, tiny),
           {"stage": s, "clip_s": c, "batch": batch}) for s in (1, 2) for c in clips if not tiny or s == 1 or c == clips[0]],
        ("dev_decode", lambda: check_decode(batch, clips[0], 8 if tiny else 128, pair, device), {}),
        ("dataloader", lambda: check_dataloader((0, 2) if tiny else (8, 14), batch, 2 * batch if tiny else 4 * batch,
                                                clips[0], pair, device), {}),
        ("resume", lambda: check_resume(pair, device, batch, clips[0]), {}),
        ("nonfinite", lambda: check_nonfinite(pair, device, batch, clips[0]), {}),
    ]
    # The real code at thesis-tiny, on this device: on a GPU these are the checks that catch a model
    # left on the CPU; with --tiny alone (the quick CPU test) they are left out.
    work = Path(tempfile.mkdtemp(prefix="kdlib-gpu-check-"))
    if not tiny or args.cpu_rehearsal:
        checks += [("train_chain", lambda: check_train_chain(work / "train", device), {"preset": "thesis-tiny"}),
                   ("chapters", lambda: check_chapters(work / "chapters", device), {"preset": "thesis-tiny"})]
    try:
        for name, fn, meta in checks:
            if name.split("_")[0] in args.skip or name in args.skip:
                continue
            report.run(name, fn, **meta)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
