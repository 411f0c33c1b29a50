"""Conversation on a real tiny Mamba-2 / attention / MoE hybrid (nemotron_h, random weights):
the recurrent state is rewound through the saved boundary states, never by replaying history."""

import threading

import pytest
import torch

from superlinear.engine import ChatRequest, SamplingParams, TextDelta, run_turn
from superlinear.engine.conversation import Conversation

LAYERS = ["linear_attention", "full_attention", "moe", "linear_attention", "full_attention", "mlp"]


@pytest.fixture(scope="module")
def hybrid_model(tmp_path_factory):
    import shutil

    from transformers import NemotronHConfig, NemotronHForCausalLM

    from superlinear.model import load_model
    from superlinear.model.default import ensure_default

    torch.manual_seed(0)
    cfg = NemotronHConfig(vocab_size=49152, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, layers_block_type=LAYERS, mamba_num_heads=4, mamba_head_dim=16,
                          n_groups=1, ssm_state_size=16, conv_kernel=4, chunk_size=16, intermediate_size=128,
                          n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1,
                          tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("engine_nemotron_h")
    NemotronHForCausalLM(cfg).eval().save_pretrained(path)
    for f in ensure_default().iterdir():  # the default model's tokenizer and chat template
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name.endswith(".jinja"):
            shutil.copy(f, path / f.name)
    model = load_model(str(path))
    assert model.has_recurrent_state
    return model


def _turn(conv, messages, cancel=None):
    events = list(run_turn(conv, ChatRequest(messages, sampling=SamplingParams(max_tokens=8)), cancel))
    return events[-1]


def test_hybrid_turns_rollback_cancel_fork(hybrid_model):
    conv = Conversation(hybrid_model, 512)
    m1 = [{"role": "user", "content": "Hello there"}]
    d1 = _turn(conv, m1)
    assert conv.token_ids == conv.render(conv.transcript).ids
    after_one = (conv.position, conv.token_ids)
    m2 = conv.transcript + [{"role": "user", "content": "Second question"}]
    d2 = _turn(conv, m2)
    assert d2.usage["cached_tokens"] == after_one[0]  # nothing replayed
    # rollback: back to the saved boundary state, the same next turn gives the same tokens
    conv.rollback(2)
    assert (conv.position, conv.token_ids) == after_one
    d2b = _turn(conv, m2)
    assert d2b.message == d2.message and d2b.usage["cached_tokens"] == after_one[0]
    # a fresh conversation fed the same history agrees (the rewound state is exact)
    fresh = Conversation(hybrid_model, 512)
    assert _turn(fresh, m1).message == d1.message
    assert _turn(fresh, m2).message == d2.message
    # cancel mid-decode restores the recurrent state too
    before = (conv.position, conv.token_ids, conv.transcript)
    m3 = conv.transcript + [{"role": "user", "content": "Third"}]
    cancel = threading.Event()
    for e in run_turn(conv, ChatRequest(m3, sampling=SamplingParams(max_tokens=8)), cancel):
        if isinstance(e, TextDelta):
            cancel.set()
    assert e.finish_reason == "cancelled"
    assert (conv.position, conv.token_ids, conv.transcript) == before
    fork = conv.fork()
    d3 = _turn(conv, m3)
    assert _turn(fork, m3).message == d3.message == _turn(fresh, m3).message
    # an edited first message: rewound to the start state, replayed, same as fresh
    edited = [{"role": "user", "content": "Hello their"}]
    de = _turn(conv, edited)
    assert de.usage["cached_tokens"] == 0
    assert _turn(Conversation(hybrid_model, 512), edited).message == de.message



@pytest.mark.parametrize("which", ["hybrid_model", "default_model"])
def test_every_token_logits_match_one_prefix_at_a_time(request, which):
    """``prefill(on_logits=...)`` (a prompt's log-likelihood) gives row i = the logits after
    token i, as a prefill of the first i + 1 tokens alone does; chunk borders change nothing.
    Both forwards: the hybrid's own and transformers' (the default llama, ``logits_to_keep=0``)."""
    model = request.getfixturevalue(which)
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    rows = []
    last = model.prefill(model.new_cache(64), ids, chunk_size=4, on_logits=rows.append)
    every = torch.cat(rows)
    assert every.shape == (len(ids), last.numel()) and torch.equal(every[-1], last)
    for i in (0, 3, 4, len(ids) - 1):
        alone = model.prefill(model.new_cache(64), ids[:i + 1])
        torch.testing.assert_close(every[i], alone, atol=1e-3, rtol=1e-3)
