#!/usr/bin/env python3
"""Synthesise kdlib's embedded corpus: a tiny Multilingual LibriSpeech (MLS) look-alike.

Every sentence below is spoken by espeak-ng (the only Italian synthesiser installable here, see
FACTS) with one of several voices, at a speed between 130 and 185 words per minute and a pitch
between 35 and 65, then resampled to 16 kHz mono with sox and encoded as Ogg/Opus with opusenc.
A fixed seed makes the choice of voice, speed, pitch and split the same on every run, and a fixed
Ogg serial number makes the files byte-identical for a given espeak-ng/sox/opus-tools version.

The output follows the MLS layout exactly, so the same code reads it and a real MLS download:

    kdlib/corpus/<language>/<split>/transcripts.txt          "<speaker>_<book>_<utt>\t<text>"
    kdlib/corpus/<language>/<split>/audio/<speaker>/<book>/<speaker>_<book>_<utt>.opus
    kdlib/corpus/<language>/speakers.tsv                      speaker id -> espeak-ng voice
    kdlib/corpus/<language>/synthesis.tsv                     id, split, voice, speed, pitch

A "speaker" is one espeak-ng voice; a "book" is one topic of sentences. Transcripts are written the
MLS way: lower case, punctuation removed, apostrophes kept. espeak-ng reads the punctuated text,
which gives it better prosody. No sentence is shared between splits.

Needs: espeak-ng, sox and opus-tools (`apt-get install espeak-ng sox opus-tools`).
Run:   python scripts/make_corpus.py            (rewrites kdlib/corpus/, about 30 s)
"""
from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SEED = 20240611
SAMPLE_RATE = 16_000
OPUS_BITRATE_KBPS = 20
SPEED_RANGE = (130, 185)   # espeak-ng -s, words per minute
PITCH_RANGE = (35, 65)     # espeak-ng -p, 0..99, default 50

# speaker id -> espeak-ng voice. Numeric ids, as in MLS.
VOICES = {
    "italian": {
        "1001": "it", "1002": "it+m3", "1003": "it+f2",
        "1004": "it+m5", "1005": "it+f3", "1006": "it+m1",
    },
    "spanish": {
        "2001": "es", "2002": "es+m3", "2003": "es+f2", "2004": "es-419",
    },
}
# Number of sentences per split; the rest of the list (if any) goes to train.
SPLITS = {
    "italian": {"dev": 20, "test": 20},
    "spanish": {"dev": 8, "test": 8},
}

