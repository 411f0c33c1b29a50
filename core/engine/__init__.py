"""Chat turns on a ``Conversation``: templates, sampling, streaming, reasoning, tools, stops.

Importing this package does not import torch; the submodules that need it are loaded on use.
"""

from .types import (
    ChatRequest,
    Done,
    Event,
    PrefillProgress,
    ReasoningDelta,
    RepetitionConfig,
    SamplingParams,
    TextDelta,
    ToolCallsEvent,
)

__all__ = ["ChatRequest", "Conversation", "Done", "Event", "PrefillProgress", "ReasoningDelta", "RepetitionConfig",
           "SamplingParams", "TextDelta", "ToolCallsEvent", "run_turn", "stream_turn"]


def __getattr__(name):
    if name == "Conversation":
        from .conversation import Conversation
        return Conversation
    if name in ("run_turn", "stream_turn"):
        from . import turn
        return getattr(turn, name)
    raise AttributeError(name)
