"""Cutting a document's numbered lines into passages that keep their line range.

Greedy by lines up to a character budget (about 4 characters a token), preferring to cut at a
paragraph boundary once the passage is half full; a cut inside a paragraph repeats the last
lines (up to ``overlap`` characters) at the start of the next passage. A line longer than the
budget (minified files) is split into pieces that share its line number. Each passage also
records the heading in force where it starts (Markdown ``#`` or reStructuredText underlines).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MAX_CHARS = 1200
DEFAULT_OVERLAP = 150

_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_MD_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.+?)\s*#*\s*$")


@dataclass
class Piece:
    start: int  # first line number (1-based, inclusive)
    end: int  # last line number (inclusive)
    text: str
    section: str | None


def _headings(items: list[tuple[int, str]]) -> list[str | None]:
    current: str | None = None
    out: list[str | None] = []
    for i, (_, text) in enumerate(items):
        match = _MD_HEADING.match(text)
        if match:
            current = match.group(2).strip()
        elif (
            i + 1 < len(items)
            and text.strip()
            and _RST_UNDERLINE.match(items[i + 1][1])
            and len(items[i + 1][1].strip()) >= len(text.strip())
        ):
            current = text.strip()
        out.append(current)
    return out


def chunk_lines(lines: list[tuple[int, str]], max_chars: int = DEFAULT_MAX_CHARS,
                overlap: int = DEFAULT_OVERLAP) -> list[Piece]:
    items: list[tuple[int, str]] = []
    for number, text in lines:
        text = text.rstrip()
        if len(text) > max_chars:
            items.extend((number, text[i:i + max_chars]) for i in range(0, len(text), max_chars))
        else:
            items.append((number, text))
    headings = _headings(items)
    pieces: list[Piece] = []
    n = len(items)
    start = 0
    while start < n:
        while start < n and not items[start][1].strip():
            start += 1
        if start >= n:
            break
        size, end, paragraph_cut = 0, start, None
        while end < n:
            cost = len(items[end][1]) + 1
            if size + cost > max_chars and end > start:
                break
            size += cost
            end += 1
            if end < n and not items[end][1].strip() and size >= max_chars // 2:
                paragraph_cut = end
        if end < n and paragraph_cut is not None:
            end = paragraph_cut
        body = items[start:end]
        while body and not body[-1][1].strip():
            body.pop()
        pieces.append(Piece(body[0][0], body[-1][0], "\n".join(t for _, t in body), headings[start]))
        if end >= n:
            break
        next_start = end
        if paragraph_cut is None:  # cut inside a paragraph: repeat its last lines
            carried = 0
            while next_start - 1 > start and carried + len(items[next_start - 1][1]) + 1 <= overlap:
                next_start -= 1
                carried += len(items[next_start][1]) + 1
        start = next_start
    return pieces
