"""Check the numbers a chapter's prose states against the chapter's ``results.json``.

    python scripts/check_claims.py notebooks/07_stage3_decoder.ipynb runs/07_stage3_decoder/results.json
    python scripts/check_claims.py --keys-only NOTEBOOK RESULTS   # smoke size: the keys exist, values differ

Every chapter writes ``<out_dir>/results.json``: the numbers its prose states, measured by that
run. A measured number in a markdown cell carries an invisible marker right after it, naming
its key (a dotted path into results.json; list items by index)::

    the dev WER fell to 0.39<!-- results: rows.stage1.wer --> after stage I
    both train 327 680<!-- results: student.ffn --><!-- results: student.qkvo_all --> parameters
    42.5<!-- results: payoff.dev.teacher.wer *100 --> / 17.3<!-- results: payoff.dev.teacher.cer *100 -->
    about 0.5<!-- results: trainable.share ~0.2 --> % of its parameters
    t-SNE keeps 0.5–0.6<!-- results: preservation.t-SNE.knn_overlap --> of the neighbours

- The number must equal the result (times the optional ``*SCALE``) rounded to the decimals the
  prose prints: ``0.39`` accepts 0.385 to 0.395, ``1500`` only 1500 (half a unit of the last
  printed digit).
- A range ``0.5–0.6`` accepts every result that prints inside it.
- ``~TOL`` widens that to an absolute tolerance in the prose's units, for numbers the prose
  gives as "about".
- Thousands may be written ``51,865`` or ``51 865``.

A measured-looking number without a marker is an error too (`unmarked`): a decimal number or a
percentage in a sentence about WER, CER, RTF, a loss, nats, radians or a cosine, outside code
and math. Numbers that are not this run's measurements (the facts page, a paper, plain
arithmetic) say so with ``<!-- cited -->`` after the number, or are written in words.

`make book` (scripts/build_book.py) runs `check` after every executed chapter, at demo size, and
stops naming the chapter, the prose and the result; the tests run `missing_keys` at smoke size,
where the values differ but every marker's key must exist.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# A number (thousands separated by ",", a space, a thin or no-break space), or a range of two
# ("0.5–0.6", "0.5-0.6"), then one marker or several.
_NUM = r"-?\d{1,3}(?:[,\u2009\u202f\u00a0 ]\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"
_NUMBER = rf"(?:(?P<low>{_NUM})\s?[–-]\s?)?(?P<number>{_NUM})"
MARKER = re.compile(_NUMBER + r"(?P<markers>(?:<!--\s*results:[^>]*?-->)+)")
ANY_MARKER = re.compile(r"<!--\s*results:\s*(?P<spec>[^>]*?)\s*-->")
CITED = re.compile(r"<!--\s*cited[^>]*-->")
# Measured-looking: a decimal number or a percentage (not a version like 1.2.1, not part of a word).
_LOOKS_MEASURED = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)(?:\s*%)?|(?<![\w.])\d+\s*%")
_MEASURE_WORDS = re.compile(r"\b(WER|CER|RTF|loss|nats?|rad|cosine)\b")
# What a setting looks like just before its number: "λ = ", "T = ", "weight 0.5", "lr 3e-4".
_SETTING = re.compile(r"(=|λ|\b(weight|lr|rate|threshold|factor|floor))\s*$")


@dataclass(frozen=True)
class Claim:
    """One marked number: ``text`` as the prose prints it, ``key`` into results.json; ``low``
    the first number of a range ("0.5–0.6": the result must lie between the two)."""
    text: str
    key: str
    scale: float = 1.0
    tolerance: float | None = None
    context: str = ""
    low: str | None = None

    @property
    def value(self) -> float:
        return _number(self.text)

    def agrees(self, result: float) -> bool:
        """The scaled ``result`` prints as this number (or lies in this range)."""
        shown = result * self.scale
        if not math.isfinite(shown):
            return False
        if self.low is not None:
            return _number(self.low) - self.allowed <= shown <= self.value + self.allowed
        return abs(self.value - shown) <= self.allowed

    @property
    def allowed(self) -> float:
        """How far the prose may be from the scaled result: half a unit of its last digit."""
        decimals = len(self.text.split(".")[1]) if "." in self.text else 0
        half_unit = 0.5 * 10 ** -decimals
        return max(half_unit, self.tolerance or 0.0) + 1e-9

    @property
    def printed(self) -> str:
        return f"{self.low}–{self.text}" if self.low is not None else self.text


def _number(text: str) -> float:
    return float(re.sub(r"[,\u2009\u202f\u00a0 ]", "", text))


def _parse_spec(spec: str) -> tuple[str, float, float | None]:
    parts = spec.split()
    if not parts:
        raise ValueError("empty results marker: write <!-- results: KEY -->")
    key, scale, tolerance = parts[0], 1.0, None
    for part in parts[1:]:
        if part.startswith("*"):
            scale = float(part[1:])
        elif part.startswith("~"):
            tolerance = float(part[1:])
        else:
            raise ValueError(f"results marker {spec!r}: unknown option {part!r} (use *SCALE or ~TOL)")
    return key, scale, tolerance


def markdown_cells(notebook: Path) -> list[str]:
    """The markdown cells' text of a notebook (.ipynb) or of its jupytext percent source (.py)."""
    notebook = Path(notebook)
    if notebook.suffix == ".ipynb":
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                for c in cells if c["cell_type"] == "markdown"]
    cells, current = [], None
    for line in notebook.read_text(encoding="utf-8").splitlines():
        if line.startswith("# %%"):
            if current is not None:
                cells.append("\n".join(current))
            current = [] if "[markdown]" in line else None
        elif current is not None:
            current.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    if current is not None:
        cells.append("\n".join(current))
    return cells


