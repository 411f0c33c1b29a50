"""Requests and events of a chat turn (plain dataclasses, no torch).

The request fields a client sets by their own name carry their bounds and their row of the
server's fields table (``request_field``): the server's OpenAI request bodies, its table of
fields (docs/server.md) and ``limits.check_sampling`` all read them from here, so a new sampling
field is declared once, in ``SamplingParams``, and implemented in ``decode.py`` (its ``Sampler``)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any

from . import limits

SAME = "same"


def request_field(default: Any = MISSING, *, factory: Any = MISSING, ge: float | None = None,
                  gt: float | None = None, le: float | None = None, max_length: int | None = None,
                  doc: str | None = None, origin: str = "spl", vllm: str = "—", llamacpp: str = "—") -> Any:
    """A field with the bounds every front end checks before any work (``ge``/``gt``/``le``: a
    number's, ``max_length``: a list's). With ``doc``, a client sets it by this name: ``doc`` says
    what spl does with it, ``origin`` whose API it comes from, ``vllm``/``llamacpp`` what those
    servers do (``SAME``: the same; "—": they have no such field)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("max_length", max_length)) if v is not None}
    table = {"doc": doc, "origin": origin, "vllm": vllm, "llamacpp": llamacpp} if doc else {}
    return field(default=default, default_factory=factory, metadata={"bounds": bounds, **table})

# "memory": the session's memory budget ended the generation (the server answers "length").
FINISH_REASONS = ("stop", "length", "tool_calls", "repetition", "cancelled", "memory")


@dataclass
class SamplingParams:
    """How the next token is picked. ``temperature == 0`` is greedy (top_p/top_k/seed unused).
    ``max_tokens``, ``stop``, ``top_k``, ``logprobs`` and ``structured`` have OpenAI's shapes of
    their own (the server's adapters); every other field goes on the wire by its name."""

    temperature: float = request_field(0.0, ge=0.0, le=2.0, origin="OpenAI", vllm=SAME, llamacpp=SAME,
                                       doc="0 is greedy; default 0.7")
    top_p: float = request_field(1.0, gt=0.0, le=1.0, origin="OpenAI", vllm=SAME, llamacpp=SAME,
                                 doc="nucleus sampling")
    top_k: int = request_field(0, ge=0, le=limits.MAX_TOP_K)  # 0 = off
    seed: int | None = request_field(None, ge=limits.SEED_MIN, le=limits.SEED_MAX, origin="OpenAI", vllm=SAME,
                                     llamacpp=SAME, doc="same seed, same tokens (same device)")
    max_tokens: int | None = request_field(None, ge=0, le=limits.MAX_TOKENS)  # None = until the cache is full
    stop: list[str] = field(default_factory=list)  # cut before the first occurrence, never emitted
    stop_token_ids: list[int] = request_field(
        factory=list, max_length=limits.MAX_STOPS * 64, origin="vLLM", vllm=SAME,
        doc="token ids that stop, besides the end tokens; `stop_reason` names the one")
    # Penalties on tokens already seen (``decode.py``'s Sampler says how each applies; 0/1 = off):
    frequency_penalty: float = request_field(0.0, ge=-2.0, le=2.0, origin="OpenAI", vllm=SAME, llamacpp=SAME,
                                             doc="OpenAI's, over the output")
    presence_penalty: float = request_field(0.0, ge=-2.0, le=2.0, origin="OpenAI", vllm=SAME, llamacpp=SAME,
                                            doc="OpenAI's, over the output")
    repeat_penalty: float = request_field(1.0, gt=0.0, le=limits.MAX_REPEAT_PENALTY, origin="llama.cpp",
                                          vllm="`repetition_penalty`", llamacpp=SAME,
                                          doc="logits of the last `repeat_last_n` tokens divided by it")
    repeat_last_n: int = request_field(64, ge=0, le=limits.MAX_REPEAT_LAST_N, origin="llama.cpp", llamacpp=SAME,
                                       doc="`repeat_penalty`'s window (prompt and output; 64)")
    min_p: float = request_field(0.0, ge=0.0, le=1.0, origin="vLLM", vllm=SAME, llamacpp=SAME,
                                 doc="drop tokens below `min_p` × the most likely")
    logit_bias: dict[int, float] | None = request_field(None, origin="OpenAI", vllm=SAME, llamacpp=SAME,
                                                        doc="token id → −100..100 added to its logit")
    logprobs: int | None = request_field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)  # None: off; n: the n most likely too
    # The one output constraint (``grammar.py``): {"json": schema, "strict": bool} | {"json_object": True} |
    # {"regex": r} | {"choice": [...]} | {"grammar": lark_or_gbnf} | {"tools": {...}}; None: free text
    structured: dict | None = None
    min_tokens: int = request_field(0, ge=0, le=limits.MAX_TOKENS, origin="vLLM", vllm=SAME,
                                    doc="no end token and no stop before this many tokens")
    ignore_eos: bool = request_field(False, origin="vLLM", vllm=SAME, llamacpp=SAME,
                                     doc="end-of-text / end-of-turn tokens do not stop the generation")
    skip_special_tokens: bool = request_field(False, origin="vLLM", vllm="default true",
                                              doc="special tokens left out of the text (default false)")


@dataclass
class RepetitionConfig:
    """Opt-in loop detection on generated token ids.

    A loop is declared when the generated tokens end in a periodic run of period
    ``p <= max_period`` that is at least ``min_repeats`` periods long and at least
    ``tail_len`` tokens long (so a short run of one repeated token such as ``---`` is not a loop).
    """

    tail_len: int = request_field(32, ge=2, le=limits.MAX_REPETITION_TAIL)
    min_repeats: int = request_field(3, ge=2, le=limits.MAX_REPETITION_REPEATS)
    max_period: int = request_field(64, ge=1, le=limits.MAX_REPETITION_PERIOD)


@dataclass
class ChatRequest:
    messages: list[dict]  # the whole conversation as the client wants it after this turn's prompt
    tools: list[dict] | None = None  # OpenAI tools ({"type": "function", "function": {...}})
    tool_choice: Any = None  # None/"auto", "none", "required", {"type":"function","function":{"name":..}}
    parallel_tool_calls: bool = request_field(  # else the grammar allows one call
        False, origin="OpenAI", vllm=SAME, llamacpp=SAME,
        doc="`true`: several calls may follow each other; else the tool grammar allows one (OpenAI's default is true)")
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # then the engine closes </think> itself
    reasoning_budget: int | None = request_field(None, ge=0, le=limits.MAX_TOKENS,
                                                 doc="reasoning tokens before `</think>` is written")
    repetition: RepetitionConfig | None = None  # None = no loop detection
    chat_template_kwargs: dict | None = None  # e.g. {"enable_thinking": False}
    keep_thinking: bool = request_field(False, doc="keep the reasoning in the session's transcript")
    keep_partial: bool = False  # a turn cancelled while decoding stores its partial answer
    # prefill the end-of-turn tokens before Done (a session's next turn starts from them); a
    # sessionless turn leaves them to its scratch cache's next sync, so its stream ends at once
    close_turn: bool = True


@dataclass
class TextDelta:
    text: str


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
