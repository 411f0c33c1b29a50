"""Checking an answer against the passages it was given, while it streams.

A small model cites passages it was never given (``[6]`` … ``[15]`` when five were) and, left
alone, says the same sentence again and again. Both are fixed on the way out, and the text a
user sees streaming is exactly the final text:

- **citations**: ``[n]``, lists and ranges (``[1, 3]``, ``[2-4]``) and runs (``[1][2]``) are
  checked against the ``n_passages`` given; numbers outside ``1…n_passages`` are dropped and
  reported (``invented``), the rest kept. Brackets inside code (```…``` spans and fences) and
  indexing such as ``args[0]`` or ``x)[1]`` are not citations, nor is a Markdown link ``[1](url)``.
- **loops**: once a sentence repeats an earlier one (ignoring case, spacing and citations), the
  answer ends before it (``trimmed``).

While streaming, text that may still change meaning is held back: a trailing ``[``… that could
become a citation (with the blank before it, which goes if the citation goes), trailing blanks,
a trailing run of backticks, and a sentence that so far repeats the start of an earlier one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_GROUP = re.compile(r"\[\s*(\d{1,4}(?:\s*[,;\-–]\s*\d{1,4})*)\s*\]")
_MAYBE_GROUP_AT_END = re.compile(r"\s*\[[\d\s,;\-–]*\]?$")
_TRAILING_BLANK = re.compile(r"\s+$")
_TICKS = re.compile(r"`+")
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n\s*")
_NOT_BEFORE_CITATION = re.compile(r"[\w)\]`/]")
MAX_RANGE = 100  # a "range" wider than this is not a citation
MIN_SENTENCE = 20  # shorter sentences may repeat ("Yes.")


@dataclass
class CheckedAnswer:
    text: str  # the answer as shown: invented citations dropped, a loop cut off
    cited: list[int] = field(default_factory=list)  # valid passage numbers, in order of first use
    invented: list[int] = field(default_factory=list)  # numbers cited that were not given
    trimmed: bool = False  # the answer started repeating itself and was cut there

    def notes(self, n_passages: int) -> list[str]:
        """One line per thing that was fixed (for the CLI and the REPL)."""
        out = []
        if self.invented:
            given = f"[1]-[{n_passages}]" if n_passages > 1 else ("[1]" if n_passages else "none")
            out.append(f"dropped citations of passages that were not given: {_numbers(self.invented)} "
                       f"(given: {given})")
        if self.trimmed:
            out.append("the answer started repeating itself: cut where the repetition began")
        return out


def check_answer(answer: str, n_passages: int) -> CheckedAnswer:
    """The whole answer, checked (what ``AnswerStream`` ends with for the same text)."""
    return _clean(answer, n_passages, final=True)


class AnswerStream:
    """``feed(delta)`` returns the text that is safe to show now; ``finish()`` the rest. Afterwards
    ``result`` is the ``CheckedAnswer``, and ``result.text`` is everything that was returned."""

    def __init__(self, n_passages: int) -> None:
        self.n_passages = n_passages
        self.raw = ""
        self.shown = ""
        self.result = CheckedAnswer("")

    def feed(self, delta: str) -> str:
        self.raw += delta
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        result = _clean(self.raw, self.n_passages, final)
        if not result.text.startswith(self.shown):  # by construction it does; never un-say text
            result.text = self.shown
        new = result.text[len(self.shown):]
        self.shown, self.result = result.text, result
        return new


def _numbers(values: list[int]) -> str:
    return ", ".join(f"[{v}]" for v in values)


def _parse_group(group: str) -> list[int] | None:
    """``"1, 3-5"`` -> [1, 3, 4, 5]; None when it is not a plausible citation."""
    numbers: list[int] = []
    for item in re.split(r"\s*[,;]\s*", group.strip()):
        bounds = [int(x) for x in re.split(r"\s*[-–]\s*", item)]
        if len(bounds) == 1:
            values = bounds
        elif len(bounds) == 2:
            low, high = sorted(bounds)
            if high - low > MAX_RANGE:
                return None
            values = list(range(low, high + 1))
        else:
            return None
        numbers += [v for v in values if v not in numbers]
    return numbers


def _compact(values: list[int]) -> str:
    """[1, 2, 3, 5] -> "[1-3, 5]"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return "[" + ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs) + "]"


