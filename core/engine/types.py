"""Requests and events of a chat turn (plain dataclasses, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# "memory": the session's memory budget ended the generation (the server answers "length").
FINISH_REASONS = ("stop", "length", "tool_calls", "repetition", "cancelled", "memory")


@dataclass
class SamplingParams:
    """How the next token is picked. ``temperature == 0`` is greedy (top_p/top_k/seed unused)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # same seed (same model, same device) => same tokens
    max_tokens: int | None = None  # None = until the cache is full
    stop: list[str] = field(default_factory=list)  # cut before the first occurrence, never emitted
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the end-of-turn tokens
    # Penalties on tokens already seen (``decode.py``'s Sampler says how each applies; 0/1 = off):
    frequency_penalty: float = 0.0  # OpenAI: minus this times a token's count in the output so far
    presence_penalty: float = 0.0  # OpenAI: minus this once a token is in the output
    repeat_penalty: float = 1.0  # llama.cpp: logits of the last ``repeat_last_n`` tokens divided by it
    repeat_last_n: int = 64  # llama.cpp's window (prompt and output), 0 = off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to those tokens' logits (-100..100)
    logprobs: int | None = None  # None: off; n >= 0: each token's logprob and the n most likely
    # The one output constraint (``grammar.py``): {"json": schema, "strict": bool} | {"json_object": True} |
    # {"regex": r} | {"choice": [...]} | {"grammar": lark_or_gbnf} | {"tools": {...}}; None: free text
    structured: dict | None = None
    min_tokens: int = 0  # no end token and no stop string before this many tokens (vLLM's)
    ignore_eos: bool = False  # the end-of-text / end-of-turn tokens do not stop (stop_token_ids still do)
    skip_special_tokens: bool = False  # special tokens left out of the text (vLLM's; its default is True)


@dataclass
class RepetitionConfig:
    """Opt-in loop detection on generated token ids.

    A loop is declared when the generated tokens end in a periodic run of period
    ``p <= max_period`` that is at least ``min_repeats`` periods long and at least
    ``tail_len`` tokens long (so a short run of one repeated token such as ``---`` is not a loop).
    """

    tail_len: int = 32
    min_repeats: int = 3
    max_period: int = 64


@dataclass
class ChatRequest:
    messages: list[dict]  # the whole conversation as the client wants it after this turn's prompt
    tools: list[dict] | None = None  # OpenAI tools ({"type": "function", "function": {...}})
    tool_choice: Any = None  # None/"auto", "none", "required", {"type":"function","function":{"name":..}}
    parallel_tool_calls: bool = False  # several calls in one answer (else the grammar allows one)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reasoning_budget: int | None = None  # max reasoning tokens; then the engine closes </think> itself
    repetition: RepetitionConfig | None = None  # None = no loop detection
    chat_template_kwargs: dict | None = None  # e.g. {"enable_thinking": False}
    keep_thinking: bool = False  # keep the reasoning in the stored assistant message
    keep_partial: bool = False  # a turn cancelled while decoding stores its partial answer
    # prefill the end-of-turn tokens before Done (a session's next turn starts from them); a
    # sessionless turn leaves them to its scratch cache's next sync, so its stream ends at once
    close_turn: bool = True


@dataclass
class TextDelta:
    text: str


# The reasoning block's markers in a model's text (``ReasoningDelta``: the text between them).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ToolCallsEvent:
    calls: list[dict]  # OpenAI tool_calls: {"id", "type": "function", "function": {"name", "arguments"}}


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (the raw logits' log-softmax: before
    temperature, penalties and grammar, as vLLM reports them). ``logprob`` is None for the first
    prompt token (nothing comes before it); ``top`` holds ``(id, text, logprob)`` of the most
    likely tokens at that position, most likely first."""

    id: int
    text: str
    logprob: float | None
    top: list[tuple[int, str, float]] | None = None


@dataclass
class Logprobs:
    """The logprobs of tokens: generated ones as they are picked (before their text goes out),
    or a ``/v1/completions`` prompt's (``prompt=True``, with ``echo``) before the first token."""

    tokens: list[TokenLogprob]
    prompt: bool = False


@dataclass
class PrefillProgress:
    """The prompt's prefill under way, before the first token: ``done`` of the ``total`` prompt
    tokens are in the cache, ``cached`` of them kept from before this turn, ``elapsed_s`` since the
    prefill began. Sent when it begins (``done`` is where it starts) and after every chunk; the
    last one has ``done == total``. No event comes when nothing needs a prefill."""

    done: int
    total: int
    cached: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        """Share of this turn's prefill work done (0..1; the cached tokens cost nothing)."""
        work = self.total - self.cached
        return 1.0 if work <= 0 else max(0.0, min(1.0, (self.done - self.cached) / work))


@dataclass
class Done:
    finish_reason: str  # one of FINISH_REASONS
    message: dict  # the assistant message as stored in the transcript
    usage: dict  # prompt_tokens, completion_tokens, total_tokens, cached_tokens, prefill_tokens
    timings: dict  # prefill_s, prefill_tokens_per_s, decode_s, decode_tokens_per_s
    reasoning: str | None = None  # the reasoning text (also when not kept in the transcript)
    partial: bool = False  # True when a cancelled turn kept its partial output
    stop_reason: str | int | None = None  # the stop string or stop_token_ids entry that ended it (vLLM's)


Event = PrefillProgress | TextDelta | ReasoningDelta | ToolCallsEvent | Logprobs | Done