# Sentences grouped by topic; the topic index gives the MLS "book" id (101, 102, ...).
ITALIAN = [
    # 101 daily life
    [
        "Ogni mattina mi sveglio presto e preparo il caffè per tutta la famiglia.",
        "Mia sorella porta il cane al parco prima di andare in ufficio.",
        "Stasera ceniamo a casa dei nonni, che abitano vicino alla stazione.",
        "Ho dimenticato le chiavi sul tavolo della cucina.",
        "Il sabato pomeriggio facciamo la spesa al supermercato sotto casa.",
        "Dopo cena i bambini guardano un cartone animato e poi vanno a letto.",
        "La lavatrice si è rotta di nuovo, dobbiamo chiamare il tecnico.",
        "Mi piace leggere un libro sul balcone quando fa bel tempo.",
        "Il vicino del terzo piano suona il pianoforte ogni sera.",
        "Abbiamo dipinto le pareti del soggiorno di un colore più chiaro.",
        "Domenica ho sistemato la cantina e ho trovato vecchie fotografie.",
        "Per arrivare puntuale al lavoro prendo l'autobus delle sette e mezza.",
        "La nostra gatta dorme sempre sulla sedia vicino alla finestra.",
        "Non trovo più gli occhiali, forse li ho lasciati in macchina.",
        "Quando torno a casa la sera, apro le finestre e cucino qualcosa di semplice per tutti.",
        "Ieri sera abbiamo giocato a carte con i vicini fino a mezzanotte, ridendo come bambini.",
        "Chiudi la porta, per favore.",
    ],
    # 102 weather and seasons
    [
        "Oggi il cielo è nuvoloso e nel pomeriggio è prevista pioggia.",
        "In montagna è già caduta la prima neve della stagione.",
        "D'estate in città fa così caldo che si dorme con le finestre aperte.",
        "Il vento forte ha fatto cadere alcuni rami nel giardino.",
        "In primavera i campi si riempiono di fiori gialli e rossi.",
        "Stamattina c'era una nebbia fitta sull'autostrada.",
        "L'autunno è la mia stagione preferita per i colori degli alberi.",
        "Porta l'ombrello, perché le previsioni dicono che pioverà tutto il giorno.",
        "Il lago si è ghiacciato durante la notte più fredda dell'inverno.",
        "Dopo il temporale è comparso un arcobaleno sopra le colline.",
        "Quest'anno la siccità ha messo in difficoltà molti agricoltori.",
        "Al mare la temperatura dell'acqua è ancora troppo bassa per nuotare.",
        "Le giornate si allungano e il sole tramonta sempre più tardi.",
        "Durante la notte la temperatura è scesa sotto lo zero.",
        "Secondo il bollettino meteorologico, nel fine settimana arriverà aria fredda dal nord e la neve potrebbe scendere fino in pianura.",
        "Il mese scorso ha piovuto quasi ogni giorno e il fiume ha raggiunto il livello più alto da dieci anni.",
        "Oggi fa davvero molto freddo.",
    ],
    # 103 food and cooking
    [
        "Per fare un buon risotto serve un brodo caldo e tanta pazienza.",
        "La nonna prepara la pasta fatta in casa ogni domenica.",
        "In questo ristorante servono il pesce più fresco della costa.",
        "Vorrei un cappuccino e una brioche alla crema, per favore.",
        "Il pane appena sfornato profuma tutta la strada.",
        "Abbiamo raccolto i pomodori dell'orto per fare la salsa.",
        "Il gelato al pistacchio è il più buono della gelateria.",
        "Metti l'acqua sul fuoco e aggiungi il sale quando bolle.",
        "A pranzo mangio spesso un'insalata con il tonno e le olive.",
        "La pizza napoletana ha un bordo alto e morbido.",
        "Per la festa abbiamo preparato una torta al cioccolato con le fragole.",
        "Il formaggio stagionato si abbina bene con il miele di castagno.",
        "Ho comprato le arance in offerta al mercato del quartiere.",
        "Il cuoco ha spiegato come tagliare le verdure in modo uniforme.",
        "Per Natale mia madre prepara sempre i tortellini in brodo, l'arrosto con le patate e tanti dolci.",
        "Se vuoi la pasta al dente, scolala un minuto prima e finisci la cottura nella padella con il sugo.",
        "Il caffè è pronto in cucina.",
    ],
    # 104 travel and transport
    [
        "Il treno per Milano parte dal binario quattro con dieci minuti di ritardo.",
        "L'anno prossimo vorremmo visitare la Sicilia in bicicletta.",
        "All'aeroporto abbiamo aspettato due ore per il controllo dei bagagli.",
        "Scusi, sa dirmi dove si trova la fermata della metropolitana?",
        "Il traghetto per la Sardegna parte ogni sera alle nove.",
        "Abbiamo noleggiato una macchina per girare le colline della Toscana.",
        "Il biglietto del treno si può comprare anche con il telefono.",
        "Durante il viaggio ho conosciuto una coppia di ragazzi olandesi.",
        "La strada per il passo è chiusa a causa di una frana.",
        "Quando sono a Roma mi piace camminare lungo il Tevere al tramonto.",
        "L'albergo era piccolo ma molto pulito e vicino al centro storico.",
        "Per attraversare il ponte bisogna pagare un pedaggio.",
        "Il pullman per l'università passa ogni quindici minuti.",
        "Abbiamo perso la coincidenza e dormito in stazione.",
        "Il volo per Palermo è stato cancellato all'ultimo momento, così abbiamo dovuto prendere il treno notturno e siamo arrivati all'alba.",
        "Chi viaggia in bicicletta lungo la costa adriatica trova piste ciclabili, spiagge tranquille e piccoli paesi di pescatori.",
        "Il treno è in ritardo.",
    ],
    # 105 work and school
    [
        "La riunione con i clienti è stata spostata a giovedì mattina.",
        "Il professore ci ha chiesto di consegnare la relazione entro venerdì.",
        "Mio fratello ha trovato lavoro in una piccola azienda di software.",
        "Gli studenti preparano l'esame di storia nella biblioteca comunale.",
        "La direttrice ha presentato il nuovo progetto a tutto il personale.",
        "Lavoro da casa due giorni alla settimana e il resto in ufficio.",
        "La maestra legge una favola ai bambini prima della ricreazione.",
        "Ho scritto una lettera per chiedere un aumento di stipendio.",
        "Il corso di inglese comincia a ottobre e dura sei mesi.",
        "Dopo la laurea vorrei fare un dottorato all'estero.",
        "La stampante dell'ufficio non funziona da questa mattina.",
        "I colleghi hanno organizzato una festa per il mio compleanno.",
        "Nella tesi ho confrontato due metodi per riconoscere il parlato.",
        "Il colloquio di lavoro è andato meglio di quanto pensassi.",
        "Durante il progetto abbiamo raccolto centinaia di ore di registrazioni e le abbiamo trascritte a mano con molta attenzione.",
        "La nuova collega viene da Bologna, parla tre lingue e ha già lavorato in una grande azienda tedesca.",
        "Domani non c'è lezione di matematica.",
    ],
    # 106 city and culture
    [
        "Il museo resta aperto fino a tardi il venerdì sera.",
        "In piazza hanno montato un palco per il concerto di stasera.",
        "La biblioteca del quartiere organizza letture per i più piccoli.",
        "Il teatro comunale è stato restaurato dopo molti anni di lavori.",
        "Al cinema danno un film francese con i sottotitoli.",
        "La cattedrale domina la città dall'alto della collina.",
        "Ogni anno a settembre la città ospita un festival della letteratura.",
        "Le vie del centro sono piene di turisti durante le vacanze.",
        "Il mercato dell'antiquariato si tiene la prima domenica del mese.",
        "Gli affreschi della chiesa raccontano la vita di un santo.",
        "Il sindaco ha inaugurato una nuova pista ciclabile lungo il fiume.",
        "La fontana della piazza principale è stata costruita nel Seicento.",
        "In quella libreria si trovano anche dischi e fumetti usati.",
        "La mostra di fotografia ha avuto moltissimi visitatori.",
        "La sera d'estate le piazze si riempiono di gente che passeggia, mangia un gelato e ascolta la musica dal vivo.",
        "Il castello medievale, costruito su una roccia sopra il mare, oggi ospita un museo dedicato alla storia della navigazione.",
        "Il museo è chiuso lunedì.",
    ],
    # 107 nature, science and health
    [
        "Le api sono fondamentali per l'impollinazione di molte piante.",
        "Il medico mi ha consigliato di camminare almeno mezz'ora al giorno.",
        "I ricercatori hanno osservato una nuova specie di farfalla nel bosco.",
        "La luna piena illuminava il sentiero lungo il torrente.",
        "Bere molta acqua è importante soprattutto quando fa caldo.",
        "Il vulcano è tornato attivo dopo un lungo periodo di calma.",
        "Le tartarughe marine depongono le uova sulle spiagge di notte.",
        "Con il telescopio abbiamo visto gli anelli di Saturno.",
        "Dormire bene aiuta la memoria e la concentrazione.",
        "Nel parco nazionale vivono lupi, cervi e aquile reali.",
        "Il farmacista mi ha spiegato come prendere la medicina.",
        "Gli alberi del viale sono stati piantati più di cento anni fa.",
        "Il computer riconosce la voce trasformando il suono in numeri.",
        "Una rete neurale impara dagli esempi che le vengono mostrati.",
        "Un modello piccolo impara molto da uno grande, se gli mostriamo non solo la risposta ma anche i suoi dubbi.",
        "Gli studiosi hanno misurato la temperatura del mare per vent'anni e hanno osservato un aumento lento ma costante.",
        "Le foglie cadono in autunno.",
    ],
    # 108 sport, free time and conversation
    [
        "La squadra della città ha vinto la partita all'ultimo minuto.",
        "Ogni martedì vado in piscina con due amici dell'università.",
        "Mi hanno regalato una chitarra e sto imparando a suonarla.",
        "Che cosa ne pensi di andare al mare questo fine settimana?",
        "Il giro d'Italia passerà vicino al nostro paese a maggio.",
        "Abbiamo fatto una lunga passeggiata sui sentieri delle Dolomiti.",
        "Mi dispiace, ma stasera non posso venire perché devo studiare.",
        "Mio padre guarda sempre le partite di calcio alla radio.",
        "Sto cercando un regalo per mia madre, hai qualche idea?",
        "Il torneo di scacchi della scuola è durato tutto il pomeriggio.",
        "Grazie mille per l'aiuto, senza di te non ce l'avrei fatta.",
        "Ci vediamo davanti al bar della piazza alle otto in punto.",
        "La palestra ha aperto un nuovo corso di yoga per principianti.",
        "Quando ero piccolo passavo le estati a pescare con mio zio.",
        "Sabato prossimo organizziamo una gita in montagna con gli amici, partiamo presto e portiamo il pranzo al sacco.",
        "Dopo tre ore di partita e due tempi supplementari, la squadra di casa ha finalmente segnato il gol della vittoria.",
        "Andiamo al cinema insieme stasera?",
    ],
]

