"""The typed events of one chat turn through the service, in the order they come:
``Started`` (the prompt passed every check and its prefill begins), the engine's ``TextDelta`` /
``ReasoningDelta`` / ``ToolCallsEvent`` / ``Logprobs`` (when asked: before the token's text),
``Persisted`` (session turns only: whether the session's journal holds the turn) and last the engine's ``Done``."""

from __future__ import annotations

from dataclasses import dataclass

from superlinear.engine.types import Done, Logprobs, ReasoningDelta, TextDelta, ToolCallsEvent
from superlinear.errors import UserError


@dataclass(frozen=True)
class Started:
    """The turn's prompt was accepted; ``how`` is the session rule's decision (None: no session)."""

    how: str | None


@dataclass(frozen=True)
class Persisted:
    """Whether a session's state (with its last turn or change) is on disk now."""

    ok: bool
    error: UserError | None = None  # why writing it failed (None: it did not fail)


ChatEvent = Started | TextDelta | ReasoningDelta | ToolCallsEvent | Logprobs | Persisted | Done

__all__ = ["ChatEvent", "Done", "Logprobs", "Persisted", "ReasoningDelta", "Started", "TextDelta", "ToolCallsEvent"]
