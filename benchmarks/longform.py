"""Long-form transcription: WER of recordings of 1-3 minutes transcribed in overlapping chunks
(`kdlib.longform`) against the WER of the same clips transcribed one by one.

Two sets of recordings, each made of clips joined with pauses (the reference is the joined
transcripts):

* ``corpus``: the embedded corpus's test clips (``kdlib/corpus/italian/test``);
* ``held-out``: Italian sentences written for this benchmark (not in the corpus), synthesised with
  espeak-ng in five voices (needs the ``espeak-ng`` program; skipped with a note without it).

Models: an offline name or run folder (``--model``, default ``whisper-base``, the book's teacher),
at its own window and, with ``--window 10``, cut to a 10 s encoder window like the demo student
(`kdlib.models.set_encoder_window`; untrained, so its WER is the method's, not a trained student's).
Engines: transformers and CTranslate2 int8 (``--ct2``). Greedy, same threads.

    python benchmarks/longform.py --window 10 --ct2            # ~5 min on 2 CPU cores
    python benchmarks/longform.py --quick                      # tiny random model, 4 clips, seconds

Prints one row per (set, model window, engine): clip-by-clip WER, chunked WER, the difference,
and writes them to ``benchmarks/results/longform.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from kdlib import data, decode, evaluate, longform, models

SR = decode.SAMPLE_RATE
HELD_OUT = [
    "Il treno per Bologna parte dal binario tre alle otto e un quarto.",
    "Mia nonna prepara il sugo ogni domenica mattina.",
    "Le biblioteche comunali restano chiuse durante il mese di agosto.",
    "Abbiamo camminato lungo il fiume fino al vecchio mulino.",
    "Il medico ha consigliato di bere molta acqua e di riposare.",
    "La riunione è stata rinviata a giovedì pomeriggio.",
    "I ragazzi giocano a calcio nel cortile della scuola.",
    "Questa sera il cielo è limpido e si vedono le stelle.",
    "Il museo espone una collezione di strumenti musicali antichi.",
    "Ho dimenticato l'ombrello sull'autobus stamattina.",
    "Il contadino raccoglie le olive alla fine di ottobre.",
    "La farmacia all'angolo è aperta anche di notte.",
    "Gli studenti devono consegnare la tesi entro marzo.",
    "Il gatto dorme sul davanzale al sole.",
    "Per arrivare in centro conviene prendere la metropolitana.",
    "Il panettiere apre il negozio prima dell'alba.",
    "Domani pioverà su tutta la costa adriatica.",
    "La squadra ha vinto la partita all'ultimo minuto.",
    "Mio fratello lavora in un laboratorio di chimica.",
    "Le castagne arrostite profumano tutta la piazza.",
]
VOICES = ["it", "it+m3", "it+f2", "it+m5", "it+f4"]


def synthesise(folder: Path) -> list[tuple[np.ndarray, str]] | None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    clips = []
    for i, text in enumerate(HELD_OUT):
        wav = folder / f"held_{i:02d}.wav"
        subprocess.run([exe, "-v", VOICES[i % len(VOICES)], "-s", "150", "-w", str(wav), text], check=True)
        clips.append((data.load_audio(wav).numpy(), text))
    return clips


def corpus_clips() -> list[tuple[np.ndarray, str]]:
    scan = data.scan_mls(data.embedded_corpus("it"), "test")
    return [(data.load_audio(u.audio).numpy(), u.text) for u in scan.utterances]


def recordings(clips, per_recording: int, pause: float = 0.7):
    """Clips joined in order with ``pause`` s of silence, ``per_recording`` clips each."""
    gap = np.zeros(int(pause * SR), dtype=np.float32)
    out = []
    for first in range(0, len(clips), per_recording):
        part = clips[first:first + per_recording]
        audio = np.concatenate([piece for clip, _ in part for piece in (clip, gap)])
        out.append((audio, " ".join(text for _, text in part)))
    return out


def run(engine: longform.Engine, clips, joined) -> dict:
    # each clip through the same path (one chunk each, the same loop collapse), batched
    ids = [longform.collapse_loops(seq) for seq in engine.generate([clip for clip, _ in clips])]
    one_by_one = [engine.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in ids]
    clip_wer = decode.wer_cer([t for _, t in clips], one_by_one)["wer"]
    chunked = [longform.transcribe_long(audio, engine.generate, engine.tokenizer,
                                        window_seconds=engine.window_seconds).text for audio, _ in joined]
    long_wer = decode.wer_cer([t for _, t in joined], chunked)["wer"]
    return {"clip_wer": round(clip_wer, 4), "chunked_wer": round(long_wer, 4),
            "difference": round(long_wer - clip_wer, 4),
            "recordings_s": [round(len(a) / SR, 1) for a, _ in joined]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="whisper-base")
    parser.add_argument("--window", type=int, default=None, help="also cut the model to this window (s)")
    parser.add_argument("--ct2", action="store_true")
    parser.add_argument("--no-full-window", action="store_true", help="only the --window model")
    parser.add_argument("--per-recording", type=int, default=10, help="clips per joined recording")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "longform.json"))
    parser.add_argument("--quick", action="store_true", help="the smoke preset's tiny random student, 4 clips "
                        "a set, 2 per recording, a 10 s window as well, 4 tokens a chunk; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.window, args.per_recording, args.out = 10, 2, None

    with tempfile.TemporaryDirectory() as tmp:
        sets = {"corpus": corpus_clips()}
        held = synthesise(Path(tmp))
        if args.quick:
            sets["corpus"], held = sets["corpus"][:4], held and held[:4]
        if held is None:
            print("held-out: espeak-ng not found, skipped")
        else:
            sets["held-out"] = held
        windows = ([] if args.no_full_window and args.window else [None]) + ([args.window] if args.window else [])
        rows = []
        for window in windows:
            bundle = models.tiny_random_pair(seed=0)[1] if args.quick else evaluate.load_run_model(args.model)
            if window:
                models.set_encoder_window(bundle.model, window)
                bundle = models.WhisperBundle(bundle.model, bundle.tokenizer,
                                              models.window_feature_extractor(bundle.feature_extractor, window), None)
            tokens = 4 if args.quick else decode.DEFAULT_MAX_NEW_TOKENS
            engines = [longform.hf_engine(bundle, language="it", name="transformers", max_new_tokens=tokens)]
            if args.ct2:
                hf = evaluate._hf_folder_for(bundle, f"w{window}", Path(tmp))
                folder = evaluate.export_ct2(hf, Path(tmp) / f"ct2-{window}", quantization="int8")
                engines.append(longform.ct2_engine(
                    evaluate.CT2Whisper(folder, compute_type="int8", feature_extractor=bundle.feature_extractor,
                                        tokenizer=bundle.tokenizer), language="it", name="ct2 int8",
                    max_new_tokens=tokens))
            for engine in engines:
                for name, clips in sets.items():
                    row = {"set": name, "model": "tiny-random" if args.quick else args.model,
                           "window_s": engine.window_seconds,
                           "engine": engine.name, "clips": len(clips),
                           **run(engine, clips, recordings(clips, args.per_recording))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{len(rows)} rows -> {args.out or 'not written (--quick)'}")


if __name__ == "__main__":
    main()
