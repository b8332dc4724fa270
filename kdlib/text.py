"""Text rules shared by scanning, training and scoring: Whisper's basic normaliser and the one
predicate that decides whether a transcript is usable.

`basic_normalize` is what every WER in the book is computed on (``"normalizer": "whisper-basic"``);
`usable_transcript` says whether a transcript has any word left after it. The scan
(`kdlib.data.scan_mls`) skips and counts a transcript that has none ("empty text"), so training
never learns from a clip that evaluation could not score, and scoring (`kdlib.decode.wer_cer`)
applies the same rule to references that come from elsewhere (pseudo-labels, a user's list).

This module sits at the bottom of the house: it imports nothing of kdlib, nor torch.
"""

from __future__ import annotations

import re
import unicodedata

NORMALIZER = "whisper-basic"

# Letters that NFKD does not split into base + combining mark (Whisper's basic.py keeps the same
# table); only used when remove_diacritics=True.
_ADDITIONAL_DIACRITICS = {
    "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "ß": "ss", "ẞ": "SS",
    "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "th", "ł": "l", "Ł": "L",
}
_BRACKETED = re.compile(r"[<\[][^>\]]*[>\]]")  # [music], <unk>: non-nested spans
_PARENTHESISED = re.compile(r"\([^)]+?\)")  # (ride), (applausi)
_WHITESPACE = re.compile(r"\s+")


def _symbols_to_spaces(text: str) -> str:
    # NFKC first: a decomposed "e" + U+0300 becomes the single letter "è" (category Ll) and is kept.
    return "".join(
        " " if unicodedata.category(c)[0] in "MSP" else c for c in unicodedata.normalize("NFKC", text)
    )


def _symbols_and_diacritics_to_spaces(text: str) -> str:
    out = []
    for c in unicodedata.normalize("NFKD", text):
        if c in _ADDITIONAL_DIACRITICS:
            out.append(_ADDITIONAL_DIACRITICS[c])
        elif unicodedata.category(c) == "Mn":  # the accent split off by NFKD: dropped
            continue
        elif unicodedata.category(c)[0] in "MSP":
            out.append(" ")
        else:
            out.append(c)
    return "".join(out)


def basic_normalize(text: str, *, remove_diacritics: bool = False) -> str:
    """Whisper's *basic* text normaliser (openai/whisper ``whisper/normalizers/basic.py``,
    ``BasicTextNormalizer``), the one Whisper's authors use for every language but English.

    Steps: lower-case; drop spans in ``[...]``/``<...>`` and ``(...)``; Unicode NFKC, then every
    character of category M (marks), S (symbols) or P (punctuation) becomes a space; lower-case
    again; collapse runs of whitespace into one space. Our own implementation of the same rules;
    two deliberate details:

    * **Diacritics are kept** (Whisper's default, ``remove_diacritics=False``): "perché" stays
      "perché", and "perche" counts as an error. NFKC composes a decomposed "e" + combining grave
      into "è" first, so the same word typed two ways normalises the same. With
      ``remove_diacritics=True`` accents are stripped ("perché" → "perche").
    * The result is stripped of leading/trailing spaces (Whisper leaves them; word splitting
      is the same either way).

    Apostrophes are punctuation, so "l'acqua" → "l acqua" on both sides of the comparison.
    Numbers are not spelled out (the English normaliser's job, not this one's).
    """
    s = text.lower()
    s = _BRACKETED.sub("", s)
    s = _PARENTHESISED.sub("", s)
    s = (_symbols_and_diacritics_to_spaces if remove_diacritics else _symbols_to_spaces)(s).lower()
    return _WHITESPACE.sub(" ", s).strip()


def usable_transcript(text: str) -> bool:
    """Does ``text`` hold a word after `basic_normalize`? ("...", "[musica]" and "" do not.)"""
    return bool(basic_normalize(text or ""))
