"""A streamed reply shown as rendered Markdown in a terminal: rich's ``Markdown`` in a rich ``Live``.

The block being written (up to the last blank line outside a code fence) is redrawn in the Live
region with every delta; a finished block is printed once above it, as plain scrollback, so a
redraw touches the last paragraph only and a long reply does not outgrow the screen. Reasoning
is dimmed plain text. The terminal's width is read again for every drawing (a resize applies).
"""

from __future__ import annotations

import io
import re
import shutil
from typing import TextIO

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})", re.MULTILINE)


def terminal_size(out: TextIO) -> tuple[int, int]:
    """(columns, rows) of the terminal ``out`` writes to (80x24 when it cannot be told)."""
    import os

    try:
        size = os.get_terminal_size(out.fileno())
        return size.columns, size.lines
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        size = shutil.get_terminal_size((80, 24))
        return size.columns, size.lines


def settled_end(text: str) -> int:
    """Where the finished blocks of ``text`` end: after its last blank line that is not inside a
    code fence (0: none is finished yet)."""
    end = 0
    for match in re.finditer(r"\n[ \t]*\n", text):
        if len(_FENCE.findall(text, 0, match.start())) % 2 == 0:
            end = match.end()
    return end


class LiveMarkdown:
    """``feed(text, kind)`` with kind ``"markdown"`` (the answer) or ``"dim"`` (reasoning, plain);
    ``finish_line()`` draws what is pending for good. ``out`` must be a terminal."""

    def __init__(self, out: TextIO, *, size=None) -> None:
        from rich.console import Console

        self.out = out
        self.size = size or (lambda: terminal_size(out))
        width, height = self.size()
        self.console = Console(file=out, force_terminal=True, width=width, height=height, highlight=False,
                               emoji=False)
        self.live = None  # the rich Live of the block being written
        self.pending = ""  # its text
        self.kind = "markdown"

    @property
    def at_line_start(self) -> bool:
        return not self.pending

    def feed(self, text: str, kind: str = "markdown") -> None:
        if kind != self.kind and self.pending:
            self.finish_line()
        self.kind = kind
        self.pending += text
        end = settled_end(self.pending) if kind == "markdown" else self.pending.rfind("\n") + 1
        if end:
            done, self.pending = self.pending[:end], self.pending[end:]
            self._draw(done, final=True)
        if self.pending:
            self._draw(self.pending, final=False)
        self.out.flush()

    def finish_line(self) -> None:
        """Draw the pending block for good; the cursor goes to the next line."""
        if self.pending:
            self._draw(self.pending, final=True)
            self.pending = ""
        self.out.flush()

    def _renderable(self, text: str):
        from rich.markdown import Markdown
        from rich.text import Text

        if self.kind == "dim":
            return Text(text.rstrip("\n"), style="dim")
        return Markdown(text, code_theme="ansi_dark", hyperlinks=False)

    def _draw(self, text: str, final: bool) -> None:
        from rich.live import Live

        self.console.size = self.size()
        renderable = self._renderable(text)
        if self.live is None:
            if final:
                self.console.print(renderable)
                return
            self.live = Live(renderable, console=self.console, auto_refresh=False, vertical_overflow="visible")
            self.live.start()
        self.live.update(renderable, refresh=True)
        if final:
            self.live.stop()
            self.live = None
