"""Command line: ``python -m kdlib <command> --help``.

Each command is a thin wrapper over a library function, so what a script or a cluster job does is
what the notebooks do. Heavy imports (torch, transformers) happen inside the commands, so
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdlib import __version__


def _cmd_corpus(args: argparse.Namespace) -> int:
    from kdlib import data

    path = data.embedded_corpus(args.language)
    print(path)
    if args.report:
        for split in ("train", "dev", "test"):
            result = data.scan_mls(path, split)
            print(f"[{split}]")
            print(result.report())
    return 0


def _cmd_scan(args: argparse.Namespace) -> int:
    from kdlib import data

    result = data.scan_mls(
        Path(args.root), args.split, min_duration=args.min_duration, max_duration=args.max_duration,
        language=args.language,
    )
    print(result.report())
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from kdlib import data

    data.extract_mls_archive(
        Path(args.archive),
        Path(args.out),
        languages=args.languages,
        splits=args.splits,
        max_files=args.max_files,
        dry_run=args.dry_run,
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from kdlib import models

    bundle = models.load_whisper(args.name)
    print(bundle.path)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from kdlib.config import make_config

    # Checked before any model or data is touched: unknown fields and wrong types stop here.
    config = make_config(args.preset, stage=args.stage, sets=args.set)
    if args.run_dir:
        from kdlib.config import replace

        config = replace(config, run_dir=args.run_dir)
    from kdlib.train import run_stage

    # run_stage compares the folder's training_config.json with this config before anything is
    # written: a finished run of this config is left as it is (its files untouched), an unfinished
    # one resumes, and a folder of another config (lr, lora_r, max_steps... or a hand edit) stops
    # here, naming each field with both values.
    summary = run_stage(config, args.run_dir, progress=not args.no_progress)
    print(summary)
    return 0


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from kdlib.config import make_config, replace

    config = make_config(args.preset, stage=1, sets=args.set)
    from kdlib import teacher_cache
    from kdlib.models import amp_settings, resolve_device
    from kdlib.runs import load_pair as _load_pair, build_data

    device = resolve_device(args.device or config.device)
    on, dtype, _ = amp_settings(config, device)
    if args.split != config.dev_split:
        config = replace(config, train_split=args.split)
    teacher, _ = _load_pair(config)  # teacher_from (a stage-0 adapter) is merged in, as in training
    model = teacher.model.to(device).eval()
    train_set, dev_set, report = build_data(config, teacher.feature_extractor, teacher.tokenizer)
    dataset = dev_set if args.split == config.dev_split else train_set
    print(report[args.split])
    out = teacher_cache.build_teacher_cache(
        model, dataset, args.out, top_k=args.top_k, temperatures=args.temperatures,
        hidden_dtype=args.hidden_dtype, store_hidden=not args.no_hidden, tail_samples=args.tail_samples, batch_size=args.batch_size or config.batch_size,
        autocast_dtype=dtype if on else None, overwrite=args.overwrite, progress=not args.no_progress,
        note=f"python -m kdlib cache-teacher --preset {args.preset} --split {args.split}",
    )
    cache = teacher_cache.TeacherCache(out)
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 1e6
    print(f"{out}: {len(cache)} utterances, {cache.fingerprint['data']['tokens']} tokens, top-{cache.top_k}, "
          f"T = {', '.join(f'{t:g}' for t in cache.temperatures)}, {size:.1f} MB, {cache.index['seconds']} s")
    print(f"train from it: python -m kdlib train --preset {args.preset} --set teacher_cache={out} ...")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from kdlib.runs import export_merged

    if args.format == "hf":
        print(export_merged(args.run_dir, args.out))
        return 0
    import tempfile

    from kdlib.evaluate import export_ct2

    run = Path(args.run_dir)
    out = Path(args.out) if args.out else run / f"ct2-{args.quantization}"
    if (run / "config.json").is_file():  # already a transformers folder (e.g. RUN_DIR/merged)
        print(export_ct2(run, out, quantization=args.quantization))
        return 0
    # merge LoRA into a fresh temporary folder (never a stale RUN_DIR/merged), then convert
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        merged = export_merged(run, Path(tmp) / "merged")
        print(export_ct2(merged, out, quantization=args.quantization))
    return 0


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from kdlib import longform

    try:
        paths = longform.audio_files(args.inputs)  # every input exists, before any model loads
    except FileNotFoundError as err:
        print(f"kdlib transcribe: {err}", file=sys.stderr)
        return 2
    engine = longform.load_engine(args.model, ct2=args.ct2, quantization=args.quantization, language=args.language,
                                  batch_size=args.batch_size, device=args.device, threads=args.threads,
                                  max_new_tokens=args.max_new_tokens)
    done, unreadable = longform.transcribe_files(
        paths, engine, out_dir=Path(args.out) if args.out else None, fmt=args.format,
        overlap_seconds=args.overlap, progress=not args.no_progress)
    if args.out:
        print(f"{len(done)} transcript(s) in {args.out} ({args.format}, {engine.name}, window "
              f"{engine.window_seconds:g} s)")
    for path, reason in unreadable.items():
        print(f"kdlib transcribe: skipped {reason}", file=sys.stderr)
    return 1 if unreadable else 0


def _cmd_pseudo_label(args: argparse.Namespace) -> int:
    from kdlib import pseudo

    report = pseudo.pseudo_label(
        args.model, args.data, args.split, args.out, language=args.language,
        num_beams=args.beam, batch_size=args.batch_size, limit=args.limit,
        max_new_tokens=args.max_new_tokens, link=args.link, progress=not args.no_progress,
        reuse_encoder_states=args.reuse_encoder_states)
    print(report.report())
    if report.n_scored:
        for row in pseudo.wer_sweep(Path(args.out)):
            print(f"  λ = {row['max_wer']:.2f}: kept {row['kept']}, dropped {row['dropped']} "
                  f"({row['kept_hours']:.2f} h kept)")
    return 0


def _cmd_pseudo_filter(args: argparse.Namespace) -> int:
    from kdlib import pseudo

    max_wer = None if str(args.max_wer).lower() == "none" else float(args.max_wer)
    folder = pseudo.training_folder(args.data, args.pseudo, args.split, targets=args.targets,
                                    max_wer=max_wer, out=args.out, link=args.link)
    print(folder.report())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from kdlib import decode, evaluate

    rows = evaluate.compare_model_paths(
        args.model, data_root=args.data, split=args.split, out_dir=args.out, ct2=args.ct2,
        quantizations=args.quantization, num_beams=args.beam, limit=args.limit,
        threads=args.threads, language=args.language, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    print(evaluate.markdown_table(rows), end="")
    print(f"text normaliser: {rows[0].get('normalizer') if rows else decode.NORMALIZER}; "
          f"tables in {args.out}/comparison.{{md,csv,json}} and comparison_per_speaker.{{md,csv}}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from kdlib import evaluate

    kwargs = {"num_beams": args.beam}
    if args.limit:
        kwargs["limit"] = args.limit
    if args.max_new_tokens:
        kwargs["max_new_tokens"] = args.max_new_tokens
    metrics = evaluate.evaluate_run_dir(args.run_dir, args.split, args.data_root, **kwargs)
    keys = ("wer", "cer", "rtf", "peak_memory_mb", "n_utterances", "n_skipped", "normalizer")
    print({k: metrics.get(k) for k in keys})
    print(metrics["metrics_path"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kdlib",
        description="kdlib: knowledge distillation of Whisper (teacher -> LoRA student).",
    )
    parser.add_argument("--version", action="version", version=f"kdlib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("corpus", help="print the path of the embedded MLS-shaped corpus")
    p.add_argument("--language", default="it", help="it or es (default: it)")
    p.add_argument("--report", action="store_true", help="also scan every split and report")
    p.set_defaults(func=_cmd_corpus)

    p = sub.add_parser("scan", help="scan an MLS language folder and report kept/skipped utterances")
    p.add_argument("root", help="MLS language folder, e.g. data/mls_italian_opus")
    p.add_argument("--split", default="train", help="train, dev, test (or any split folder)")
    p.add_argument("--min-duration", type=float, default=1.0, help="seconds (default 1.0)")
    p.add_argument("--max-duration", type=float, default=30.0, help="seconds (default 30.0)")
    p.add_argument("--language", default=None,
                   help="it, es, ... (default: from the folder name, e.g. mls_italian_opus)")
    p.set_defaults(func=_cmd_scan)

    p = sub.add_parser("extract", help="stream chosen languages/splits out of MLS *.tar.gz archives")
    p.add_argument("archive", help="e.g. mls_italian_opus.tar.gz")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--languages", nargs="*", default=None, help="e.g. italian portuguese")
    p.add_argument("--splits", nargs="*", default=["train", "dev", "test"])
    p.add_argument("--max-files", type=int, default=None, help="stop after this many audio files")
    p.add_argument("--dry-run", action="store_true", help="print the storage estimate only")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser(
        "convert", help="build (once) and cache an offline Whisper model, e.g. whisper-base"
    )
    p.add_argument("name", help="whisper-base, whisper-tiny.en, a Hugging Face id or a folder")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("train", help="run one training stage (0 teacher adaptation, 1 KD, 2 alignment, 3 decoder)")
    from kdlib.config import PRESETS

    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--run-dir", required=True, help="run folder; rerun the same command to resume")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any TrainConfig field, e.g. --set lr=3e-4 --set init_from=runs/s1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("cache-teacher",
                       help="run the frozen teacher once over a split; store encoder states + top-k logits")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--split", default="train", help="train (default), dev or test")
    p.add_argument("--out", required=True, help="cache folder (train with --set teacher_cache=DIR)")
    p.add_argument("--top-k", type=int, default=64, help="teacher logits kept per token (default 64)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0],
                   help="KD temperatures whose log-sum-exp is stored (default 1 2)")
    p.add_argument("--tail-samples", type=int, default=64,
                   help="tail tokens sampled per token and T for an unbiased KL (0: lumped tail only)")
    p.add_argument("--hidden-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--no-hidden", action="store_true", help="skip encoder states (KL-only runs)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--device", default=None, help="default: the preset's (auto)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override, e.g. --set max_train_utterances=32 --set teacher_from=runs/s0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_cache_teacher)

    p = sub.add_parser("evaluate", help="decode a split with a run's model; writes metrics_<split>.json")
    p.add_argument("--run-dir", required=True, help="a run folder (or a Hugging Face model folder)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--data-root", default=None, help="MLS language folder (default: the run's data)")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N utterances")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="merge LoRA into the student; save a Hugging Face or CTranslate2 folder")
    p.add_argument("--run-dir", required=True, help="a run folder (or a Hugging Face folder, for ct2)")
    p.add_argument("--format", default="hf", choices=["hf", "ct2"],
                   help="hf: transformers folder; ct2: CTranslate2 (faster-whisper) folder")
    p.add_argument("--quantization", default="float32", choices=["int8", "float16", "float32"],
                   help="ct2 weight type (default float32)")
    p.add_argument("--out", default=None,
                   help="destination (default: RUN_DIR/merged, or RUN_DIR/ct2-QUANTIZATION)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("transcribe", help="transcribe your own audio files or folders of any length "
                       "(chunked with overlap past the model's window); text, JSON or SRT")
    p.add_argument("inputs", nargs="+", help="audio files (wav, flac, opus, ogg, mp3) or folders of them")
    p.add_argument("--model", required=True, help="a training run folder, an exported folder, a Hugging Face "
                   "folder, an offline name (whisper-base), or with --ct2 a CTranslate2 folder")
    p.add_argument("--ct2", action="store_true", help="decode with CTranslate2 (a transformers model is "
                   "converted first, into a temporary folder)")
    p.add_argument("--quantization", default="int8", choices=["int8", "int8_float32", "float16", "float32"],
                   help="CTranslate2 weight type (with --ct2)")
    p.add_argument("--language", default="it", help="language token (it, pt, pl, es, ...)")
    p.add_argument("--format", default="txt", choices=["txt", "json", "srt"],
                   help="json: the text plus every chunk's time span and words; srt: subtitles, one cue per chunk")
    p.add_argument("--out", default=None, help="folder for <file stem>.<format> (default: print to stdout)")
    p.add_argument("--overlap", type=float, default=None,
                   help="seconds two neighbouring chunks share (default: a fifth of the model's window)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="CTranslate2 threads (default: torch's)")
    p.add_argument("--max-new-tokens", type=int, default=224, help="tokens per chunk at most")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_transcribe)

    p = sub.add_parser("pseudo-label", help="transcribe a split with a teacher; write pseudo-labels "
                       "(resumable) and an MLS-shaped folder")
    p.add_argument("--model", required=True, help="whisper-base, a Hugging Face folder (e.g. an "
                   "exported stage-0 teacher) or a hub id")
    p.add_argument("--data", required=True, help="MLS language folder, or a folder of audio files")
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="output folder; rerun the same command to resume")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument("--language", default="it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="label only the first N clips")
    p.add_argument("--max-new-tokens", type=int, default=224)
    p.add_argument("--link", default="symlink", choices=["symlink", "hardlink", "copy"],
                   help="how OUT/SPLIT/audio refers to the source audio")
    p.add_argument("--reuse-encoder-states", action="store_true",
                   help="read/write the teacher's encoder states in the disk store "
                   "($KDLIB_CACHE/encoder_states), as training does: a stage-0 teacher whose "
                   "training saw these clips then runs its decoder only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pseudo_label)

    p = sub.add_parser("pseudo-filter", help="WER-filter pseudo-labels into an MLS training folder "
                       "(train with --set data_root=OUT)")
    p.add_argument("--data", required=True, help="the MLS folder that was pseudo-labelled")
    p.add_argument("--pseudo", required=True, help="pseudo-label folder (holds pseudo_labels.jsonl)")
    p.add_argument("--split", default="train")
    p.add_argument("--targets", default="pseudo", choices=["pseudo", "references", "both"],
                   help="pseudo (distil-whisper), references (same kept clips), both (pseudo where "
                   "kept, reference elsewhere)")
    p.add_argument("--max-wer", default="0.10", help="λ: keep WER < λ (default 0.10); none: no filter")
    p.add_argument("--out", required=True, help="the training folder to write")
    p.add_argument("--link", default="symlink", choices=["symlink", "hardlink", "copy"])
    p.set_defaults(func=_cmd_pseudo_filter)

    p = sub.add_parser("compare", help="evaluate several models on one split; write the comparison "
                       "table (markdown, CSV, JSON) and WER per speaker")
    p.add_argument("--model", required=True, nargs="+", metavar="[NAME=]MODEL",
                   help="offline name, Hugging Face folder or run folder; NAME= sets the row label")
    p.add_argument("--data", required=True, help="MLS language folder")
    p.add_argument("--split", default="dev")
    p.add_argument("--out", required=True, help="folder for comparison.{md,csv,json,png}")
    p.add_argument("--ct2", action="store_true", help="also convert each model to CTranslate2 "
                   "and time it (int8 and float32, same threads)")
    p.add_argument("--quantization", nargs="+", default=["int8", "float32"],
                   choices=["int8", "float16", "float32"], help="ct2 weight types (with --ct2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both engines")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--language", default="it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N utterances only")
    p.add_argument("--max-new-tokens", type=int, default=224)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from kdlib.config import ConfigError
    from kdlib.data import NoUsableData
    from kdlib.files import DamagedFile, FolderBusy, NotEnoughSpace
    from kdlib.runs import RunFolderConflict
    from kdlib.teacher_cache import StaleCacheError
    from kdlib.train import TrainingDiverged

    # What a user can act on: one line naming the file or field and what to do, exit status 2
    # (a bug still ends in a traceback).
    try:
        return int(args.func(args) or 0)
    except (ConfigError, RunFolderConflict, FolderBusy, DamagedFile, NotEnoughSpace, StaleCacheError,
            TrainingDiverged, NoUsableData) as err:
        print(f"kdlib {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
