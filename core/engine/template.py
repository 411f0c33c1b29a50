"""Messages -> prompt text with the tokenizer's chat template (tools and reasoning included).

Templates differ in what they understand; the engine adapts the messages so every template
renders them: tool calls' arguments become objects (templates iterate over them), and for a
template that knows nothing about tools the tools go into the system prompt and tool calls /
results are written as Hermes text. Stored reasoning (``reasoning_content``) is passed through
to templates that handle it and written as ``<think>…</think>`` before the content otherwise.
"""

from __future__ import annotations

from jinja2 import TemplateError

from superlinear.errors import InvalidRequest

from .limits import check_template_kwargs
from .tools import THINK_CLOSE, THINK_OPEN, arguments_as_objects, hermes_render_calls, hermes_tools_system_prompt

# End-of-turn tokens of common chat formats: stop tokens whenever the vocabulary has them (a
# model that starts a new turn, <|im_start|>, has ended its own).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>",
                      "<end_of_turn>", "<|end|>", "</s>", "<|return|>")


def _text_content(content) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


class ChatTemplate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        source = tokenizer.chat_template or ""
        if isinstance(source, dict):  # several named templates: the default one
            source = source.get("default", next(iter(source.values()), ""))
        self.source = source
        self.supports_tools = "tools" in source
        self.supports_reasoning = "reasoning_content" in source
        # Nemotron / Qwen3-Coder write <function=NAME><parameter=P>; others Hermes JSON.
        self.tool_format = "xml" if "<function=" in source else "hermes"
        vocab = tokenizer.get_vocab()
        # Special (added) tokens: tokenizers split the text at them before anything else.
        self.special_ids = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.end_token_ids = {int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab}
        if tokenizer.eos_token_id is not None:
            self.end_token_ids.add(int(tokenizer.eos_token_id))

    def prepare(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        out = []
        for m in messages:
            m = dict(m)
            role = m.get("role")
            m["content"] = _text_content(m.get("content"))
            if role == "assistant":
                reasoning = m.pop("reasoning_content", None) if not self.supports_reasoning else None
                if reasoning:
                    m["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n" + m["content"]
                if m.get("tool_calls"):
                    if self.supports_tools:
                        m = arguments_as_objects(m)
                    else:
                        calls = hermes_render_calls(m)
                        m["content"] = (m["content"] + "\n" + calls) if m["content"] else calls
                        del m["tool_calls"]
            elif role == "tool" and not self.supports_tools:
                m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
                m.pop("tool_call_id", None)
            out.append(m)
        if tools and not self.supports_tools:
            prompt = hermes_tools_system_prompt(tools)
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = False, kwargs: dict | None = None) -> str:
        check_template_kwargs(kwargs)
        prepared = self.prepare(messages, tools)
        extra = dict(kwargs or {})
        if tools and self.supports_tools:
            extra["tools"] = tools
        try:
            return self.tokenizer.apply_chat_template(
                prepared, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # The template runs on request data (messages, tools, chat_template_kwargs): what it
            # cannot render is a bad request, e.g. a template's raise_exception("roles must alternate").
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise InvalidRequest(f"the chat template cannot render this request: {reason}",
                                 param="messages") from exc
