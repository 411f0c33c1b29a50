"""Terminal rendering: a streamed reply (reasoning dimmed), the footer, one-line errors.

Plain writes to a text stream (no full-screen UI), so scrollback, copy and pipes work. ANSI
styling only when the stream is a terminal and ``NO_COLOR`` is not set.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

DIM = "\x1b[2m"
RED = "\x1b[31m"
BOLD = "\x1b[1m"
RESET = "\x1b[0m"


def use_color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Styler:
    def __init__(self, color: bool) -> None:
        self.color = color

    def dim(self, text: str) -> str:
        return f"{DIM}{text}{RESET}" if self.color and text else text

    def red(self, text: str) -> str:
        return f"{RED}{text}{RESET}" if self.color and text else text

    def bold(self, text: str) -> str:
        return f"{BOLD}{text}{RESET}" if self.color and text else text


@dataclass
class TurnStats:
    """What the footer shows; filled from the final chunk's ``usage`` (and ``timings``)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reused_tokens: int | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    elapsed_s: float | None = None
    finish_reason: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_usage(cls, usage: dict | None, timings: dict | None = None, **extra) -> TurnStats:
        usage = dict(usage or {})
        timings = dict(timings or usage.get("timings") or {})
        details = usage.get("prompt_tokens_details") or {}
        reused = _first(timings, "tokens_reused", "reused_tokens", "cached_tokens", "cache_n")
        if reused is None:
            reused = _first(usage, "tokens_reused", "reused_tokens", "cached_tokens")
        if reused is None:
            reused = details.get("cached_tokens")
        return cls(
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            reused_tokens=reused,
            prefill_tps=_first(timings, "prefill_tokens_per_s", "prefill_tokens_per_second",
                               "prompt_per_second", "prefill_tps"),
            decode_tps=_first(timings, "decode_tokens_per_s", "decode_tokens_per_second",
                              "predicted_per_second", "decode_tps"),
            raw={"usage": usage, "timings": timings},
            **extra,
        )

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "raw"}


def _first(mapping: dict, *keys: str):
    for key in keys:
        value = mapping.get(key)
        if value is not None:
            return value
    return None


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def format_footer(stats: TurnStats) -> str:
    """One line: ``12 → 34 tokens · prefill 850 tok/s · decode 41.2 tok/s · 120 reused · 1.4 s``."""
    parts = []
    if stats.prompt_tokens is not None or stats.completion_tokens is not None:
        prompt = "?" if stats.prompt_tokens is None else str(stats.prompt_tokens)
        completion = "?" if stats.completion_tokens is None else str(stats.completion_tokens)
        parts.append(f"{prompt} → {completion} tokens")
    parts.append(f"prefill {_rate(stats.prefill_tps)} tok/s")
    parts.append(f"decode {_rate(stats.decode_tps)} tok/s")
    parts.append(f"{stats.reused_tokens if stats.reused_tokens is not None else 0} reused")
    if stats.elapsed_s is not None:
        parts.append(f"{stats.elapsed_s:.1f} s")
    if stats.finish_reason and stats.finish_reason not in ("stop", "tool_calls"):
        parts.append(stats.finish_reason)
    return "[" + " · ".join(parts) + "]"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class StreamRenderer:
    """Writes deltas as they arrive; reasoning dimmed (or dropped), then the answer.

    With ``markdown`` (and a terminal) the answer is drawn as rendered Markdown wrapped at word
    boundaries (``markdown.LiveMarkdown``), reasoning as dimmed wrapped text; otherwise the
    text is written as it comes (pipes, files, ``NO_COLOR`` styles aside).

    Tracks whether the cursor is at the start of a line so the footer and the next prompt
    always begin on a fresh line.
    """

    def __init__(self, out: TextIO | None = None, *, show_reasoning: bool = True,
                 color: bool | None = None, markdown: bool = False) -> None:
        self.out = out or sys.stdout
        self.show_reasoning = show_reasoning
        self.style = Styler(use_color(self.out) if color is None else color)
        self.live = None
        if markdown and is_terminal(self.out):
            from .markdown import LiveMarkdown

            self.live = LiveMarkdown(self.out)
        self.mode: str | None = None  # None | "reasoning" | "content"
        self._at_line_start = True
        self.wrote_anything = False
        self.content: list[str] = []
        self.reasoning: list[str] = []

    @property
    def at_line_start(self) -> bool:
        return self._at_line_start and (self.live is None or self.live.at_line_start)

    def _write(self, text: str) -> None:
        if not text:
            return
        if self.live is not None and not self.live.at_line_start:
            self.live.finish_line()
        self.out.write(text)
        self.out.flush()
        self._at_line_start = text.endswith("\n")
        self.wrote_anything = True

    def _stream(self, text: str, kind: str) -> None:
        """Reply text: through the live Markdown view when there is one."""
        if self.live is None:
            self._write(self.style.dim(text) if kind == "dim" else text)
            return
        if text:
            self.live.feed(text, kind)
            self._at_line_start = True  # the live view tracks the line itself
            self.wrote_anything = True

    def reasoning_delta(self, text: str) -> None:
        self.reasoning.append(text)
        if not self.show_reasoning or not text:
            return
        if self.mode != "reasoning":
            self.mode = "reasoning"
            self.end_line()
            self._stream("thinking: ", "dim")
        self._stream(text, "dim")

    def content_delta(self, text: str) -> None:
        if not text:
            return
        if self.mode == "reasoning" and self.show_reasoning:
            if self.live is not None:
                self.live.feed("\n\n", "dim")  # ends the reasoning's line, then one blank line
            else:
                self._write("\n\n")
        elif self.mode is None:
            text = text.lstrip("\n")
            if not text:
                return
        self.mode = "content"
        self.content.append(text)
        self._stream(text, "markdown")

    def end_line(self) -> None:
        if self.live is not None and not self.live.at_line_start:
            self.live.finish_line()
        elif not self.at_line_start:
            self._write("\n")

    def notice(self, text: str) -> None:
        """A dim one-line note (``[cancelled]``, the footer) on a line of its own."""
        self.end_line()
        self._write(self.style.dim(text) + "\n")

    def error(self, text: str) -> None:
        self.end_line()
        self._write(self.style.red("error: " + text) + "\n")

    @property
    def text(self) -> str:
        return "".join(self.content)