SPANISH = [
    # 101 daily life
    [
        "Todas las mañanas desayuno pan con tomate y un café con leche.",
        "Mi hermano trabaja en un hospital cerca de la plaza mayor.",
        "Esta tarde vamos a visitar a los abuelos en el pueblo.",
        "He perdido las llaves del coche y no sé dónde buscarlas.",
        "Los niños juegan en el parque hasta que se pone el sol.",
        "El domingo limpiamos la casa y luego comimos en la terraza.",
        "Mi vecina cuida las plantas cuando salgo de viaje.",
        "Nuestro perro siempre espera en la puerta cuando volvemos a casa.",
        "Necesito comprar leche, huevos y fruta para la semana.",
        "Cuando llego a casa por la noche, me gusta preparar una cena sencilla y hablar un rato con mi familia.",
        "Cierra la ventana, por favor.",
    ],
    # 102 weather and travel
    [
        "Hoy hace mucho calor y no hay ni una nube en el cielo.",
        "El tren a Madrid sale del andén tres a las ocho y media.",
        "En invierno nieva mucho en las montañas del norte.",
        "Perdone, ¿sabe dónde está la parada del autobús?",
        "El próximo verano queremos recorrer la costa en bicicleta.",
        "Durante la tormenta se fue la luz en todo el barrio.",
        "El avión aterrizó con una hora de retraso por la niebla.",
        "Llueve desde anoche y las calles están llenas de agua.",
        "El hotel tenía unas vistas preciosas sobre el puerto.",
        "El vuelo a Sevilla se canceló en el último momento y tuvimos que tomar el tren nocturno.",
        "Mañana hará mucho frío en la sierra.",
    ],
    # 103 food, work and culture
    [
        "La paella de mi madre es la mejor que he probado nunca.",
        "La reunión con el director se ha cambiado al jueves por la mañana.",
        "El museo abre gratis los domingos por la tarde.",
        "Los estudiantes preparan el examen en la biblioteca de la facultad.",
        "En el mercado venden pescado fresco todos los días.",
        "El concierto de la orquesta empezó con media hora de retraso.",
        "Mi amiga ha encontrado trabajo en una empresa de traducción.",
        "Para la fiesta hicimos una tarta de chocolate con fresas.",
        "La profesora explicó la lección con mucha paciencia.",
        "Durante el proyecto grabamos cientos de horas de conversaciones y las transcribimos a mano con mucho cuidado.",
        "La cena ya está lista en la mesa.",
    ],
    # 104 nature, sport and conversation
    [
        "Las abejas son muy importantes para las flores del campo.",
        "El equipo ganó el partido en el último minuto.",
        "¿Qué te parece si vamos al cine esta noche?",
        "Muchas gracias por tu ayuda, eres muy amable.",
        "En el bosque vimos un ciervo cerca del río.",
        "Voy a nadar a la piscina dos veces por semana.",
        "El ordenador reconoce la voz convirtiendo el sonido en números.",
        "Nos vemos en la puerta del teatro a las nueve en punto.",
        "Mi abuelo me enseñó a pescar cuando era pequeño.",
        "Un modelo pequeño aprende mucho de uno grande si le mostramos también sus dudas.",
        "¿Sabes dónde está la biblioteca municipal?",
    ],
]