def _context(text: str, start: int, end: int) -> str:
    left = text.rfind("\n", 0, start) + 1
    right = text.find("\n", end)
    line = text[left:right if right >= 0 else len(text)]
    return ANY_MARKER.sub("", line).strip()


def claims(markdown: str) -> list[Claim]:
    """The marked numbers in one markdown text. A marker with no number right before it is an
    error (ValueError): the marker would check nothing."""
    found, used = [], set()
    for match in MARKER.finditer(markdown):
        for marker in ANY_MARKER.finditer(markdown, match.start("markers"), match.end("markers")):
            key, scale, tolerance = _parse_spec(marker["spec"])
            found.append(Claim(match["number"], key, scale, tolerance,
                               _context(markdown, match.start(), match.end()), match["low"]))
            used.add(marker.start())
    for match in ANY_MARKER.finditer(markdown):
        if match.start() not in used:
            raise ValueError(f"results marker {match.group(0)!r} does not follow a number: "
                             f"{_context(markdown, match.start(), match.end())!r}")
    return found


def chapter_claims(notebook: Path) -> list[Claim]:
    """Every marked number in a chapter's markdown cells, in order."""
    found = []
    for cell in markdown_cells(notebook):
        try:
            found += claims(cell)
        except ValueError as err:
            raise ValueError(f"{Path(notebook).name}: {err}") from None
    return found


_MISSING = object()


def lookup(results, key: str):
    """``results`` at the dotted ``key`` (``rows.2.wer``); a missing key gives `_MISSING`."""
    node = results
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def missing_keys(notebook: Path, results: dict, allow_null: bool = False) -> list[str]:
    """One message per marker whose key is not a number in ``results``. ``allow_null``: a null
    value passes (at smoke size a chapter skips parts, e.g. CTranslate2, and writes null)."""
    problems = []
    for claim in chapter_claims(notebook):
        value = lookup(results, claim.key)
        if value is _MISSING:
            problems.append(f"{Path(notebook).stem}: the prose's {claim.printed} names results key "
                            f"{claim.key!r}, which results.json does not have ({claim.context!r})")
        elif value is None and allow_null:
            continue
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{Path(notebook).stem}: results key {claim.key!r} is {value!r}, not a "
                            f"number, but the prose states {claim.printed} ({claim.context!r})")
    return problems


