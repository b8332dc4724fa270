"""Data-loading throughput: decode + resample + log-mel, kdlib's path against a naive one.

Measures utterances per second and seconds of audio per second for

* naive:     one file at a time on the main process, a new torchaudio Resample (and its sinc
             kernel) built for every file, features from WhisperFeatureExtractor;
* workers=0: kdlib.data.MLSDataset + collate through a DataLoader on the main process
             (cached resampler, one torch thread per item: MLSDataset's default ``threads=1``);
* workers=0, threads=None: the same keeping torch's default thread count;
* workers=2: the same with two DataLoader worker processes;
* naive, torch 1 thread: the naive path with ``torch.set_num_threads(1)``, as a DataLoader
             worker runs; it separates the gain of processes from that of fewer threads;

on two copies of the embedded Italian corpus: the shipped 16 kHz mono OPUS (like MLS, no
resampling needed) and a 44.1 kHz stereo FLAC copy (like a user's own recordings, resampled).
Prints a table and the speed-up ratios; it never passes or fails on time.

Run: .venv/bin/python benchmarks/data_throughput.py [--repeat 1] [--batch-size 8] [--clips N]
``--quick``: the same table on the first 6 clips, batch 2 (seconds; tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import DataLoader
from transformers import WhisperFeatureExtractor

from kdlib import data


class _CharTokenizer:
    """Stand-in tokenizer (bytes as ids) so the benchmark needs no model package; tokenising is
    a negligible part of the cost either way."""

    unk_token_id, unk_token = None, None
    _special = {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|transcribe|>": 50359,
                "<|translate|>": 50358, "<|notimestamps|>": 50363, "<|it|>": 50274, "<|es|>": 50262}

    def convert_tokens_to_ids(self, token):
        return self._special[token]

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = list(text.encode("utf-8"))
        return Out()


def naive(utterances, fe) -> int:
    """One file at a time, a fresh resampler per file. Returns the number of clips done."""
    for u in utterances:
        wave, sr = sf.read(str(u.audio), dtype="float32", always_2d=True)
        wave = torch.from_numpy(wave.mean(axis=1))
        if sr != 16000:
            wave = torchaudio.transforms.Resample(sr, 16000)(wave)
        fe(wave.numpy(), sampling_rate=16000, return_tensors="pt")
    return len(utterances)


def one_thread(fn, *args):
    """Run fn with torch limited to one thread, as inside a DataLoader worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def loader_run(utterances, fe, workers: int, batch_size: int, threads: int | None = 1) -> int:
    ds = data.MLSDataset(utterances, fe, _CharTokenizer(), threads=threads)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=data.WhisperCollator())
    return sum(len(b["ids"]) for b in loader)


def flac_copy(utterances, folder: Path) -> list:
    """44.1 kHz stereo FLAC copies of the clips (what needs resampling and mixing)."""
    out = []
    for u in utterances:
        wave = data.load_audio(u.audio).numpy()
        wave = torchaudio.functional.resample(torch.from_numpy(wave), 16000, 44100).numpy()
        path = folder / f"{u.id}.flac"
        sf.write(path, np.stack([wave, wave], axis=1), 44100)
        out.append(replace(u, audio=path))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="pass over the corpus this many times")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clips", type=int, default=None, help="only the first N clips (default: all 136)")
    parser.add_argument("--quick", action="store_true", help="6 clips, batch 2: the same table in seconds (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips, args.batch_size, args.repeat = 6, 2, 1
    root = data.embedded_corpus("it")
    utts = [u for s in ("train", "dev", "test") for u in data.scan_mls(root, s).utterances][:args.clips] * args.repeat
    fe = WhisperFeatureExtractor(feature_size=80)
    audio_s = sum(u.duration for u in utts)
    print(f"{len(utts)} clips, {audio_s:.0f} s of audio; torch threads {torch.get_num_threads()}, "
          f"batch size {args.batch_size}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(other processes on the machine slow every row)")
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"opus 16k mono": utts, "flac 44.1k stereo": flac_copy(utts, Path(tmp))}
        rows = []
        for name, clips in sets.items():
            naive(clips[:4], fe)   # warm-up: imports, first allocations
            for label, fn in [("naive (main process, new resampler per file)", lambda c: naive(c, fe)),
                              ("naive, torch 1 thread", lambda c: one_thread(naive, c, fe)),
                              ("DataLoader workers=0, threads=None", lambda c: loader_run(c, fe, 0, args.batch_size, None)),
                              ("DataLoader workers=0", lambda c: loader_run(c, fe, 0, args.batch_size)),
                              ("DataLoader workers=2", lambda c: loader_run(c, fe, 2, args.batch_size))]:
                t0 = time.perf_counter()
                n = fn(clips)
                dt = time.perf_counter() - t0
                rows.append((name, label, n / dt, audio_s / dt))
        print(f"\n{'audio':<18} {'path':<46} {'utt/s':>7} {'audio s/s':>10}")
        for name, label, ups, sps in rows:
            print(f"{name:<18} {label:<46} {ups:7.1f} {sps:10.1f}")
        print("\nratios against the naive path (same audio):")
        for name in sets:
            base = next(r[2] for r in rows if r[0] == name and r[1].startswith("naive"))
            for _, label, ups, _ in (r for r in rows if r[0] == name and r[1] != rows[0][1]):
                print(f"  {name:<18} {label:<36} {ups / base:5.2f}x")


if __name__ == "__main__":
    main()