SENTENCES = {"italian": ITALIAN, "spanish": SPANISH}


def mls_text(sentence: str) -> str:
    """The MLS transcript form: lower case, punctuation removed, apostrophes kept, single spaces."""
    text = sentence.lower().replace("’", "'")
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(text.split())


def plan(language: str, rng: random.Random) -> list[dict]:
    """Assign every sentence a split, speaker, speed, pitch and MLS id; returns one dict per utterance."""
    items = [(100 + i + 1, s) for i, topic in enumerate(SENTENCES[language]) for s in topic]
    rng.shuffle(items)
    n_dev, n_test = SPLITS[language]["dev"], SPLITS[language]["test"]
    splits = {"dev": items[:n_dev], "test": items[n_dev:n_dev + n_test], "train": items[n_dev + n_test:]}
    speakers = list(VOICES[language])
    rows, counter = [], 0
    for split in ("train", "dev", "test"):
        for k, (book, sentence) in enumerate(splits[split]):
            speaker = speakers[k % len(speakers)]   # cycle: every split hears every voice
            rows.append({
                "id": f"{speaker}_{book}_{counter:06d}", "split": split, "speaker": speaker,
                "book": str(book), "voice": VOICES[language][speaker], "sentence": sentence,
                "text": mls_text(sentence), "speed": rng.randint(*SPEED_RANGE),
                "pitch": rng.randint(*PITCH_RANGE),
            })
            counter += 1
    return rows


