"""The in-process service API: one implementation of every user action on a loaded model
(chat turns, sessions, snapshots) under the HTTP routes, and through them the CLI and REPL."""

from .chat_service import ChatService, ChatTurn, common_prefix, merge_session_messages, snapshot_view
from .events import ChatEvent, Done, Logprobs, Persisted, ReasoningDelta, Started, TextDelta, ToolCallsEvent

__all__ = ["ChatEvent", "ChatService", "ChatTurn", "Done", "Logprobs", "Persisted", "ReasoningDelta", "Started",
           "TextDelta", "ToolCallsEvent", "common_prefix", "merge_session_messages", "snapshot_view"]
