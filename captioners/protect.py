"""Keep spans verbatim through EN->ZH translation: quoted text (the OCR strings an English caption
quotes) and configured proper nouns are masked with numbered placeholders before translation and
put back afterwards.

Placeholders are ``⟦0⟧``, ``⟦1⟧``, ... (U+27E6/U+27E7 around ASCII digits), numbered in order of
appearance. The LLM translator's prompt names this form; MT models tend to copy a bracketed number
through. ``restore`` is tolerant of what translation does to them: whitespace inside (``⟦ 0 ⟧``),
full-width digits (``⟦０⟧``), the look-alike brackets ``〚 〛`` and a lost bracket (``⟦0`` or
``0⟧``). Anything of placeholder syntax that cannot be put back (a wrong number, a repeat, a lone
bracket) is removed, and ``ok`` is False.

Decisions:

* A quoted span is ``"..."`` (ASCII quotes paired left to right within one line) or ``“...”``
  (curly quotes, nested pairs allowed: the outermost pair is the span). Quotes that cross or nest
  inside an earlier span belong to it; an unbalanced quote is left alone (translated as text);
  empty or blank quotes are left alone.
* A quoted span is restored as ``“`` + the original inner text verbatim + ``”``: Chinese writes
  quotations with the curly double quotes, whichever quotes the English caption used. When the
  translation already put quotes around the placeholder (``“⟦0⟧”``, ``「⟦0⟧」``), only the inner
  text goes in, so there is one pair of quotes, the translator's.
* A noun is matched case-sensitively. Where the noun begins (ends) with an ASCII letter or digit it
  must not be preceded (followed) by one, so ``Rome`` does not match inside ``Romeo``; a Chinese
  noun matches anywhere. Longer nouns win over shorter ones at the same place; quotes win over
  nouns. A noun is restored verbatim.
* Bracket characters ``⟦ ⟧ 〚 〛`` already in the input are protected as spans of their own, so
  the masked text holds them only inside placeholders and they come back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

OPEN, CLOSE = "⟦", "⟧"
_BRACKETS = "⟦⟧〚〛"
_FULLWIDTH_DIGITS = str.maketrans("０１２３４５６７８９", "0123456789")
# A placeholder as it may come out of a translator, or a remnant of one (a lone bracket, a number
# with one bracket). Whitespace includes the ideographic space.
# Possessive quantifiers and the look-behind keep it linear on long runs of digits or spaces.
_PLACEHOLDER = re.compile(r"[⟦〚]\s*+([0-9０-９]++)\s*+[⟧〛]?|(?<![0-9０-９])([0-9０-９]++)\s*+[⟧〛]|[⟦⟧〚〛]")
_OPENING_QUOTES, _CLOSING_QUOTES = '“"「『', '”"」』'
_ASCII_ALNUM = re.compile(r"[A-Za-z0-9]")

Kind = Literal["quote", "noun", "literal"]


@dataclass(frozen=True)
class Span:
    """One protected span of the original text: ``text[start:end]``, and what ``restore`` writes back."""

    start: int
    end: int
    original: str  # the span as it was in the input, quotes included
    replacement: str  # what the placeholder becomes: “inner” for quotes, the noun verbatim
    kind: Kind


@dataclass(frozen=True)
class Protected:
    """The masked text (spans replaced by ``⟦i⟧``, i = index into ``spans``) and the spans."""

    text: str
    spans: tuple[Span, ...]

    @property
    def placeholders(self) -> list[str]:
        return [placeholder(i) for i in range(len(self.spans))]


def placeholder(i: int) -> str:
    return f"{OPEN}{i}{CLOSE}"


def _quote_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of ASCII and curly quoted spans, quotes included (possibly overlapping; the
    caller keeps the first of overlapping ones). Linear in the text."""
    pairs: list[tuple[int, int]] = []
    ascii_open: int | None = None
    curly: list[int] = []
    for i, ch in enumerate(text):
        if ch == '"':
            if ascii_open is None:
                ascii_open = i
            else:
                pairs.append((ascii_open, i + 1))
                ascii_open = None
        elif ch == "\n":
            ascii_open = None  # ASCII quotes pair within a line only
        elif ch == "“":
            curly.append(i)
        elif ch == "”" and curly:
            pairs.append((curly.pop(), i + 1))
    return [(s, e) for s, e in pairs if text[s + 1:e - 1].strip()]


