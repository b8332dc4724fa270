"""Offline distillation: run the frozen teacher once over a dataset and keep, on disk, what the
losses need, so training never runs the teacher again.

What is stored, per utterance (teacher forcing on the reference labels, as in training):

* the teacher's last encoder states ``(1500, d_teacher)``, float16 (default) or float32; the
  hidden-state losses (stage II) and a student that shares the teacher's frozen encoder read them;
* for every real label position, the ``k`` largest teacher logits, their vocabulary ids and the
  log-sum-exp of the *full* logits at each stored temperature (`kdlib.losses.TopKLogits`). The
  KL is then `kdlib.losses.kl_divergence_topk`: top-k tokens exact, the rest lumped into one tail
  bucket whose teacher mass is exact; its only error is the teacher's distribution *inside* the
  tail (it is biased low by ``p_tail * KL(p(.|tail) || q(.|tail))``; see that function);
* with ``tail_samples`` m > 0 (default 64), also m token ids per position and temperature drawn
  from the teacher's tail and the tail's exact ``sum p log p``: the KL is then unbiased. Needed at
  T = 2, where whisper-base keeps 83 % of its tempered mass outside the top 64 and the lumped
  estimate loses 39 % of the KL (``benchmarks/topk_kl.py``, ``benchmarks/README.md``).

The folder::

    index.json          fingerprint, settings, one entry per utterance (row, token offset, digest)
    hidden.npy          (utterances, 1500, d_teacher)      float16 | float32   (numpy memmap)
    topk_values.npy     (tokens, k)                        float32  raw logits, temperature 1
    topk_indices.npy    (tokens, k)                        int32
    lse.npy             (tokens, n_temperatures)           float32  logsumexp(z / T), full vocab
    labels.npy          (tokens,)                          int32    the reference labels
    tail_ids.npy        (tokens, n_temperatures, m)        int32    sampled tail tokens (m > 0)
    tail_plogp.npy      (tokens, n_temperatures)           float32  sum_tail p log p (m > 0)

Sizes: the encoder states dominate: 1500 x 512 x 2 bytes = 1.5 MB per clip for whisper-base in
float16 (the embedded corpus's 96 training clips: 147 MB), 3.8 MB for large-v3 (MLS Italian,
about 60,000 clips: 230 GB). A KL-only run whose student has its own encoder does not need them
(``store_hidden=False``); the top-k part is ``8 k + 4 (n_T (m + 2) + 1)`` bytes per token (k = 64,
m = 64, two temperatures: 1.05 kB, about 40 kB per clip).

The fingerprint, checked by `TeacherCache.verify` before training reads anything:

* ``teacher``: SHA-256 of the teacher's state dict (names, dtypes, shapes, bytes);
* ``features``: the feature extractor's settings (mels, hop, window, sampling rate, ...);
* ``data``: per utterance, SHA-256 of (id, language, label token ids, audio file size and
  modification time). Labels cover the text, the tokenizer, the task and the label format; size +
  mtime stand for the audio content (hashing every audio file of MLS would take minutes at each
  start; touching or replacing a file is enough to invalidate its entry);
* ``settings``: k, temperatures, hidden dtype, autocast dtype, format version (recorded; training
  accepts any k and checks only that its temperature is stored and hidden states are there if
  needed).

A cache that does not fit (other teacher, other features, an utterance missing or changed) is
refused with `StaleCacheError`, which says what differs.

Its contents are checked too: each utterance's entry holds a CRC-32 of its rows in every array,
written in the same atomic build; `TeacherCache.verify` reads the rows of the run's utterances
and refuses rows that changed since (flipped bytes, zeroed values). A file cut short is named
when the cache is opened (`DamagedCacheError`). Utterances whose teacher outputs are not finite
(an overflowing float16 teacher) are never stored: the build counts them (``nonfinite`` in
``index.json``) and training runs the live teacher on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from kdlib import data, models
from kdlib.files import exclusive, fresh_tmp_dir, gb, replace_dir, require_free_space
from kdlib.losses import TopKLogits, kl_divergence, kl_divergence_topk
from kdlib.models import decoder_inputs, tensor_digest
from kdlib.progress import progress_bar


FORMAT_VERSION = 2  # 2: a CRC-32 per utterance of its rows in every array
INDEX = "index.json"
HIDDEN_DTYPES = {"float16": np.float16, "float32": np.float32}


class StaleCacheError(ValueError):
    """A teacher cache was built for another teacher, other features or other data."""


class DamagedCacheError(StaleCacheError):
    """A teacher cache's files changed after it was built (truncated, bytes flipped, rows zeroed)."""