def synthesise(row: dict, out_path: Path, tmp: Path) -> None:
    """espeak-ng (22.05 kHz WAV) -> sox (16 kHz mono 16-bit) -> opusenc (Ogg/Opus)."""
    raw, wav = tmp / "raw.wav", tmp / "16k.wav"
    subprocess.run(["espeak-ng", "-v", row["voice"], "-s", str(row["speed"]), "-p", str(row["pitch"]),
                    "-w", str(raw), row["sentence"]], check=True)
    # -R: repeatable (fixed seeds); gain -n -3: peak at -3 dBFS so resampling never clips.
    subprocess.run(["sox", "-R", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(wav),
                    "gain", "-n", "-3"], check=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["opusenc", "--quiet", "--bitrate", str(OPUS_BITRATE_KBPS), "--serial", "1",
                    str(wav), str(out_path)], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "kdlib" / "corpus",
                        help="corpus folder (default: kdlib/corpus in this repository)")
    parser.add_argument("--languages", nargs="+", default=list(SENTENCES), choices=list(SENTENCES))
    args = parser.parse_args(argv)
    for tool in ("espeak-ng", "sox", "opusenc"):
        if shutil.which(tool) is None:
            sys.exit(f"make_corpus: '{tool}' not found; apt-get install espeak-ng sox opus-tools")

    all_sentences = [s for lang in SENTENCES.values() for topic in lang for s in topic]
    assert len(all_sentences) == len(set(all_sentences)), "duplicate sentence in the lists"
    for language in args.languages:
        rng = random.Random(f"{SEED}-{language}")
        rows = plan(language, rng)
        lang_dir = args.out / language
        if lang_dir.exists():
            shutil.rmtree(lang_dir)
        with tempfile.TemporaryDirectory() as tmp:
            for row in rows:
                audio = lang_dir / row["split"] / "audio" / row["speaker"] / row["book"] / f"{row['id']}.opus"
                synthesise(row, audio, Path(tmp))
        for split in ("train", "dev", "test"):
            lines = [f"{r['id']}\t{r['text']}\n" for r in rows if r["split"] == split]
            (lang_dir / split / "transcripts.txt").write_text("".join(lines), encoding="utf-8")
        (lang_dir / "speakers.tsv").write_text(
            "speaker\tvoice\n" + "".join(f"{s}\t{v}\n" for s, v in VOICES[language].items()), encoding="utf-8")
        (lang_dir / "synthesis.tsv").write_text(
            "id\tsplit\tvoice\tspeed_wpm\tpitch\n"
            + "".join(f"{r['id']}\t{r['split']}\t{r['voice']}\t{r['speed']}\t{r['pitch']}\n" for r in rows),
            encoding="utf-8")
        size = sum(p.stat().st_size for p in lang_dir.rglob("*") if p.is_file())
        counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "dev", "test")}
        print(f"{language}: {counts}, {size / 1e6:.2f} MB in {lang_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
