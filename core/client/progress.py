"""Bars people can watch during long work: a prefill's progress (``PrefillBar``) and bytes moved
(``ByteBar``, snapshot export/import). Drawn with rich on stderr, only on a terminal; elsewhere
they stay silent (pipes, ``--json``, logs get no control characters).

A prefill bar starts at the first ``prompt_progress`` of a prefill long enough to watch
(``LONG_PREFILL_TOKENS``, or one that has lasted ``SLOW_PREFILL_MS``), after one line that
estimates its time from the speed the server measured last (``/health``'s ``prefill``), and goes
away when the prefill is done.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

LONG_PREFILL_TOKENS = 2048  # a prefill this long gets a bar (and an estimate) from its start,
SLOW_PREFILL_MS = 2000  # a shorter one once it has lasted this long (a slow or busy machine)
TICK_S = 0.5  # how often a bar moves between the server's progress events


def _terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def time_estimate(tokens: int, speed: dict | None) -> str:
    """How long ``tokens`` take to prefill at the server's last measured speed ("" when unknown).
    Linear in the tokens: a longer context is somewhat slower per token, so it is a lower bound."""
    if not speed or not speed.get("tokens_per_s"):
        return ""
    rate = float(speed["tokens_per_s"])
    return f"about {format_seconds(tokens / rate)} at {rate:,.0f} tokens/s (this server's last prefill)"


def estimate_line(tokens: int, speed: dict | None) -> str:
    """One line before a long prefill: its size and, when the server measured one, its time."""
    estimate = time_estimate(tokens, speed)
    if not estimate:
        return f"prefilling {tokens:,} tokens (no prefill measured on this server yet: the bar shows the ETA)"
    return f"prefilling {tokens:,} tokens: {estimate}"


def _progress(stream, *columns) -> Any:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(file=stream, force_terminal=True)
    return Progress(*columns, console=console, transient=True, refresh_per_second=4)


@dataclass(eq=False)
class PrefillBar:
    """Feed it ``update(prompt_progress)``; ``close()`` when the stream goes on or ends.

    ``speed`` returns the server's last measured prefill (``{"tokens_per_s", ...}`` or None);
    it is asked once, when a long prefill begins. ``note`` prints the estimate line (default:
    stderr, on a terminal)."""

    stream: Any = None  # None: stderr
    _: KW_ONLY
    label: str = "prefill"
    speed: Callable[[], dict | None] | None = None
    note: Callable[[str], None] | None = None
    enabled: bool | None = None  # None: when the stream is a terminal
    min_tokens: int = LONG_PREFILL_TOKENS

    def __post_init__(self) -> None:
        self.stream = self.stream or sys.stderr
        self.enabled = _terminal(self.stream) if self.enabled is None else self.enabled
        self._bar = None
        self._task = None
        self.seen: list[int] = []  # processed counts received (what a test or a log can check)
        # Between two progress events (one per prefill chunk, thousands of tokens apart) the bar
        # moves at the measured speed, never past the end of the running chunk (``tick``).
        self.work = 0
        self.done = 0  # tokens the server reported done
        self.position = 0.0  # tokens the bar shows
        self.eta_s: float | None = None
        self.tokens_per_s: float | None = None
        self._chunk_end = 0
        self.reported_at = 0.0  # time.monotonic() of the last progress event
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    def update(self, progress) -> None:
        """Take in one ``PrefillProgress`` event."""
        total, cache, processed = progress.total, progress.cached, progress.done
        self.seen.append(processed)
        if self._bar is None:
            slow = progress.elapsed_s * 1000 >= SLOW_PREFILL_MS  # however few tokens
            if processed >= total or (total - cache < self.min_tokens and not slow):
                return
            self._start(total - cache)
        done, elapsed = processed - cache, progress.elapsed_s
        if done > 0 and elapsed > 0:
            self.tokens_per_s = done / elapsed
        step = done - self.done  # the chunk just finished: the running one is about as long
        self._chunk_end = min(self.work, done + step) if step > 0 else self.work
        self.done, self.reported_at = done, time.monotonic()
        self.tick(self.reported_at)
        if processed >= total:
            self.close()

    @property
    def drawing(self) -> bool:
        return self._bar is not None

    def tick(self, now: float) -> None:
        """Redraw at ``now``: the reported tokens plus what the measured speed did since."""
        position = float(self.done)
        if self.tokens_per_s:
            moved = self.done + self.tokens_per_s * max(0.0, now - self.reported_at)
            position = min(moved, max(self._chunk_end - 1, self.done))
            self.eta_s = (self.work - position) / self.tokens_per_s
        self.position = max(self.position, position)
        if self._bar is not None:
            eta = format_seconds(self.eta_s) if self.eta_s is not None else "measuring"
            self._bar.update(self._task, completed=int(self.position), eta=eta)

    def _tick_forever(self) -> None:
        while not self._stop.wait(TICK_S):
            self.tick(time.monotonic())

    def _start(self, work: int) -> None:
        self.work = work
        speed = None
        if self.speed is not None:
            try:
                speed = self.speed()
            except Exception:  # noqa: BLE001 - an estimate is never worth failing a turn
                speed = None
        if speed and speed.get("tokens_per_s"):
            self.tokens_per_s = float(speed["tokens_per_s"])  # until this prefill's own is measured
        line = estimate_line(work, speed)
        if self.note is not None:
            self.note(line)
        elif self.enabled:
            self.stream.write(line + "\n")
            self.stream.flush()
        if not self.enabled:
            self._bar = _NoBar()
            self._task = 0
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

        self._bar = _progress(self.stream, TextColumn("{task.description}"), BarColumn(),
                              TextColumn("{task.percentage:>3.0f}%"), MofNCompleteColumn(),
                              TextColumn("tokens · eta {task.fields[eta]}"))
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=work, eta="measuring")
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick_forever, name="spl-prefill-bar", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class _NoBar:
    """Where no bar is drawn: the estimate line alone."""

    def update(self, *args, **kwargs) -> None:
        pass

    def stop(self) -> None:
        pass


class ByteBar:
    """A bytes bar with speed and ETA: ``ByteBar(label, total)`` then ``bar(done, total)`` (the
    total when it becomes known, e.g. from a response's Content-Length)."""

    def __init__(self, label: str, total: int | None, stream=None, *, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = _terminal(self.stream) if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = _progress(self.stream, TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TextColumn("eta"), TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def __call__(self, done: int, total: int | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, **({"total": total} if total else {}))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def watch_prefill(events, bar: PrefillBar):
    """``events`` (core events) without the ``PrefillProgress`` ones, which go to ``bar``; the bar
    is closed at the first other event. Closing this closes ``events`` (and so the connection)."""
    from superlinear.api.events import PrefillProgress, Started

    try:
        for event in events:
            if isinstance(event, PrefillProgress):
                bar.update(event)
                continue
            if isinstance(event, Started):
                continue
            bar.close()
            yield event
    finally:
        bar.close()
        close = getattr(events, "close", None)
        if close is not None:
            close()
