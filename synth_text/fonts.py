"""Installed CJK fonts for synthetic text images: discovery by family name, coverage checks.

Family and style come from the font's ``name`` table (typographic family/subfamily, IDs 16/17, when present, else
IDs 1/2), never from file names: e.g. ``NotoSansCJK-Black.ttc`` face 2 is family "Noto Sans CJK SC", style "Black".
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_DIRS",
    "DEFAULT_FAMILIES",
    "FONT_SUFFIXES",
    "Font",
    "FontError",
    "discover_fonts",
    "fonts_covering",
    "load_fonts",
]

log = logging.getLogger(__name__)

DEFAULT_FAMILIES: tuple[str, ...] = (
    "Noto Sans CJK SC",
    "Noto Serif CJK SC",
    "WenQuanYi Zen Hei",
    "AR PL UKai CN",
    "AR PL UMing CN",
)
DEFAULT_DIRS: tuple[str, ...] = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")


class FontError(ValueError):
    """A font file is missing, is not a font, or is corrupt (the message names the path)."""


@dataclass(frozen=True)
class Font:
    """One face of a font file: ``index`` is the face inside a collection (.ttc), 0 for .ttf/.otf."""

    path: str
    index: int
    family: str
    style: str

    @property
    def name(self) -> str:
        """Family and style, e.g. "Noto Sans CJK SC Bold", "WenQuanYi Zen Hei Regular"."""
        return f"{self.family} {self.style}" if self.style else self.family

    def covers(self, text: str) -> bool:
        """True when every character of ``text`` has a glyph in this face's cmap (whitespace is ignored)."""
        return _cmap(self.path, self.index).issuperset(map(ord, "".join(text.split())))

    def codepoints(self) -> frozenset[int]:
        """The code points this face maps (cached)."""
        return _cmap(self.path, self.index)


def _is_collection(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"ttcf"


def _open_faces(path: str):
    """fontTools TTFont objects for every face of ``path`` (lazy); raises FontError."""
    from fontTools.ttLib import TTCollection, TTFont, TTLibError

    if not os.path.isfile(path):
        raise FontError(f"font file not found: {path}")
    try:
        if _is_collection(path):
            return list(TTCollection(path, lazy=True).fonts)
        return [TTFont(path, lazy=True)]
    except (TTLibError, OSError, AssertionError, KeyError, ValueError, IndexError, EOFError) as exc:
        raise FontError(f"not a readable font file: {path}: {exc}") from exc
    except Exception as exc:  # fontTools raises many kinds of errors on garbage
        raise FontError(f"not a readable font file: {path}: {type(exc).__name__}: {exc}") from exc


def _names(tt, path: str, index: int) -> tuple[str, str]:
    try:
        table = tt["name"]
    except Exception as exc:
        raise FontError(f"font has no readable 'name' table: {path} (face {index}): {exc}") from exc
    family = table.getDebugName(16) or table.getDebugName(1)
    style = table.getDebugName(17) or table.getDebugName(2) or "Regular"
    if not family:
        raise FontError(f"font has no family name: {path} (face {index})")
    return family.strip(), style.strip()


@functools.lru_cache(maxsize=256)
def _file_faces(path: str, mtime_ns: int, size: int) -> tuple[Font, ...]:
    faces = _open_faces(path)
    out = []
    for i, tt in enumerate(faces):
        family, style = _names(tt, path, i)
        out.append(Font(path=path, index=i, family=family, style=style))
    return tuple(out)


def _faces_of(path: str) -> tuple[Font, ...]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FontError(f"font file not found: {path}") from exc
    return _file_faces(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=512)
def _cmap(path: str, index: int) -> frozenset[int]:
    faces = _open_faces(path)
    if not 0 <= index < len(faces):
        raise FontError(f"font {path} has {len(faces)} face(s), no face {index}")
    try:
        cmap = faces[index].getBestCmap()
    except Exception as exc:
        raise FontError(f"font has no readable cmap: {path} (face {index}): {exc}") from exc
    if not cmap:
        raise FontError(f"font has no Unicode cmap: {path} (face {index})")
    return frozenset(cmap)


def _font_files(dirs: Iterable[str]) -> list[str]:
    files: set[str] = set()
    for d in dirs:
        root = Path(os.path.expanduser(d))
        if not root.is_dir():
            continue
        for p in root.rglob("*"):
            if p.suffix.lower() in FONT_SUFFIXES and p.is_file():
                files.add(str(p))
    return sorted(files)


def _sort_key(f: Font) -> tuple[str, str, str, int]:
    return (f.family, f.style, f.path, f.index)


def discover_fonts(families: Sequence[str] = DEFAULT_FAMILIES, dirs: Sequence[str] = DEFAULT_DIRS) -> list[Font]:
    """Every installed face whose family (from the 'name' table) is one of ``families``.

    Searches ``dirs`` recursively for .ttf/.otf/.ttc/.otc files; files fontTools cannot parse are skipped with a
    warning naming them. Sorted by (family, style, path, index), so the order is deterministic.
    """
    wanted = {f.casefold() for f in families}
    found: list[Font] = []
    for path in _font_files(dirs):
        try:
            faces = _faces_of(path)
        except FontError as exc:
            log.warning("skipping font file %s: %s", path, exc)
            continue
        found.extend(f for f in faces if f.family.casefold() in wanted)
    return sorted(set(found), key=_sort_key)


def load_fonts(paths: Sequence[str]) -> list[Font]:
    """Every face of each explicitly configured font file; a missing or corrupt file raises FontError."""
    found: list[Font] = []
    for p in paths:
        path = os.path.abspath(os.path.expanduser(p))
        faces = _faces_of(path)
        if not faces:
            raise FontError(f"font file has no faces: {path}")
        # fail now, not mid-run, if the glyph map is unreadable
        for f in faces:
            _cmap(f.path, f.index)
        found.extend(faces)
    return sorted(set(found), key=_sort_key)


def fonts_covering(fonts: Iterable[Font], text: str) -> list[Font]:
    """The fonts (in the given order) that have a glyph for every character of ``text``."""
    return [f for f in fonts if f.covers(text)]
