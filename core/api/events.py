"""The one set of events a chat turn or a completion yields, in process and over HTTP alike:
``Started`` (the prompt passed every check: its prefill begins), ``PrefillProgress`` (while the
prompt is prefilled), ``TextDelta`` / ``ReasoningDelta`` / ``ToolCallsEvent``, ``Logprobs``
(when asked: before each token's text), ``Persisted``
(session turns: whether the session's journal holds the turn) and last ``Done``."""

from __future__ import annotations

from superlinear.engine.types import Done, Logprobs, PrefillProgress, ReasoningDelta, TextDelta, ToolCallsEvent
from superlinear.service.events import Persisted, Started

Event = Started | PrefillProgress | TextDelta | ReasoningDelta | ToolCallsEvent | Logprobs | Persisted | Done

__all__ = ["Done", "Event", "Logprobs", "Persisted", "PrefillProgress", "ReasoningDelta", "Started", "TextDelta",
           "ToolCallsEvent"]
