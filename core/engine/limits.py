"""Bounds on every number a chat request carries, and the check that enforces them.

A request field is user input: an unbounded one can make the engine allocate a list of its
size (``repetition.max_period``), overflow a C integer (``seed``), or run for hours. The server
declares the same bounds in its request schemas (so the error names the JSON field); the engine
checks them again in ``run_turn`` for library callers.
"""

from __future__ import annotations

import math

from superlinear.errors import InvalidRequest

from .types import ChatRequest, SamplingParams

MAX_TOKENS = 1 << 32  # max_tokens, reasoning_budget, max_seq_len: beyond any cache
MAX_TOP_K = 1 << 20  # larger than any vocabulary
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes
MAX_STOPS = 16
MAX_STOP_CHARS = 4096  # the stop cutter holds back up to this many characters
MAX_REPETITION_PERIOD = 1024  # the detector does O(max_period) work per generated token
MAX_REPETITION_TAIL = 1 << 20
MAX_REPETITION_REPEATS = 1024
MAX_TOP_LOGPROBS = 20  # vLLM's and OpenAI's limit: each costs a top-k and a decode per token
MAX_REPEAT_PENALTY = 10.0
MAX_REPEAT_LAST_N = 1 << 16  # the window is a set built per token
MAX_LOGIT_BIAS = 1024  # tokens a logit_bias may name (OpenAI allows 300)

# Names the chat template call itself uses: a request's chat_template_kwargs must not override
# them (``messages``, ``tools``, ``add_generation_prompt`` ... would break or hijack the render).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def _int_in(value, low: int, high: int, param: str) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"{param} must be an integer from {low} to {high}, got {value!r}", param=param)


def check_template_kwargs(kwargs) -> None:
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise InvalidRequest("chat_template_kwargs must be an object", param="chat_template_kwargs")
    reserved = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(map(repr, reserved))}: the server "
                             "sets them itself", param="chat_template_kwargs")


def check_sampling(sp: SamplingParams, vocab: int = MAX_TOP_K) -> None:
    """Raise ``InvalidRequest`` (naming the field) for a sampling value outside its bounds;
    ``vocab``: the model's vocabulary size (``logit_bias`` names token ids below it)."""
    for name, value, low, high in (("temperature", sp.temperature, 0.0, 2.0), ("top_p", sp.top_p, 0.0, 1.0),
                                   ("min_p", sp.min_p, 0.0, 1.0),
                                   ("frequency_penalty", sp.frequency_penalty, -2.0, 2.0),
                                   ("presence_penalty", sp.presence_penalty, -2.0, 2.0),
                                   ("repeat_penalty", sp.repeat_penalty, 0.0, MAX_REPEAT_PENALTY)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
            raise InvalidRequest(f"{name} must be a number from {low} to {high}, got {value!r}", param=name)
    if sp.top_p <= 0:
        raise InvalidRequest("top_p must be more than 0", param="top_p")
    if sp.repeat_penalty <= 0:
        raise InvalidRequest("repeat_penalty must be more than 0 (1 is off)", param="repeat_penalty")
    _int_in(sp.top_k, 0, MAX_TOP_K, "top_k")
    _int_in(sp.seed, SEED_MIN, SEED_MAX, "seed")
    _int_in(sp.max_tokens, 0, MAX_TOKENS, "max_tokens")
    _int_in(sp.min_tokens, 0, MAX_TOKENS, "min_tokens")
    if sp.max_tokens is not None and sp.min_tokens > sp.max_tokens:
        raise InvalidRequest(f"min_tokens ({sp.min_tokens}) is more than max_tokens ({sp.max_tokens})",
                             param="min_tokens")
    if len(sp.stop_token_ids) > MAX_STOPS * 64 or any(
            not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in sp.stop_token_ids):
        raise InvalidRequest(f"stop_token_ids: at most {MAX_STOPS * 64} token ids below {vocab}",
                             param="stop_token_ids")
    _int_in(sp.repeat_last_n, 0, MAX_REPEAT_LAST_N, "repeat_last_n")
    _int_in(sp.logprobs, 0, MAX_TOP_LOGPROBS, "top_logprobs")
    if len(sp.stop) > MAX_STOPS or any(not isinstance(s, str) or len(s) > MAX_STOP_CHARS for s in sp.stop):
        raise InvalidRequest(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
                             param="stop")
    _check_logit_bias(sp.logit_bias, vocab)
    if sp.structured is not None:  # the grammar module is for the generations that ask for one
        from .grammar import grammar_of

        grammar_of(sp.structured)


def _check_logit_bias(bias, vocab: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers", param="logit_bias")
    for token, value in bias.items():
        _int_in(token, 0, vocab - 1, "logit_bias")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not -100 <= value <= 100:
            raise InvalidRequest(f"logit_bias values must be numbers from -100 to 100, got {value!r}",
                                 param="logit_bias")


def check_request(req: ChatRequest, vocab: int = MAX_TOP_K) -> None:
    """Raise ``InvalidRequest`` (naming the field) for a value outside the bounds above."""
    check_sampling(req.sampling, vocab)
    _int_in(req.reasoning_budget, 0, MAX_TOKENS, "reasoning_budget")
    rep = req.repetition
    if rep is not None:
        _int_in(rep.tail_len, 2, MAX_REPETITION_TAIL, "repetition_detection.tail_len")
        _int_in(rep.min_repeats, 2, MAX_REPETITION_REPEATS, "repetition_detection.min_repeats")
        _int_in(rep.max_period, 1, MAX_REPETITION_PERIOD, "repetition_detection.max_period")
    check_template_kwargs(req.chat_template_kwargs)