def _split_code(raw: str, final: bool) -> tuple[list[tuple[bool, str]], bool]:
    """``[(is_code, text)]`` covering ``raw`` except a held-back tail; and whether a tail was held.

    A run of N backticks opens code that the next run of exactly N closes (inline spans and
    fences alike); an unclosed run is code to the end (it is, while the model writes it)."""
    parts: list[tuple[bool, str]] = []
    pos = 0
    while True:
        opening = _TICKS.search(raw, pos)
        if opening is None:
            parts.append((False, raw[pos:]))
            return parts, False
        parts.append((False, raw[pos:opening.start()]))
        if opening.end() == len(raw) and not final:
            return parts, True  # the run may still grow
        run = opening.group()
        closing = re.compile(rf"(?<!`){run}(?!`)").search(raw, opening.end())
        if closing is None:
            parts.append((True, raw[opening.start():]))
            return parts, False
        if closing.end() == len(raw) and not final:
            parts.append((True, raw[opening.start():closing.start()]))
            return parts, True  # a longer run would not close it
        parts.append((True, raw[opening.start():closing.end()]))
        pos = closing.end()


def _clean(raw: str, n_passages: int, final: bool) -> CheckedAnswer:
    parts, held = _split_code(raw, final)
    if not final and not held and parts and not parts[-1][0]:
        text = parts[-1][1]
        hold = _MAYBE_GROUP_AT_END.search(text) or _TRAILING_BLANK.search(text)
        if hold:
            parts[-1] = (False, text[:hold.start()])

    # Citations, in prose only. Positions are in the cleaned text, to forget those cut with a loop.
    out = ""
    code_spans: list[tuple[int, int]] = []
    cited_at: list[tuple[int, int]] = []
    invented_at: list[tuple[int, int]] = []
    for index, (is_code, text) in enumerate(parts):
        if is_code:
            code_spans.append((len(out), len(out) + len(text)))
            out += text
            continue
        previous_end = -1  # where the last citation ended (a run [1][2] continues there)
        pos = 0
        for m in _GROUP.finditer(text):
            before = text[m.start() - 1] if m.start() else (parts[index - 1][1][-1:] if index else "")
            after = text[m.end():m.end() + 1]
            if (before and _NOT_BEFORE_CITATION.match(before) and m.start() != previous_end) or after == "(":
                continue
            numbers = _parse_group(m.group(1))
            if numbers is None:
                continue
            keep = [v for v in numbers if 1 <= v <= n_passages]
            gone = [v for v in numbers if v not in keep]
            head = text[pos:m.start()]
            resume = m.end()
            if not keep:
                head = head.rstrip(" \t")  # "green [6]." -> "green."
                replacement = ""
                if not (out + head) or (out + head).endswith("\n"):  # "[6] text" on a line of its own
                    resume += len(text[resume:]) - len(text[resume:].lstrip(" \t"))
            else:
                replacement = m.group() if not gone else _compact(keep)
            out += head
            invented_at += [(len(out), v) for v in gone]
            cited_at += [(len(out), v) for v in keep]
            out += replacement
            pos, previous_end = resume, m.end()
        out += text[pos:]

    # Loops: cut at the first sentence that repeats an earlier one.
    cut = _loop_start(out, code_spans, final)
    trimmed = cut is not None and cut[1]
    if cut is not None:
        out = out[:cut[0]]
    end = len(out)
    return CheckedAnswer(
        out,
        cited=_unique(v for at, v in cited_at if at < end or (at == end and cut is None)),
        invented=_unique(v for at, v in invented_at if at < end or (at == end and cut is None)),
        trimmed=trimmed,
    )


def _unique(values) -> list[int]:
    out: list[int] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _sentence_key(text: str) -> str:
    text = _GROUP.sub(" ", text)
    return " ".join(text.lower().split()).strip(" .!?,;:")


def _loop_start(text: str, code_spans: list[tuple[int, int]], final: bool) -> tuple[int, bool] | None:
    """``(position, is_loop)`` to cut ``text`` at: where a repeated sentence starts (a loop), or
    where a sentence starts that so far repeats the start of an earlier one (held back while
    streaming). None: show it all."""
    def in_code(at: int) -> bool:
        return any(a <= at < b for a, b in code_spans)

    seen: set[str] = set()
    start = 0
    for boundary in _BOUNDARY.finditer(text):
        if in_code(boundary.start()):
            continue
        key = _sentence_key(text[start:boundary.start()])
        if len(key) >= MIN_SENTENCE:
            if key in seen:
                return start, True
            seen.add(key)
        start = boundary.end()
    key = _sentence_key(text[start:])
    if key and any(s.startswith(key) for s in seen):
        if not final:
            return start, False
        if len(key) >= MIN_SENTENCE:
            return start, True
    return None