def _row_crc(*rows) -> int:
    """CRC-32 over the bytes of an utterance's rows (numpy arrays, in a fixed order)."""
    crc = 0
    for row in rows:
        if row is not None:
            crc = zlib.crc32(np.ascontiguousarray(row).tobytes(), crc)
    return crc


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def teacher_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (`kdlib.models.tensor_digest`)."""

    return tensor_digest(model.state_dict())


def feature_settings(feature_extractor) -> dict[str, Any]:
    """The settings that change log-mel features (the mel filter bank follows from them)."""
    keys = ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length", "n_samples",
            "nb_max_frames", "padding_value", "dither", "return_attention_mask")
    return {k: getattr(feature_extractor, k) for k in keys if hasattr(feature_extractor, k)}


def utterance_digest(utterance, labels: Sequence[int]) -> str:
    """What a cached entry depends on besides the teacher: id, language, labels, audio stat."""
    stat = Path(utterance.audio).stat()
    payload = [utterance.id, utterance.language, [int(x) for x in labels], stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def _dataset_labels(dataset) -> list[list[int]]:
    return [dataset.labels_for(u.text, u.language) for u in dataset.utterances]


# --------------------------------------------------------------------------------------------
# Building a cache
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_outputs(teacher: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor,
                    autocast_dtype: Optional[torch.dtype] = None):
    """One frozen-teacher forward, the way training runs it (`kdlib.models.teacher_outputs` on
    `kdlib.models.decoder_inputs`): float32 ``(encoder states (batch, 1500, d), logits (batch,
    tokens, vocab))`` on the teacher's device. ``labels`` ``(batch, tokens)``, -100 at padding."""
    out = models.teacher_outputs(teacher, decoder_inputs(labels, teacher.config), input_features=features,
                                 autocast_dtype=autocast_dtype)
    return out.encoder_hidden.float(), out.logits.float()


def build_teacher_cache(teacher: torch.nn.Module, dataset, out: str | os.PathLike, *, top_k: int = 64,
                        temperatures: Sequence[float] = (1.0, 2.0), hidden_dtype: str = "float16",
                        store_hidden: bool = True, tail_samples: int = 64, batch_size: int = 8, num_workers: int = 0,
                        autocast_dtype: Optional[torch.dtype] = None, overwrite: bool = False,
                        progress: bool = True, note: str = "") -> Path:
    """Run ``teacher`` (frozen, no_grad, eval) once over ``dataset`` (a `kdlib.data.MLSDataset`)
    and write a cache folder at ``out`` (see the module docstring). Returns ``out``.

    ``autocast_dtype``: None for float32, or e.g. ``torch.float16`` on CUDA; use what training's
    live teacher would use (``kdlib.models.amp_settings``), or the cache and the live teacher differ
    by the autocast rounding. The folder is written under a temporary name and renamed at the end,
    so an interrupted build leaves no half cache behind. ``tail_samples``: tail tokens drawn per
    position and temperature for the unbiased KL (0: the lumped tail only; none when k = vocab);
    the draw is seeded, so a rebuild gives the same cache."""
    out = Path(out)
    # One builder per cache: a second one stops at once naming the first; a killed build's
    # temporary folder is removed once held.
    with exclusive(out.parent, f"teacher cache {out.name}", lock=f".{out.name}.lock",
                   leftovers=(f".{out.name}.tmp-*", f".{out.name}.stale-*")):
        return _build_teacher_cache(teacher, dataset, out, top_k=top_k, temperatures=temperatures,
                                    hidden_dtype=hidden_dtype, store_hidden=store_hidden, tail_samples=tail_samples,
                                    batch_size=batch_size, num_workers=num_workers, autocast_dtype=autocast_dtype,
                                    overwrite=overwrite, progress=progress, note=note)