def _noun_pattern(nouns: Sequence[str]) -> re.Pattern[str] | None:
    unique = sorted({n for n in nouns if n and n.strip()}, key=lambda n: (-len(n), n))
    if not unique:
        return None
    parts = []
    for noun in unique:
        before = r"(?<![A-Za-z0-9])" if _ASCII_ALNUM.match(noun[0]) else ""
        after = r"(?![A-Za-z0-9])" if _ASCII_ALNUM.match(noun[-1]) else ""
        parts.append(before + re.escape(noun) + after)
    return re.compile("|".join(parts))


def protect(text: str, nouns: Sequence[str] = ()) -> Protected:
    """Mask quoted spans, the given proper nouns and stray bracket characters with ``⟦i⟧``."""
    candidates: list[tuple[int, int, Kind]] = [(s, e, "quote") for s, e in _quote_spans(text)]
    pattern = _noun_pattern(nouns)
    if pattern is not None:
        candidates += [(m.start(), m.end(), "noun") for m in pattern.finditer(text)]
    candidates += [(i, i + 1, "literal") for i, ch in enumerate(text) if ch in _BRACKETS]
    # Earliest start first; at the same start the longest; quotes before nouns before literals.
    order = {"quote": 0, "noun": 1, "literal": 2}
    candidates.sort(key=lambda c: (c[0], -(c[1] - c[0]), order[c[2]]))
    spans: list[Span] = []
    end = 0
    for s, e, kind in candidates:
        if s < end:
            continue  # inside (or crossing) a span already taken
        original = text[s:e]
        replacement = f"“{original[1:-1]}”" if kind == "quote" else original
        spans.append(Span(s, e, original, replacement, kind))
        end = e
    if not spans:
        return Protected(text, ())
    pieces, pos = [], 0
    for i, span in enumerate(spans):
        pieces += [text[pos:span.start], placeholder(i)]
        pos = span.end
    pieces.append(text[pos:])
    return Protected("".join(pieces), tuple(spans))


def restore(translated: str, protected: Protected) -> tuple[str, bool]:
    """Put the spans back into a translation of ``protected.text``.

    Returns (text, ok). ok is False when a placeholder is missing, repeated or mangled (a lost
    bracket, a number that names no span). Then every span whose number is still readable is put
    back once (the first time its number appears), and nothing of placeholder syntax is left.
    """
    spans = protected.spans
    used = [False] * len(spans)
    ok = True

    def put_back(m: re.Match[str]) -> str:
        nonlocal ok
        whole, number = m.group(0), m.group(1) or m.group(2)
        clean = whole[:1] in "⟦〚" and whole[-1:] in "⟧〛"
        if number is None:  # a lone bracket
            ok = False
            return ""
        i = int(number.translate(_FULLWIDTH_DIGITS)) if len(number) <= 9 else len(spans)
        if i >= len(spans) or used[i]:
            ok = False
            return ""
        if not clean:
            ok = False
        used[i] = True
        span = spans[i]
        if span.kind == "quote" and m.start() > 0 and m.end() < len(translated) \
                and translated[m.start() - 1] in _OPENING_QUOTES and translated[m.end()] in _CLOSING_QUOTES:
            return span.original[1:-1]  # the translation quoted the placeholder itself: no second pair
        return span.replacement

    if not any(ch in translated for ch in _BRACKETS):
        return translated, not spans  # every placeholder lost (or there were none)
    out = _PLACEHOLDER.sub(put_back, translated)
    return out, ok and all(used)
