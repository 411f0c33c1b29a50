"""The session-chat rule: which conversation a chat request with a ``session_id`` continues.

The request's messages are matched against the session's transcript T (docs/server.md):
- they start with all of T (the client resent the history): only the new tail is prefilled;
- they share no leading message with T (the client sent only the new messages): appended to T;
- they share a prefix with T and then differ (an edit, a regenerate): the session rolls back to
  the common prefix and continues from the request's messages.
``session_mode: "append"`` always appends, ``"replace"`` always takes the messages as the whole
conversation (rolling back as far as needed).
"""

from __future__ import annotations

import json
from typing import Any

from superlinear.errors import InvalidRequest


def _norm(message: dict) -> tuple:
    calls = tuple(
        (c.get("function", {}).get("name"), _norm_args(c.get("function", {}).get("arguments")))
        for c in message.get("tool_calls") or []
    )
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    role = "system" if message.get("role") == "developer" else message.get("role")
    return (role, (content or "").strip(), calls, message.get("tool_call_id") or None)


def _norm_args(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.dumps(json.loads(args), sort_keys=True)
        except ValueError:
            return args.strip()
    return json.dumps(args, sort_keys=True)


def common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if _norm(x) != _norm(y):
            break
        n += 1
    return n


def merge_session_messages(transcript: list[dict], messages: list[dict], mode: str = "auto"
                           ) -> tuple[list[dict], str, int]:
    """The whole conversation the session should hold for this turn.

    Returns ``(messages, how, kept)``: ``how`` is ``new`` / ``extend`` / ``append`` / ``rollback``,
    ``kept`` the number of transcript messages kept as they are.
    """
    if not transcript:
        return list(messages), "new", 0
    if mode == "append":
        return [*transcript, *messages], "append", len(transcript)
    p = common_prefix(transcript, messages)
    if p == len(transcript):
        if p == len(messages) and transcript[-1].get("role") == "assistant":
            raise InvalidRequest("the messages add nothing to the session's transcript (they equal it); "
                                 "send the next user message", param="messages")
        return [*transcript, *messages[p:]], "extend", p
    if mode == "replace" or p > 0:
        return [*transcript[:p], *messages[p:]], "rollback", p
    return [*transcript, *messages], "append", len(transcript)
