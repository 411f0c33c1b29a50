"""A streamed reply shown as rendered Markdown in a terminal, one line at a time (rich).

Each line of the reply is drawn as soon as it grows: the line being written is redrawn in place
(cursor up, clear, draw) with every delta, and is final once its newline arrives. So the screen
stays plain scrollback (no full-screen UI), redraws touch a few rows only, and everything wraps
at word boundaries to the terminal's width (read again for every line, so a resize applies to
the next one).

What a line becomes: ``#`` headings bold, ``-``/``*`` items as bullets and numbered items with a
hanging indent, ``>`` quotes with a bar, ``---`` a rule, inline ``**bold**``, ``*italic*`` and
``code`` styled (rich's Markdown), indentation kept; inside ``` fences each line is
syntax-highlighted for the fence's language and the fences themselves are dimmed (still there,
so a copied block is still a block). A line taller than the screen cannot be redrawn: the rest
of it is written as it comes.
"""

from __future__ import annotations

import io
import re
import shutil
from typing import TextIO

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+#.-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^([-*+])\s+(.*)$")
_NUMBERED = re.compile(r"^(\d{1,3})[.)]\s+(.*)$")
_QUOTE = re.compile(r"^>\s?(.*)$")
_RULE = re.compile(r"^(?:-{3,}|\*{3,}|_{3,})\s*$")
_TABLE_ROW = re.compile(r"^\|.*\|\s*$")
_TRAILING_PAD = re.compile(r"(?:\x1b\[[0-9;]*m| )+$")
_SGR = re.compile(r"\x1b\[[0-9;]*m")
ERASE_TO_END = "\x1b[J"


def terminal_size(out: TextIO) -> tuple[int, int]:
    """(columns, rows) of the terminal ``out`` writes to (80x24 when it cannot be told)."""
    import os

    try:
        size = os.get_terminal_size(out.fileno())
        return size.columns, size.lines
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        size = shutil.get_terminal_size((80, 24))
        return size.columns, size.lines


class LiveMarkdown:
    """``feed(text, kind)`` with kind ``"markdown"`` (the answer) or ``"dim"`` (reasoning, plain);
    ``finish_line()`` ends a pending line. ``out`` must be a terminal."""

    def __init__(self, out: TextIO, *, size=None) -> None:
        from rich.console import Console

        self.out = out
        self.size = size or (lambda: terminal_size(out))
        probe = Console(file=out, force_terminal=True)  # the terminal's colours; honours NO_COLOR
        self.color_system = probe.color_system
        self.no_color = probe.no_color
        self.line = ""  # the line being written
        self.kind = "markdown"
        self.rows = 0  # rows its last drawing took on screen
        self.frozen = False  # too tall to redraw: the rest of the line is written as it comes
        self.fence: tuple[str, str] | None = None  # (marker, language) of the open code block

    @property
    def at_line_start(self) -> bool:
        return not self.line

    def feed(self, text: str, kind: str = "markdown") -> None:
        if kind != self.kind and self.line:
            self.finish_line()
        self.kind = kind
        pieces = text.split("\n")
        for i, piece in enumerate(pieces):
            if self.frozen:
                self.out.write(piece)
            self.line += piece
            if i < len(pieces) - 1:
                self.finish_line()
        if self.line and not self.frozen:
            self._draw(final=False)
        self.out.flush()

    def finish_line(self) -> None:
        """Draw the pending line for good and move to the next one."""
        if not self.frozen:
            self._draw(final=True)
        elif self.kind == "markdown":
            self._track_fence(self.line)
        self.out.write("\n")
        self.out.flush()
        self.line, self.rows, self.frozen = "", 0, False

    # -- drawing --------------------------------------------------------------------------
    def _draw(self, final: bool) -> None:
        width, height = self.size()
        rows = self.render(self.line, max(20, width))
        if final and self.kind == "markdown":
            self._track_fence(self.line)
        erase = ""
        if self.rows:
            erase = "\r" + (f"\x1b[{self.rows - 1}A" if self.rows > 1 else "") + ERASE_TO_END
        self.out.write(erase + "\n".join(rows))
        self.rows = len(rows)
        if not final and self.rows >= height - 1:
            self.frozen = True  # its top would scroll off: it could not be redrawn

    def _track_fence(self, line: str) -> None:
        match = _FENCE.match(line)
        if not match:
            return
        marker = match.group(1)
        if self.fence is None:
            self.fence = (marker, match.group(2))
        elif marker[0] == self.fence[0][0] and len(marker) >= len(self.fence[0]) and not match.group(2):
            self.fence = None

    def render(self, line: str, width: int) -> list[str]:
        """The rows (with ANSI styles, no padding) that ``line`` becomes at ``width`` columns."""
        from rich.markdown import Markdown
        from rich.rule import Rule
        from rich.syntax import Syntax
        from rich.text import Text

        if self.kind == "dim":
            return self._rows(Text(line, style="dim"), width)
        if self.fence is not None or _FENCE.match(line):
            if _FENCE.match(line) or self.fence is None:
                return self._rows(Text(line, style="dim"), width)
            return self._rows(Syntax(line, self.fence[1] or "text", theme="ansi_dark", background_color="default",
                                     word_wrap=True), width)
        if not line.strip():
            return [""]
        body = line.lstrip(" ")
        indent = " " * min(len(line) - len(body), width // 2)
        width -= len(indent)
        prefix, first = "", body
        if (m := _HEADING.match(body)) is not None:
            style = "bold underline" if len(m.group(1)) <= 2 else "bold"
            return self._indent(self._rows(Text(m.group(2), style=style), width), indent)
        if _RULE.match(body):
            return self._indent(self._rows(Rule(style="dim"), width), indent)
        if _TABLE_ROW.match(body):
            return self._indent(self._rows(Text(body), width), indent)
        if (m := _BULLET.match(body)) is not None:
            prefix, first = "• ", m.group(2)
        elif (m := _NUMBERED.match(body)) is not None:
            prefix, first = f"{m.group(1)}. ", m.group(2)
        elif (m := _QUOTE.match(body)) is not None:
            prefix, first = "▌ ", m.group(1)
        rows = self._rows(Markdown(first, hyperlinks=False), width - len(prefix)) if first.strip() else [""]
        hang = " " * len(prefix)
        rows = [(prefix if i == 0 else hang) + row for i, row in enumerate(rows)]
        return self._indent(rows, indent)

    @staticmethod
    def _indent(rows: list[str], indent: str) -> list[str]:
        return [indent + row for row in rows] if indent else rows

    def _rows(self, renderable, width: int) -> list[str]:
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=max(1, width), force_terminal=True, color_system=self.color_system,
                          no_color=self.no_color, highlight=False, emoji=False, soft_wrap=False)
        console.print(renderable, end="")
        rows = [_strip_padding(row) for row in buffer.getvalue().split("\n")]
        while len(rows) > 1 and not _SGR.sub("", rows[0]).strip():
            rows.pop(0)  # rich puts a blank row before some blocks
        while len(rows) > 1 and not _SGR.sub("", rows[-1]).strip():
            rows.pop()
        return rows


def _strip_padding(row: str) -> str:
    """Drop the spaces rich pads a row to its width with (a full row would make the terminal wrap)."""
    stripped = _TRAILING_PAD.sub("", row)
    return stripped + "\x1b[0m" if "\x1b[" in stripped else stripped
