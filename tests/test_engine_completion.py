"""Plain text completions on the default model: the same tokens as greedy decoding by hand,
stop strings, max_tokens, prefix reuse, bad prompts."""

from __future__ import annotations

import pytest
import torch

from superlinear.engine import Conversation, Done, SamplingParams, TextDelta, prompt_ids, run_completion
from superlinear.errors import InvalidRequest, TooLarge

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris. The capital of Italy is"


def _complete(conv, prompt, **sampling):
    events = list(run_completion(conv, prompt_ids(conv.model.tokenizer, prompt), SamplingParams(**sampling)))
    done = events[-1]
    assert isinstance(done, Done) and all(isinstance(e, TextDelta) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), done


def test_greedy_completion_is_the_models_own_continuation(default_model):
    m = default_model
    conv = Conversation(m, 256)
    text, done = _complete(conv, PROMPT, max_tokens=12)
    # by hand: prefill, then argmax step by step
    ids = m.tokenizer.encode(PROMPT, add_special_tokens=True)
    cache = m.new_cache(256)
    logits, want = m.prefill(cache, ids), []
    for _ in range(12):
        t = int(torch.argmax(logits))
        if t == m.tokenizer.eos_token_id:
            break
        want.append(t)
        logits = m.decode_step(cache, t)
    assert text == m.tokenizer.decode(want) and text.strip()
    assert done.finish_reason == "length" and done.usage["completion_tokens"] == 12
    assert done.usage["prompt_tokens"] == len(ids) and conv.transcript == []
    # the same prompt again: its prefix comes from the cache
    again, done2 = _complete(conv, PROMPT, max_tokens=12)
    assert again == text and done2.usage["cached_tokens"] >= len(ids) - 1


def test_stop_strings_and_token_prompts(default_model):
    conv = Conversation(default_model, 256)
    full, _ = _complete(conv, PROMPT, max_tokens=12)
    cut = full.strip().split()[0]
    stopped, done = _complete(conv, PROMPT, max_tokens=12, stop=[cut])
    assert done.finish_reason == "stop" and cut not in stopped and full.startswith(stopped)
    ids = default_model.tokenizer.encode(PROMPT, add_special_tokens=True)
    same = [e for e in run_completion(conv, prompt_ids(default_model.tokenizer, ids), SamplingParams(max_tokens=12))]
    assert "".join(e.text for e in same[:-1]) == full


@pytest.mark.parametrize("prompt,match", [("", "empty"), ([], "empty"), ([-1], "not a token id"),
                                          ([10 ** 9], "not a token id"), ([True], "not a token id")])
def test_bad_prompts_are_refused(default_model, prompt, match):
    with pytest.raises(InvalidRequest, match=match):
        prompt_ids(default_model.tokenizer, prompt)


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(default_model):
    conv = Conversation(default_model, 16)
    ids = prompt_ids(default_model.tokenizer, PROMPT * 3)
    with pytest.raises(TooLarge, match="at most 16") as err:  # 400 context_length_exceeded
        list(run_completion(conv, ids, SamplingParams()))
    assert err.value.http_status == 400 and err.value.code == "context_length_exceeded"
    assert conv.position == 0