def mismatches(notebook: Path, results: dict) -> list[str]:
    """One message per marked number that disagrees with ``results`` (missing keys included)."""
    problems = missing_keys(notebook, results)
    for claim in chapter_claims(notebook):
        value = lookup(results, claim.key)
        if value is _MISSING or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not claim.agrees(value):
            shown = value * claim.scale
            problems.append(f"{Path(notebook).stem}: the prose says {claim.printed} but results.json has "
                            f"{claim.key} = {shown:.6g}" + (f" (= {value!r} × {claim.scale:g})" if claim.scale != 1 else "")
                            + f": {claim.context!r}")
    return problems


def _strip_code_and_math(text: str) -> str:
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    return re.sub(r"\$[^$]*\$", " ", text)


def unmarked(notebook: Path) -> list[str]:
    """Measured-looking numbers with no marker: a decimal number or a percentage in a sentence
    (or table row) that mentions WER, CER, RTF, a loss, nats, rad or a cosine (`_MEASURE_WORDS`),
    neither marked ``results:`` nor ``cited``. A
    setting is not a measurement: a number right after "=", "λ", "weight", "lr", "rate",
    "threshold", "factor" or "floor", or right before "·" (0.8·CE), is left alone."""
    problems = []
    for cell in markdown_cells(notebook):
        # markers become one character each, so their contents (keys, ~0.05) are not read as prose
        text = CITED.sub("\x01", ANY_MARKER.sub("\x01", _strip_code_and_math(cell)))
        # A sentence ends at ". " / a line that starts a list item or a table row.
        for sentence in re.split(r"(?<=[.!?:])\s+(?=[A-Z*(])|\n(?=\s*(?:[-*|]|\d+\.)\s)|\n\n", text):
            if not _MEASURE_WORDS.search(sentence):
                continue
            for match in _LOOKS_MEASURED.finditer(sentence):
                after = sentence[match.end():match.end() + 120]
                if after.lstrip().startswith("\x01") or re.match(r"\s?[–-]\s?\d[\d.]*\s*\x01", after):
                    continue  # marked (a range's first number too)
                if _SETTING.search(sentence[:match.start()]) or re.match(r"\s*·", after):
                    continue  # a setting (λ = 0.1, weight 0.5) or a formula's coefficient (0.8·CE)
                problems.append(f"{Path(notebook).stem}: {match.group(0).strip()!r} looks measured but has no "
                                f"<!-- results: KEY --> (or <!-- cited -->) marker: "
                                f"{sentence.replace(chr(1), '').strip()[:200]!r}")
    return problems


def check(notebook: Path, results_path: Path, keys_only: bool = False) -> list[str]:
    """Everything wrong with one chapter's stated numbers; empty when prose and results agree."""
    results_path = Path(results_path)
    if not results_path.is_file():
        return [f"{Path(notebook).stem}: no {results_path} (every chapter writes <out_dir>/results.json)"]
    results = json.loads(results_path.read_text(encoding="utf-8"))
    found = missing_keys(notebook, results, allow_null=True) if keys_only else mismatches(notebook, results)
    return found + unmarked(notebook)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path, help="notebooks/NN_topic.ipynb (or .py, or an executed copy)")
    parser.add_argument("results", type=Path, help="the chapter's <out_dir>/results.json")
    parser.add_argument("--keys-only", action="store_true",
                        help="only check that every marker's key exists (smoke size)")
    args = parser.parse_args(argv)
    problems = check(args.notebook, args.results, args.keys_only)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{args.notebook.stem}: {len(chapter_claims(args.notebook))} stated numbers agree with {args.results}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
