"""The one table of the request fields spl knows on ``/v1/chat/completions`` and
``/v1/completions``: OpenAI's, vLLM's and llama.cpp's extensions, and spl's own. The rows of the
fields the engine's request types declare (``request_field`` in ``superlinear.engine.types``:
``SamplingParams``' on both routes, ``ChatRequest``'s on the chat) come from those declarations;
the rows written here are the adapters and the fields spl accepts or refuses.

Each field is *honoured* (it changes what spl does), *accepted* (common clients send it and it
changes nothing here: ``user``, ``store``...) or *refused* (known, not supported: a 400 that says
so). A field outside the table is refused with a 400 naming it, as OpenAI answers an unknown
parameter, unless the server runs with ``--lenient-fields`` (then it is ignored and logged).
A misspelling gets the nearest known name in the message.

docs/server.md's table of fields is this table (``markdown_rows``; a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass

from superlinear.engine.types import SAME, ChatRequest, SamplingParams
from superlinear.errors import InvalidRequest

log = logging.getLogger("spl.serve")

HONOURED, ACCEPTED, REFUSED = "honoured", "accepted", "refused"
CHAT, TEXT = "chat", "completions"
BOTH = (CHAT, TEXT)


@dataclass(frozen=True)
class KnownField:
    name: str
    origin: str  # OpenAI | vLLM | llama.cpp | spl
    status: str  # HONOURED | ACCEPTED | REFUSED
    spl: str  # what spl does with it
    vllm: str = "—"
    llamacpp: str = "—"
    routes: tuple[str, ...] = BOTH


_S = SAME
# the adapters (OpenAI's shapes of the engine's fields) and the fields accepted or refused; the
# engine's own fields are ``declared`` below
_WRITTEN = (
    # -- OpenAI -------------------------------------------------------------------------------
    KnownField("model", "OpenAI", HONOURED, "the served model's name or an alias; another is 404", _S, "ignored"),
    KnownField("messages", "OpenAI", HONOURED, "text content (parts joined); images refused", _S, _S, (CHAT,)),
    KnownField("prompt", "OpenAI", HONOURED, "one string or token-id list", "several prompts", _S, (TEXT,)),
    KnownField("max_tokens", "OpenAI", HONOURED, "chat: until the context is full if unset; completions: 16; "
               "0 with `echo` scores the prompt only", _S, "`n_predict`"),
    KnownField("max_completion_tokens", "OpenAI", HONOURED, "as `max_tokens`", _S, _S, (CHAT,)),
    KnownField("n", "OpenAI", HONOURED, "1 only; other values 400", "several choices", _S),
    KnownField("best_of", "OpenAI", HONOURED, "1 only; other values 400", _S, "—", (TEXT,)),
    KnownField("stream", "OpenAI", HONOURED, "server-sent events", _S, _S),
    KnownField("stream_options", "OpenAI", HONOURED, "`include_usage`: a last chunk with the usage", _S, _S),
    KnownField("stop", "OpenAI", HONOURED, "up to 16 strings; the text is cut before the first", _S, _S),
    KnownField("logprobs", "OpenAI", HONOURED, "chat: a bool; completions: how many alternatives", _S, "`n_probs`"),
    KnownField("top_logprobs", "OpenAI", HONOURED, "0..20 alternatives per token (needs `logprobs`)", _S, _S, (CHAT,)),
    KnownField("echo", "OpenAI", HONOURED, "the prompt before the completion (its logprobs with `logprobs`)",
               _S, "—", (TEXT,)),
    KnownField("suffix", "OpenAI", REFUSED, "400 (no insertion)", _S, "—", (TEXT,)),
    KnownField("response_format", "OpenAI", HONOURED, "`json_object`, `json_schema` (`strict: true`: no extra "
               "keys, every property required, at every depth) through llguidance", _S, _S),
    KnownField("tools", "OpenAI", HONOURED, "rendered by the chat template, calls parsed from its markup", _S, _S,
               (CHAT,)),
    KnownField("tool_choice", "OpenAI", HONOURED, "`required` / a named function: a grammar over the tools' "
               "names and parameter schemas; `auto`: free text or a valid call; `none`: no tools; a name not in "
               "`tools` is 400", "same (named and required guided)", "`auto` / `none` / `required`", (CHAT,)),
    KnownField("user", "OpenAI", ACCEPTED, "no effect", _S, "—"),
    KnownField("metadata", "OpenAI", ACCEPTED, "no effect", "—", "—", (CHAT,)),
    KnownField("store", "OpenAI", ACCEPTED, "no effect (nothing is stored without a `session_id`)", "—", "—", (CHAT,)),
    KnownField("service_tier", "OpenAI", ACCEPTED, "no effect", "—", "—", (CHAT,)),
    KnownField("prompt_cache_key", "OpenAI", ACCEPTED, "no effect (the longest cached prefix is always reused)",
               "—", "—", (CHAT,)),
    KnownField("safety_identifier", "OpenAI", ACCEPTED, "no effect", "—", "—", (CHAT,)),
    KnownField("functions", "OpenAI", REFUSED, "400: use `tools`", "—", "—", (CHAT,)),
    KnownField("function_call", "OpenAI", REFUSED, "400: use `tool_choice`", "—", "—", (CHAT,)),
    KnownField("audio", "OpenAI", REFUSED, "400: text only", "—", "—", (CHAT,)),
    KnownField("modalities", "OpenAI", REFUSED, "400: text only", "—", "—", (CHAT,)),
    KnownField("prediction", "OpenAI", REFUSED, "400: not supported", "—", "—", (CHAT,)),
    KnownField("web_search_options", "OpenAI", REFUSED, "400: not supported", "—", "—", (CHAT,)),
    # -- vLLM -----------------------------------------------------------------------------------
    KnownField("top_k", "vLLM", HONOURED, "0 or −1: off", _S, _S),
    KnownField("repetition_penalty", "vLLM", HONOURED, "as llama.cpp's `repeat_penalty`, over the last "
               "`repeat_last_n` tokens (65,536 when unset)", "over prompt and output", "`repeat_penalty`"),
    KnownField("spaces_between_special_tokens", "vLLM", ACCEPTED, "no effect", _S, "—"),
    KnownField("guided_json", "vLLM", HONOURED, "JSON of this schema (llguidance)", "same (deprecated for "
               "`structured_outputs`)", "`json_schema`"),
    KnownField("guided_regex", "vLLM", HONOURED, "text matching this regex", "same (deprecated)", "—"),
    KnownField("guided_choice", "vLLM", HONOURED, "exactly one of these strings", "same (deprecated)", "—"),
    KnownField("guided_grammar", "vLLM", HONOURED, "Lark, or GBNF (converted)", "same (deprecated)", "`grammar`"),
    KnownField("guided_decoding_backend", "vLLM", ACCEPTED, "no effect (always llguidance)", _S, "—"),
    KnownField("structured_outputs", "vLLM", HONOURED, "exactly one of `json`, `regex`, `choice`, `grammar`, "
               "`json_object`", _S, "—"),
    KnownField("chat_template_kwargs", "vLLM", HONOURED, "passed to the chat template (reserved names refused)",
               _S, _S, (CHAT,)),
    KnownField("request_id", "vLLM", ACCEPTED, "no effect", "names the request", "—"),
    KnownField("priority", "vLLM", ACCEPTED, "no effect (first come, first served)", "priority scheduling", "—"),
    KnownField("use_beam_search", "vLLM", REFUSED, "400: no beam search", _S, "—"),
    KnownField("prompt_logprobs", "vLLM", REFUSED, "400: use /v1/completions with `echo` and `logprobs`", _S, "—"),
    KnownField("truncate_prompt_tokens", "vLLM", REFUSED, "400: prompts are never truncated", _S, "—"),
    KnownField("include_stop_str_in_output", "vLLM", REFUSED, "400: the stop string is never in the text", _S, "—"),
    # -- llama.cpp ------------------------------------------------------------------------------
    KnownField("n_predict", "llama.cpp", HONOURED, "as `max_tokens` (−1: no limit)", "—", _S),
    KnownField("grammar", "llama.cpp", HONOURED, "GBNF (or Lark) through llguidance", "`guided_grammar`", _S),
    KnownField("json_schema", "llama.cpp", HONOURED, "JSON of this schema", "`guided_json`", _S),
    KnownField("cache_prompt", "llama.cpp", ACCEPTED, "no effect (the cached prefix is always reused)", "—", _S),
    KnownField("id_slot", "llama.cpp", ACCEPTED, "no effect (use `session_id`)", "—", _S),
    KnownField("return_progress", "llama.cpp", HONOURED, "`prompt_progress` chunks while the prompt is prefilled",
               "—", _S, (CHAT,)),
    KnownField("timings_per_token", "llama.cpp", ACCEPTED, "no effect (`timings` come with the last chunk)",
               "—", _S),
    # -- spl ------------------------------------------------------------------------------------
    KnownField("session_id", "spl", HONOURED, "the turn runs on this session (its cache is kept)", "—", "—", (CHAT,)),
    KnownField("session_mode", "spl", HONOURED, "`auto`, `append` or `replace` the session's messages", "—", "—",
               (CHAT,)),
    KnownField("repetition_detection", "spl", HONOURED, "stop a loop (`finish_reason` stop, `stop_reason` "
               "repetition)", "—", "—"),
    KnownField("sse_ping_interval", "spl", HONOURED, "seconds of silence before a `: keep-alive` comment",
               "—", "—", (CHAT,)),
)


def declared(request_type: type, routes: tuple[str, ...]) -> list[KnownField]:
    """The rows of the fields ``request_type`` declares for clients (those with a ``doc``)."""
    return [KnownField(f.name, f.metadata["origin"], HONOURED, f.metadata["doc"], f.metadata["vllm"],
                       f.metadata["llamacpp"], routes)
            for f in dataclasses.fields(request_type) if "doc" in f.metadata]


_ORIGINS, _STATUSES = ("OpenAI", "vLLM", "llama.cpp", "spl"), (HONOURED, ACCEPTED, REFUSED)
_F = sorted([*declared(SamplingParams, BOTH), *declared(ChatRequest, (CHAT,)), *_WRITTEN],
            key=lambda f: (_ORIGINS.index(f.origin), _STATUSES.index(f.status)))
FIELDS: dict[str, dict[str, KnownField]] = {route: {f.name: f for f in _F if route in f.routes} for route in BOTH}
# the fields that say how the output is constrained: at most one per request
CONSTRAINTS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "structured_outputs", "grammar", "json_schema")


def check_fields(body: dict, route: str, *, lenient: bool) -> None:
    """Refuse (400 naming it) a field of ``body`` that ``route`` does not know, or knows and
    refuses; drop the accepted ones (and, ``lenient``, the unknown ones: logged) in place."""
    known = FIELDS[route]
    for name in list(body):
        field = known.get(name)
        if field is None:
            if lenient:
                log.info("spl: ignored the unknown request field %r (--lenient-fields)", name)
                del body[name]
                continue
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise InvalidRequest(f"Unknown parameter: {name!r}{hint} (spl's fields: docs/server.md; "
                                 "`spl serve --lenient-fields` ignores unknown ones)",
                                 param=name, code="unknown_parameter")
        if field.status == REFUSED:
            raise InvalidRequest(f"{name} is not supported here: {field.spl.removeprefix('400: ')}",
                                 param=name, code="unsupported_parameter")
        if field.status == ACCEPTED:
            del body[name]
    given = [name for name in CONSTRAINTS if body.get(name) is not None]
    if len(given) > 1:
        raise InvalidRequest(f"send one output constraint at a time, got {', '.join(given)}", param=given[1],
                             code="conflicting_parameters")


def markdown_rows() -> str:
    """The table's rows for docs/server.md: field → spl → vLLM → llama.cpp."""
    lines = ["| field | from | spl | vLLM | llama.cpp |", "|---|---|---|---|---|"]
    for f in _F:
        where = "" if f.routes == BOTH else f" ({'chat' if f.routes == (CHAT,) else 'completions'} only)"
        lines.append(f"| `{f.name}`{where} | {f.origin} | {f.status}: {f.spl} | {f.vllm} | {f.llamacpp} |")
    return "\n".join(lines)
