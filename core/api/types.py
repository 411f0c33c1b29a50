"""Typed requests and results of the API (``superlinear.api.Api``).

Requests are dataclasses; results are ``TypedDict`` s: JSON-ready, so the in-process API and
the remote one (which reads them off the wire) return the very same values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

from superlinear import defaults
from superlinear.engine.types import ChatRequest, RepetitionConfig, SamplingParams
from superlinear.service.chat_service import ChatTurn


@dataclass(frozen=True)
class Completion:
    """A plain text completion of ``prompt`` (a string or token ids; no chat template).
    ``echo`` with ``sampling.logprobs``: the prompt's logprobs come first."""

    prompt: str | list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    repetition: RepetitionConfig | None = None
    echo: bool = False


def chat_turn(messages: list[dict], *, session_id: str | None = None, session_mode: str = "auto",
              temperature: float = defaults.TEMPERATURE, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
              max_tokens: int | None = None, stop: list[str] | None = None, tools: list[dict] | None = None,
              tool_choice: Any = None, reasoning_budget: int | None = None,
              repetition: RepetitionConfig | None = None, chat_template_kwargs: dict | None = None,
              keep_thinking: bool = False) -> ChatTurn:
    """A ``ChatTurn`` from plain arguments (what a notebook or a script writes). ``temperature``
    defaults to what the server gives an OpenAI request that leaves it out."""
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              max_tokens=max_tokens, stop=list(stop or []))
    request = ChatRequest(messages=list(messages), tools=tools, tool_choice=tool_choice, sampling=sampling,
                          reasoning_budget=reasoning_budget, repetition=repetition,
                          chat_template_kwargs=chat_template_kwargs, keep_thinking=keep_thinking)
    return ChatTurn(request, session_id=session_id, session_mode=session_mode)


class Tokens(TypedDict, total=False):
    tokens: list[int]
    count: int
    max_model_len: int
    pieces: list[str]


class ModelInfo(TypedDict):
    """The model an API serves, and how long its sessions may be (cheap to ask: the server asks
    it on every request; ``LocalApi.model.info()`` describes the model itself)."""

    id: str  # the name it is served by
    fingerprint: str  # what a snapshot must have been made with to load
    max_model_len: int | None  # the operator's max_seq_len, else the context it was trained for
    max_seq_len_limit: int  # the longest session the memory budget lets one hold now
    default_max_seq_len: int  # a new session's, when it asks for none


class SessionInfo(TypedDict):
    id: str
    position: int
    max_seq_len: int
    message_count: int
    bytes: int
    resident: bool
    busy: bool
    ephemeral: bool
    state_snapshot: str | None
    persisted_position: int | None
    persist_error: str | None
    created_at: float
    last_used: float


class SessionListing(TypedDict):
    sessions: list[SessionInfo]
    count: int
    bytes: int
    resident: int
    memory_budget: int | None
    evict_to_disk: bool  # past the budget, idle sessions go to disk (else a request is refused)


class SnapshotInfo(TypedDict, total=False):
    """A snapshot's manifest without its file list (``object``: ``"snapshot"``, ``bytes``: its size)."""

    id: str
    object: str
    title: str | None
    description: str | None
    tags: list[str]
    created_at: str
    updated_at: str
    bytes: int
    model: dict
    session: dict


__all__ = ["ChatTurn", "Completion", "ModelInfo", "SessionInfo", "SessionListing", "SnapshotInfo", "Tokens",
           "chat_turn"]
