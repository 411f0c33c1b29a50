"""Chat turns on a ``Conversation``: templates, sampling, streaming, reasoning, tools, stops.

Importing this package does not import torch; the submodules that need it are loaded on use.
"""

from .types import (
    ChatRequest,
    Done,
    Event,
    Logprobs,
    PrefillProgress,
    ReasoningDelta,
    RepetitionConfig,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    ToolCallsEvent,
)

__all__ = ["ChatRequest", "Conversation", "Done", "Event", "Logprobs", "PrefillProgress", "ReasoningDelta",
           "RepetitionConfig", "SamplingParams", "TextDelta", "TokenLogprob", "ToolCallsEvent", "prompt_ids",
           "run_completion", "run_turn", "stream_turn"]


def __getattr__(name):
    if name == "Conversation":
        from .conversation import Conversation
        return Conversation
    if name in ("run_turn", "stream_turn"):
        from . import turn
        return getattr(turn, name)
    if name in ("run_completion", "prompt_ids"):
        from . import completion
        return getattr(completion, name)
    raise AttributeError(name)