def _build_teacher_cache(teacher, dataset, out: Path, *, top_k, temperatures, hidden_dtype, store_hidden, tail_samples,
                         batch_size, num_workers, autocast_dtype, overwrite, progress, note) -> Path:
    from torch.utils.data import DataLoader

    if (out / INDEX).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a teacher cache; pass overwrite=True (--overwrite) to replace it")
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden_dtype must be one of {sorted(HIDDEN_DTYPES)}, got {hidden_dtype!r}")
    vocab = teacher.config.vocab_size
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
    temperatures = tuple(float(t) for t in temperatures)
    started = time.perf_counter()

    utterances = dataset.utterances
    all_labels = _dataset_labels(dataset)
    offsets = np.concatenate([[0], np.cumsum([len(l) for l in all_labels])]).astype(np.int64)
    total = int(offsets[-1])
    d_model, frames = teacher.config.d_model, teacher.config.max_source_positions
    tail_samples = tail_samples if top_k < vocab else 0
    # Refused before anything is written: at MLS Italian scale with large-v3 the states alone are
    # ~59,600 x 1500 x 1280 x 2 bytes = 229 GB.
    hidden_bytes = len(utterances) * frames * d_model * np.dtype(HIDDEN_DTYPES[hidden_dtype]).itemsize if store_hidden else 0
    per_token = top_k * 8 + len(temperatures) * 4 + 4 + (len(temperatures) * (tail_samples * 4 + 4) if tail_samples else 0)
    require_free_space(out.parent, hidden_bytes + total * per_token,
                       f"the teacher cache of {len(utterances):,} clips ({gb(hidden_bytes)} of encoder states, "
                       f"{total:,} tokens x top-{top_k})",
                       advice="free space, write it elsewhere, or leave the encoder states out (store_hidden=False, "
                              "--no-hidden: stage I needs only the logits)")
    tmp = fresh_tmp_dir(out)
    mm = np.lib.format.open_memmap
    hidden = (mm(tmp / "hidden.npy", "w+", HIDDEN_DTYPES[hidden_dtype], (len(utterances), frames, d_model))
              if store_hidden else None)
    values = mm(tmp / "topk_values.npy", "w+", np.float32, (total, top_k))
    indices = mm(tmp / "topk_indices.npy", "w+", np.int32, (total, top_k))
    lse = mm(tmp / "lse.npy", "w+", np.float32, (total, len(temperatures)))
    labels_mm = mm(tmp / "labels.npy", "w+", np.int32, (total,))
    tail_ids = tail_plogp = None
    if tail_samples:
        tail_ids = mm(tmp / "tail_ids.npy", "w+", np.int32, (total, len(temperatures), tail_samples))
        tail_plogp = mm(tmp / "tail_plogp.npy", "w+", np.float32, (total, len(temperatures)))
    generator = torch.Generator().manual_seed(0)
    row_of = {u.id: i for i, u in enumerate(utterances)}

    lengths = [len(l) for l in all_labels]
    batches = data.LengthGroupedBatchSampler(lengths, batch_size, shuffle=False).batches()
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=data.WhisperCollator(), num_workers=num_workers)
    entries: dict[str, dict] = {}
    nonfinite: list[str] = []
    digest = hashlib.sha256()
    for batch in progress_bar(loader, total=len(batches), desc="teacher cache", disable=not progress):
        if batch is None:
            continue
        encoded, logits = teacher_outputs(teacher, batch["input_features"], batch["labels"], autocast_dtype)
        for b, uid in enumerate(batch["ids"]):
            row = row_of[uid]
            n, start = lengths[row], int(offsets[row])
            if hidden is not None:
                hidden[row] = encoded[b].cpu().numpy().astype(HIDDEN_DTYPES[hidden_dtype])
            top = TopKLogits.from_logits(logits[b, :n].cpu(), top_k, temperatures, tail_samples, generator)
            if tail_samples:
                tail_ids[start:start + n] = top.tail_indices.numpy().astype(np.int32)
                tail_plogp[start:start + n] = top.tail_plogp.numpy()
            values[start:start + n] = top.values.cpu().numpy()
            indices[start:start + n] = top.indices.cpu().numpy().astype(np.int32)
            lse[start:start + n] = top.lse.cpu().numpy()
            labels_mm[start:start + n] = np.asarray(all_labels[row], dtype=np.int32)
            tokens = [a[start:start + n] for a in (values, indices, lse, labels_mm, tail_ids, tail_plogp)
                      if a is not None]
            if not (all(np.isfinite(a).all() for a in tokens[:3])
                    and (hidden is None or np.isfinite(hidden[row]).all())):
                nonfinite.append(uid)  # an overflowing teacher: never stored as a target
                continue
            entries[uid] = {"row": row, "offset": start, "tokens": n,
                            "digest": utterance_digest(utterances[row], all_labels[row]),
                            "crc": [_row_crc(*tokens), _row_crc(hidden[row]) if hidden is not None else None]}
    for uid in sorted(entries):
        digest.update(f"{uid}:{entries[uid]['digest']};".encode())
    for array in (hidden, values, indices, lse, labels_mm, tail_ids, tail_plogp):
        if array is not None:
            array.flush()
    del hidden, values, indices, lse, labels_mm, tail_ids, tail_plogp

    index = {
        "format": FORMAT_VERSION,
        "fingerprint": {
            "teacher": {"digest": teacher_digest(teacher), "name": str(getattr(teacher.config, "_name_or_path", "")),
                        "d_model": d_model, "vocab_size": vocab,
                        "layers": [teacher.config.encoder_layers, teacher.config.decoder_layers]},
            "features": feature_settings(dataset.feature_extractor),
            "data": {"digest": digest.hexdigest(), "utterances": len(entries), "tokens": total},
            "settings": {"top_k": top_k, "tail_samples": tail_samples, "temperatures": list(temperatures),
                         "hidden_dtype": hidden_dtype,
                         "store_hidden": store_hidden, "frames": frames,
                         "autocast": None if autocast_dtype is None else str(autocast_dtype).replace("torch.", "")},
        },
        "utterances": entries,
        "skipped": sorted(set(row_of) - set(entries) - set(nonfinite)),
        "nonfinite": sorted(nonfinite),
        "seconds": round(time.perf_counter() - started, 2),
        "note": note,
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    if nonfinite:
        print(f"teacher cache: {len(nonfinite)} of {len(utterances)} utterances left out: the teacher's outputs "
              f"are not finite (overflow; e.g. {', '.join(nonfinite[:3])}); training runs the live teacher on them")
    return replace_dir(tmp, out)


# --------------------------------------------------------------------------------------------
# Reading a cache
# --------------------------------------------------------------------------------------------


class TeacherCache:
    """A cache folder, opened read-only (memory-mapped): `verify` it, then read by utterance id."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.exists():
            raise FileNotFoundError(
                f"{index_file} does not exist: no teacher cache at {self.path} "
                "(build one with: python -m kdlib cache-teacher --preset ... --out DIR)"
            )
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT_VERSION:
            raise StaleCacheError(f"{self.path}: cache format {self.index.get('format')}, this kdlib reads "
                                  f"{FORMAT_VERSION}; rebuild it")
        self.fingerprint = self.index["fingerprint"]
        self.settings = self.fingerprint["settings"]
        self.entries: dict[str, dict] = self.index["utterances"]
        self.temperatures = tuple(self.settings["temperatures"])
        self.top_k = int(self.settings["top_k"])
        self.hidden_array = self._array("hidden.npy") if self.settings["store_hidden"] else None
        self.values = self._array("topk_values.npy")
        self.indices = self._array("topk_indices.npy")
        self.lse = self._array("lse.npy")
        self.labels = self._array("labels.npy")
        self.tail_samples = int(self.settings.get("tail_samples", 0))
        self.tail_ids = self.tail_plogp = None
        if self.tail_samples:
            self.tail_ids = self._array("tail_ids.npy")
            self.tail_plogp = self._array("tail_plogp.npy")

    def _array(self, name: str) -> np.ndarray:
        file = self.path / name
        try:
            return np.load(file, mmap_mode="r")
        except (OSError, ValueError) as err:  # missing, truncated ("mmap length is greater ..."), bad header
            raise DamagedCacheError(f"{file}: cannot be read ({err}); the cache is damaged or truncated. Rebuild "
                                    "it (python -m kdlib cache-teacher ... --overwrite)") from err

    def damaged(self, ids: Optional[Iterable[str]] = None) -> list[str]:
        """Utterances (of ``ids``, default all) whose rows no longer match the CRC-32 written at
        build time: bytes flipped, rows zeroed, a file copied short. Reads every row it checks
        (about 1 s per GB)."""
        bad = []
        token_arrays = [a for a in (self.values, self.indices, self.lse, self.labels, self.tail_ids, self.tail_plogp)
                        if a is not None]
        for uid in (self.entries if ids is None else ids):
            entry = self.entries.get(uid)
            if entry is None:
                continue
            start, n = entry["offset"], entry["tokens"]
            tokens_crc, hidden_crc = entry["crc"]
            if _row_crc(*(a[start:start + n] for a in token_arrays)) != tokens_crc or (
                    self.hidden_array is not None and _row_crc(self.hidden_array[entry["row"]]) != hidden_crc):
                bad.append(uid)
        return bad

    def __contains__(self, uid: str) -> bool:
        return uid in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def has_all(self, ids: Iterable[str]) -> bool:
        return all(uid in self.entries for uid in ids)

    @property
    def has_hidden(self) -> bool:
        return self.hidden_array is not None

    def problems(self, *, teacher: Optional[torch.nn.Module] = None, feature_extractor=None, dataset=None,
                 temperature: Optional[float] = None, need_hidden: bool = False,
                 contents: bool = True) -> list[str]:
        """What does not fit: an empty list when the cache may be used for this teacher/data.
        ``contents``: also check every row (of ``dataset``'s utterances) against its checksum
        (`damaged`)."""
        found = []
        if teacher is not None:
            ours = self.fingerprint["teacher"]
            digest = teacher_digest(teacher)
            if digest != ours["digest"]:
                name = str(getattr(teacher.config, "_name_or_path", ""))
                found.append(
                    f"teacher weights differ (cache: {ours['name'] or '?'} d_model {ours['d_model']}, "
                    f"digest {ours['digest'][:12]}; this run: {name or '?'} d_model {teacher.config.d_model}, "
                    f"digest {digest[:12]})"
                )
        if feature_extractor is not None:
            ours, now = self.fingerprint["features"], feature_settings(feature_extractor)
            changed = sorted(k for k in set(ours) | set(now) if ours.get(k) != now.get(k))
            if changed:
                found.append("feature extractor settings differ: " + ", ".join(
                    f"{k} {ours.get(k)!r} in the cache vs {now.get(k)!r} now" for k in changed))
        if dataset is not None:
            missing, changed = [], []
            for u, labels in zip(dataset.utterances, _dataset_labels(dataset)):
                entry = self.entries.get(u.id)
                if entry is None:
                    missing.append(u.id)
                elif entry["digest"] != utterance_digest(u, labels):
                    changed.append(u.id)
            if missing:
                found.append(f"data: {len(missing)} of {len(dataset.utterances)} utterances are not in the cache "
                             f"(e.g. {', '.join(missing[:3])})")
            if changed:
                found.append(f"data: {len(changed)} utterances changed since the cache was built (labels, audio "
                             f"size or modification time; e.g. {', '.join(changed[:3])})")
        if temperature is not None and not any(abs(t - temperature) < 1e-9 for t in self.temperatures):
            found.append(f"temperature {temperature:g} not stored (the cache has T = "
                         f"{', '.join(f'{t:g}' for t in self.temperatures)})")
        if need_hidden and not self.has_hidden:
            found.append("this run needs the teacher's encoder states and the cache was built without them")
        if contents:
            ids = [u.id for u in dataset.utterances] if dataset is not None else None
            bad = self.damaged(ids)
            if bad:
                found.append(f"{len(bad)} utterances no longer match the checksums written with the cache (its files "
                             f"changed after the build: flipped bytes, zeroed rows; e.g. {', '.join(bad[:3])})")
        return found

    def verify(self, **kwargs) -> "TeacherCache":
        """Raise `StaleCacheError` naming every difference (arguments as in `problems`)."""
        found = self.problems(**kwargs)
        if found:
            raise StaleCacheError(
                f"teacher cache {self.path} does not fit this run: " + "; ".join(found)
                + ". Rebuild it for this teacher and data (python -m kdlib cache-teacher ...)."
            )
        return self

    def hidden(self, ids: Sequence[str], device=None) -> torch.Tensor:
        """``(batch, 1500, d_teacher)`` float32 encoder states of ``ids``."""
        if self.hidden_array is None:
            raise StaleCacheError(f"{self.path}: built without encoder states (store_hidden=False)")
        rows = [self.entries[uid]["row"] for uid in ids]
        return torch.from_numpy(np.array(self.hidden_array[rows], dtype=np.float32)).to(device)

    def topk(self, ids: Sequence[str], width: int, device=None,
             labels: Optional[torch.Tensor] = None) -> TopKLogits:
        """Teacher `TopKLogits` for a batch: ``(batch, width, k)``; positions past an utterance's
        labels hold zeros (the losses mask them). With ``labels`` ``(batch, width)``, the stored
        labels must equal the batch's real labels (a cheap guard against a mismatched tokenizer)."""
        k, n_t = self.top_k, len(self.temperatures)
        values = torch.zeros(len(ids), width, k)
        indices = torch.zeros(len(ids), width, k, dtype=torch.long)
        lse = torch.zeros(len(ids), width, n_t)
        m = self.tail_samples
        tail_ids = torch.zeros(len(ids), width, n_t, m, dtype=torch.long) if m else None
        tail_plogp = torch.zeros(len(ids), width, n_t) if m else None
        for b, uid in enumerate(ids):
            entry = self.entries[uid]
            start, n = entry["offset"], entry["tokens"]
            if n > width:
                raise ValueError(f"{self.path}: {uid} has {n} cached tokens, the batch only {width} positions")
            if labels is not None:
                real = labels[b][labels[b] != -100].cpu().numpy()
                if not np.array_equal(real, self.labels[start:start + n]):
                    raise StaleCacheError(f"{self.path}: the labels of {uid} differ from the cached ones "
                                          "(another tokenizer, task or transcript?); rebuild the cache")
            values[b, :n] = torch.from_numpy(np.array(self.values[start:start + n]))
            indices[b, :n] = torch.from_numpy(np.array(self.indices[start:start + n], dtype=np.int64))
            lse[b, :n] = torch.from_numpy(np.array(self.lse[start:start + n]))
            if m:
                tail_ids[b, :n] = torch.from_numpy(np.array(self.tail_ids[start:start + n], dtype=np.int64))
                tail_plogp[b, :n] = torch.from_numpy(np.array(self.tail_plogp[start:start + n]))
        return TopKLogits(values, indices, lse, self.temperatures, tail_ids, tail_plogp).to(device)


# --------------------------------------------------------------------------------------------
# How good is the top-k approximation?
# --------------------------------------------------------------------------------------------


def topk_kl_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  ks: Sequence[int], temperature: float = 2.0, tail_samples: int = 64,
                  generator: Optional[torch.Generator] = None) -> dict:
    """Token-summed exact KL and top-k KL (times T^2) for one batch, lumped tail and sampled tail
    (``tail_samples``), plus the teacher tail mass.

    Returns ``{"tokens": n, "exact": sum, "topk": {k: sum}, "sampled": {k: sum}, "p_tail": {k: sum}}``
    (sums over real tokens, so batches add up)."""
    n = int(mask.sum())
    out = {"tokens": n, "exact": float(kl_divergence(student_logits, teacher_logits, mask, temperature)) * n,
           "topk": {}, "sampled": {}, "p_tail": {}}
    real_teacher = teacher_logits[mask].float() / temperature
    for k in ks:
        top = TopKLogits.from_logits(teacher_logits, k, (temperature,), tail_samples, generator)
        out["sampled"][k] = float(kl_divergence_topk(student_logits, top, mask, temperature)) * n
        top.tail_indices = top.tail_plogp = None
        out["topk"][k] = float(kl_divergence_topk(student_logits, top, mask, temperature)) * n
        p_top = torch.softmax(real_teacher, -1).topk(k, -1).values.sum(-1)
        out["p_tail"][k] = float((1 - p_top).clamp(min=0).sum())
    return out


@torch.no_grad()
def measure_topk_error(teacher: torch.nn.Module, students: dict[str, Any], dataset, *,
                       ks: Sequence[int] = (8, 32, 64), temperatures: Sequence[float] = (2.0,),
                       tail_samples: int = 64, batch_size: int = 4, progress: bool = True) -> dict:
    """Exact KL (full teacher logits) against the cached top-k KL over a dataset, teacher forcing.

    ``students`` maps a name to a Whisper model (its own forward on the same features and labels)
    or to a float ``s``: that "student" is the teacher's logits plus Gaussian noise of std ``s``
    (a student close to the teacher, where the KL is small). The teacher runs once per batch, on
    ``teacher_input_features`` when the items carry them (a student with a shorter window reads
    ``input_features``), else on ``input_features`` like the students.
    Returns per-token means::

        {"tokens": n, "students": {name: {T: {"exact_kl", "k": {k: {"topk_kl", "relative_error",
                                   "sampled_kl", "sampled_relative_error", "p_tail"}}}}}}

    ``relative_error = (exact - topk) / exact`` for the lumped tail (never negative: see
    `kl_divergence_topk`); ``sampled_*`` for the tail sampled with ``tail_samples`` tokens (signed:
    unbiased, so its error is sampling noise)."""
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=data.WhisperCollator())
    sums = {(name, t): {"exact": 0.0, "topk": dict.fromkeys(ks, 0.0), "sampled": dict.fromkeys(ks, 0.0),
                        "p_tail": dict.fromkeys(ks, 0.0)}
            for name in students for t in temperatures}
    tokens = 0
    for batch in progress_bar(loader, desc="top-k KL", disable=not progress):
        if batch is None:
            continue
        labels = batch["labels"]
        mask = labels != -100
        tokens += int(mask.sum())
        # the teacher's own log-mels when the dataset carries them (a student with a shorter window)
        teacher_features = batch.get("teacher_input_features", batch["input_features"])
        teacher_logits = teacher_outputs(teacher, teacher_features, labels)[1].cpu()
        for name, student in students.items():
            if isinstance(student, torch.nn.Module):
                dec_in = decoder_inputs(labels, student.config)
                param = next(student.parameters())
                student_logits = student(input_features=batch["input_features"].to(param.device, param.dtype),
                                         decoder_input_ids=dec_in.to(param.device), use_cache=False).logits.float().cpu()
            else:
                student_logits = teacher_logits + torch.randn(teacher_logits.shape, generator=generator) * float(student)
            for t in temperatures:
                terms = topk_kl_terms(student_logits, teacher_logits, mask, ks, t, tail_samples, generator)
                acc = sums[(name, t)]
                acc["exact"] += terms["exact"]
                for k in ks:
                    for key in ("topk", "sampled", "p_tail"):
                        acc[key][k] += terms[key][k]
    n = max(1, tokens)
    out: dict = {"tokens": tokens, "students": {name: {} for name in students}}
    for (name, t), acc in sums.items():
        exact = acc["exact"] / n
        out["students"][name][t] = {"exact_kl": exact, "k": {
            k: {"topk_kl": acc["topk"][k] / n,
                "relative_error": (exact - acc["topk"][k] / n) / exact if exact > 0 else 0.0,
                "sampled_kl": acc["sampled"][k] / n,
                "sampled_relative_error": (exact - acc["sampled"][k] / n) / exact if exact > 0 else 0.0,
                "p_tail": acc["p_tail"][k] / n} for k in ks}}
    return out
