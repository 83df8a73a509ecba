"""Spot machine captions stuck in a repetition loop (a VLM failure mode: "a red car, a red car, ...").

``is_repetitive(text)`` looks at units: words for Latin-script text (lower-cased runs of letters and
digits) and single characters for CJK (Chinese, Japanese kana, Korean Hangul), so a Chinese loop is
caught without a word segmenter. Punctuation and spaces are dropped, so "猫，猫，猫" and "猫猫猫" are alike.

Four tests, any one flags the text (thresholds are module constants):

1. A loop at the end (where a greedy decoder that is stuck ends up, often cut off by max_new_tokens):
   the last units repeat with some period ``p`` (1 to ``MAX_PERIOD`` = 32 units) at least
   ``MIN_REPEATS`` = 3 times over at least ``MIN_LOOP_UNITS`` = 20 units. A cut-off last copy counts
   for the units it has, and a cut-off last word ("... a red ca") is allowed. So "very very very"
   (3 units) or a phrase said twice are not flagged; a 5-word phrase said 4 times (20 units) is, and so
   is one word said 20 times.
2. A loop anywhere (one the decoder got out of): at least ``MIN_REPEATS_ANYWHERE`` = 4 copies over at
   least ``MIN_LOOP_UNITS_ANYWHERE`` = 40 units, e.g. a 4-word phrase said 10 times mid-caption.
3. Few distinct n-grams over a long text (several loops): with at least ``MIN_UNITS_FOR_RATIO`` = 60
   units, the share of distinct ``NGRAM`` = 4-grams among all 4-grams is below
   ``MIN_DISTINCT_RATIO`` = 0.5. A normal detailed caption of a few hundred words repeats few
   4-grams (its ratio is above 0.9).
4. A "word" of at least ``LONG_UNIT`` = 40 letters that is one pattern of up to ``UNIT_PERIOD`` = 8
   letters over and over ("hahahaha...", "xxxx..."): a loop inside a word, with no spaces.

Cost: linear in the text's length: the units are mapped to integers once, then one vectorised
(numpy) comparison of the sequence with itself shifted by each period, and one pass for the n-grams.
A 1 MB text takes a fraction of a second.
"""

from __future__ import annotations

import re

import numpy as np

MAX_PERIOD = 32
MIN_REPEATS = 3
MIN_LOOP_UNITS = 20
MIN_REPEATS_ANYWHERE = 4
MIN_LOOP_UNITS_ANYWHERE = 40
NGRAM = 4
MIN_UNITS_FOR_RATIO = 60
MIN_DISTINCT_RATIO = 0.5
LONG_UNIT = 40
UNIT_PERIOD = 8

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# A CJK character alone, or a run of other letters/digits (\w without "_" and without CJK).
_UNIT = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")


def units(text: str) -> list[str]:
    """Words (lower-cased) for Latin-script text, single characters for CJK; punctuation dropped."""
    return _UNIT.findall(text.lower())


def _ids(seq: list[str]) -> np.ndarray:
    index: dict[str, int] = {}
    return np.fromiter((index.setdefault(u, len(index)) for u in seq), dtype=np.int64, count=len(seq))


def loops(seq: list[str], max_period: int = MAX_PERIOD) -> tuple[tuple[int, int], tuple[int, int]]:
    """((period, units) of the longest loop at the end, (period, units) of the longest loop anywhere).

    A loop of period p over u units: u - p consecutive units each equal to the one p before.
    The end loop may stop one unit short of the end (a word cut off by max_new_tokens)."""
    ids = _ids(seq)
    n = len(ids)
    tail, anywhere = (0, 0), (0, 0)
    for p in range(1, min(max_period, n // 2) + 1):
        eq = np.concatenate(([False], ids[p:] == ids[:-p], [False]))
        edges = np.flatnonzero(eq[1:] != eq[:-1])  # run starts and ends, alternating
        if not len(edges):
            continue
        starts, ends = edges[0::2], edges[1::2]
        lengths = ends - starts
        k = int(lengths.argmax())
        if lengths[k] + p > anywhere[1]:
            anywhere = (p, int(lengths[k]) + p)
        if ends[-1] >= n - p - 1 and lengths[-1] + p > tail[1]:  # the last run reaches the end (or one short)
            tail = (p, int(lengths[-1]) + p)
    return tail, anywhere


def distinct_ngram_ratio(seq: list[str], n: int = NGRAM) -> float:
    """Distinct n-grams over all n-grams (1.0 for a sequence shorter than n)."""
    total = len(seq) - n + 1
    if total <= 0:
        return 1.0
    seen = {hash(tuple(seq[i:i + n])) for i in range(total)}
    return len(seen) / total


def looping_unit(unit: str) -> bool:
    """A long unit that is one short pattern repeated (the last copy may be cut off)."""
    if len(unit) < LONG_UNIT:
        return False
    return any(unit[p:] == unit[:-p] for p in range(1, UNIT_PERIOD + 1))


def is_repetitive(text: str) -> bool:
    """True when ``text`` has a repetition loop or is mostly repeated n-grams (see the module doc)."""
    seq = units(text)
    if any(looping_unit(u) for u in seq):
        return True
    if len(seq) < MIN_LOOP_UNITS:
        return False
    (tp, tu), (ap, au) = loops(seq)
    if tp and tu >= MIN_LOOP_UNITS and tu >= MIN_REPEATS * tp:
        return True
    if ap and au >= MIN_LOOP_UNITS_ANYWHERE and au >= MIN_REPEATS_ANYWHERE * ap:
        return True
    return len(seq) >= MIN_UNITS_FOR_RATIO and distinct_ngram_ratio(seq) < MIN_DISTINCT_RATIO
