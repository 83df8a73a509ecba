"""The word list for synthetic Chinese text images: the most frequent Han words of jieba's dictionary.

Kolors renders images of the 50,000 most frequent Chinese words. jieba ships ``dict.txt`` (``word count tag`` per
line, 349,046 lines); :func:`top_words` keeps the words written only with Han characters (CJK Unified Ideographs
U+4E00..U+9FFF and Extension A U+3400..U+4DBF), which is 348,974 distinct words, ranked by count.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["HAN_RE", "draw_words", "is_han", "jieba_dict_path", "phrase", "phrase_lines", "split_lines", "top_words"]

HAN_RE = re.compile(r"^[\u3400-\u4dbf\u4e00-\u9fff]+$")


def is_han(text: str) -> bool:
    """True when ``text`` is non-empty and made only of CJK Unified Ideographs (incl. Extension A)."""
    return bool(HAN_RE.match(text))


def jieba_dict_path() -> Path:
    """The path of jieba's bundled ``dict.txt`` (found without importing jieba's tokenizer)."""
    import importlib.util

    spec = importlib.util.find_spec("jieba")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("jieba is not installed: it provides dict.txt, the word-frequency list")
    path = Path(next(iter(spec.submodule_search_locations))) / "dict.txt"
    if not path.is_file():
        raise RuntimeError(f"jieba's dictionary is missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def _ranked_words() -> tuple[str, ...]:
    counts: dict[str, int] = {}
    with open(jieba_dict_path(), encoding="utf-8") as fh:
        for line in fh:
            parts = line.split(" ", 2)
            if len(parts) < 2:
                continue
            word = parts[0]
            if not HAN_RE.match(word):
                continue
            try:
                count = int(parts[1])
            except ValueError:
                continue
            if count > counts.get(word, -1):
                counts[word] = count
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(w for w, _ in ranked)


def top_words(n: int | None = None) -> list[str]:
    """The ``n`` most frequent Han-only words of jieba's ``dict.txt`` (None: all of them).

    Words with any non-Han character (Latin, digits, punctuation, symbols) are dropped; a word listed twice keeps its
    larger count. Order: count descending, then the word itself (code-point order), so the list is deterministic.
    348,974 of the file's 349,046 entries pass the filter (jieba 0.42.1); the first ones are
    了 是 在 和 有 他 不 我 的 人. The parse (about 1.5 s) is cached.
    """
    ranked = _ranked_words()
    if n is None:
        return list(ranked)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or None, not {type(n).__name__}")
    if n < 1 or n > len(ranked):
        raise ValueError(f"n must be between 1 and {len(ranked)} (Han words in jieba's dict.txt), got {n}")
    return list(ranked[:n])


def _rng(seed: int, index: int) -> random.Random:
    # str seeds go through SHA-512 in random.Random: stable across processes (unlike hash()).
    return random.Random(f"{seed}:{index}")


def phrase_lines(words: Sequence[str], seed: int, index: int, n_words: int, n_lines: int = 1) -> list[str]:
    """``n_words`` words drawn from ``words`` (deterministic in ``(seed, index)``), grouped into ``n_lines`` lines.

    Words are concatenated without spaces (as Chinese is written); lines split at word boundaries, balancing the
    number of characters per line. ``n_lines`` is capped at ``n_words``.
    """
    if n_words < 1:
        raise ValueError(f"n_words must be >= 1, got {n_words}")
    if n_lines < 1:
        raise ValueError(f"n_lines must be >= 1, got {n_lines}")
    if not words:
        raise ValueError("words is empty: nothing to draw a phrase from")
    return split_lines(draw_words(words, seed, index, n_words), n_lines)


def draw_words(words: Sequence[str], seed: int, index: int, n_words: int) -> list[str]:
    """``n_words`` words drawn (with replacement) from ``words``, deterministic in ``(seed, index)``."""
    if n_words < 0:
        raise ValueError(f"n_words must be >= 0, got {n_words}")
    if n_words and not words:
        raise ValueError("words is empty: nothing to draw from")
    rng = _rng(seed, index)
    return [words[rng.randrange(len(words))] for _ in range(n_words)]


def split_lines(picked: Sequence[str], n_lines: int) -> list[str]:
    """Group consecutive words into ``n_lines`` lines with character counts as even as possible."""
    n_lines = max(1, min(n_lines, len(picked)))
    total = sum(len(w) for w in picked)
    lines: list[str] = []
    current = ""
    done = 0
    for i, w in enumerate(picked):
        remaining_words = len(picked) - i
        remaining_lines = n_lines - len(lines)
        target = (total - done) / remaining_lines
        # close the current line when adding w overshoots the target more than leaving it short,
        # or when every remaining word is needed to fill the remaining lines.
        if current and remaining_lines > 1 and (
            abs(len(current) + len(w) - target) > abs(len(current) - target) or remaining_words < remaining_lines
        ):
            lines.append(current)
            done += len(current)
            current = ""
        current += w
    lines.append(current)
    return lines


def phrase(words: Sequence[str], seed: int, index: int, n_words: int) -> str:
    """A phrase of ``n_words`` words drawn from ``words``, deterministic in ``(seed, index)``.

    The same as ``"".join(phrase_lines(words, seed, index, n_words))``.
    """
    return "".join(phrase_lines(words, seed, index, n_words, 1))
