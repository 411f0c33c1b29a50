"""Streaming text pieces: UTF-8-safe incremental detokenization, stop strings, <think> splitting.

Every stage here holds back just enough text that it never emits something it might have to take
back: half a multi-byte character, half a stop string, half a ``<think>``/``</think>`` tag.
"""

from __future__ import annotations


def partial_marker_start(text: str, markers: list[str]) -> int:
    """Index where a suffix of ``text`` that could still grow into one of ``markers`` starts
    (``len(text)`` when there is none)."""
    longest = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), longest, -1):
            if text.endswith(m[:n]):
                longest = n
                break
    return len(text) - longest


def find_first(text: str, markers: list[str], start: int = 0) -> tuple[int, str | None]:
    """Earliest occurrence of any marker at or after ``start``: (index, marker) or (-1, None)."""
    best, which = -1, None
    for m in markers:
        i = text.find(m, start)
        if i != -1 and (best == -1 or i < best or (i == best and len(m) > len(which))):
            best, which = i, m
    return best, which


class IncrementalDetokenizer:
    """Token ids in, text out, never a broken UTF-8 character: tokenizers' ``DecodeStream``,
    which decodes each id against the ids before it (tokenizers' context-dependent spacing) and
    holds back a token that ends inside a multi-byte character until the character is whole.
    ``flush`` gives what is still held at the end, replacement characters included."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream

        # a transformers tokenizer wraps the Rust one (``backend_tokenizer``); a bare one is itself
        self.backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
        self.skip = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.held: list[int] = []  # ids pushed since the last text came out

    def push(self, token_id: int) -> str:
        text = self.stream.step(self.backend, token_id)
        if text is None:
            self.held.append(token_id)
            return ""
        self.held.clear()
        return text

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), replacement chars included."""
        held, self.held = self.held, []
        return self.backend.decode(held, skip_special_tokens=self.skip) if held else ""


class StopCutter:
    """Cuts the text stream before the first stop string; never emits part of one. The first
    ``unarmed`` pushes (one per token: ``min_tokens``) pass through uncut; ``matched`` is the
    stop string that cut it."""

    def __init__(self, stops: list[str], unarmed: int = 0):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False
        self.matched: str | None = None
        self.unarmed = unarmed

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf += text
        if not self.stops or self.unarmed > 0:
            self.unarmed -= 1
            out, self.buf = self.buf, ""
            return out
        i, stop = find_first(self.buf, self.stops)
        if i != -1:
            out, self.buf, self.stopped, self.matched = self.buf[:i], "", True, stop
            return out
        k = partial_marker_start(self.buf, self.stops)
        out, self.buf = self.buf[:k], self.buf[k:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Splits generated text into reasoning (inside <think>…</think>) and answer.

    ``in_reasoning=True`` when the prompt already opened the block (templates that end the
    generation prompt with ``<think>``). A ``<think>`` is honoured only before any answer text
    (leading whitespace aside), like the models that emit it.
    """

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"  # start -> reasoning -> answer
        self.buf = ""
        self.reasoning = ""
        self.answer = ""

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"

    def push(self, text: str) -> tuple[str, str]:
        """Returns (reasoning_delta, answer_delta)."""
        self.buf += text
        r_out, a_out = "", ""
        while True:
            if self.state == "start":
                stripped = self.buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buf = stripped[len(THINK_OPEN):]
                    self.state = "reasoning"
                    continue
                if THINK_OPEN.startswith(stripped):  # empty or a prefix of <think>: wait
                    break
                self.state = "answer_start"
                continue
            if self.state == "reasoning":
                i = self.buf.find(THINK_CLOSE)
                if i != -1:
                    r_out += self.buf[:i]
                    self.buf = self.buf[i + len(THINK_CLOSE):]
                    self.state = "answer_start"
                    continue
                k = partial_marker_start(self.buf, [THINK_CLOSE])
                r_out += self.buf[:k]
                self.buf = self.buf[k:]
                break
            if self.state == "answer_start":  # the answer starts at its first visible character
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self.state = "answer"
                continue
            a_out += self.buf  # answer
            self.buf = ""
            break
        if not self.reasoning:
            r_out = r_out.lstrip()  # the newline after <think>
        self.reasoning += r_out
        self.answer += a_out
        return r_out, a_out

    def flush(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            self.reasoning += rest
            return rest, ""
        if self.state in ("start", "answer_start"):
            rest = rest.lstrip()
        self.answer += rest
        return "", rest
