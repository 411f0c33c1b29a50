"""Which grammar library costs least per generated token on CPU (the choice behind
``response_format`` in docs/server.md): llguidance, xgrammar and outlines-core each constrain
the same JSON document, token by token, with the default model's tokenizer.

Per step: compute the allowed-token mask, apply it to a logits row of the vocabulary's size,
accept the document's next token. Reported: the grammar's compile time and the mean per-token
time (mask + apply + accept). Run with one thread on an otherwise quiet machine:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_grammar_libs.py

Needs the three libraries (``pip install llguidance xgrammar outlines-core``) and the converted
default model (``spl models info default`` converts it).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace, first programmer of the Analytical Engine", "age": 36,
            "tags": ["mathematics", "poetry of science", "notes on the engine", "Bernoulli numbers"],
            "address": {"city": "London", "zip": "W1"}}
ROUNDS = 5


def tokenizer():
    from transformers import AutoTokenizer

    from superlinear.model.default import ensure_default

    return AutoTokenizer.from_pretrained(str(ensure_default()))


def bench_llguidance(tok, ids, vocab):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                           defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    bitmask = lt.allocate_token_bitmask(1, lltok.vocab_size)

    def run():
        matcher.reset()
        for t in ids:
            logits = torch.zeros(1, vocab)
            lt.fill_next_token_bitmask(matcher, bitmask, 0)
            lt.apply_token_bitmask_inplace(logits, bitmask)
            assert logits[0, t] == 0, "document token masked out"
            assert matcher.consume_token(t), matcher.get_error()
    return compile_s, run


def bench_xgrammar(tok, ids, vocab):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, vocab)

    def run():
        matcher.reset()
        for t in ids:
            logits = torch.zeros(1, vocab)
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            assert logits[0, t] == 0, "document token masked out"
            assert matcher.accept_token(t)
    return compile_s, run


def bench_outlines(tok, ids, vocab):
    from outlines_core import Guide, Index, Vocabulary, json_schema
    from outlines_core.kernels.torch import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask

    t0 = time.perf_counter()
    eos = tok.eos_token_id
    special = set(tok.all_special_ids)
    pieces: dict[bytes, list[int]] = {}
    for i in range(len(tok)):
        if i in special:
            continue
        pieces.setdefault(_token_bytes(tok, i), []).append(i)
    regex = json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"")
    index = Index(regex, Vocabulary(eos, pieces))
    guide = Guide(index)
    compile_s = time.perf_counter() - t0
    bitmask = allocate_token_bitmask(vocab)

    def run():
        guide.reset()
        for t in ids:
            logits = torch.zeros(1, vocab)
            fill_next_token_bitmask(guide, bitmask)
            apply_token_bitmask_inplace(logits, bitmask)
            assert logits[0, t] == 0, "document token masked out"
            guide.advance(t)
    return compile_s, run


def bench_spl(tok, ids, vocab):
    """What spl runs: llguidance's mask, unpacked by numpy (``superlinear.engine.grammar``)."""
    from superlinear.engine.grammar import Grammar, grammar_of

    t0 = time.perf_counter()
    grammar = Grammar(tok, grammar_of({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}),
                      [tok.eos_token_id])
    compile_s = time.perf_counter() - t0

    def run():
        grammar.matcher.reset()
        for t in ids:
            logits = grammar.mask(torch.zeros(vocab))
            assert logits[t] == 0, "document token masked out"
            grammar.accept(t)
    return compile_s, run


_BYTE_DECODER: dict[str, int] = {}


def _token_bytes(tok, i: int) -> bytes:
    """The bytes a byte-level BPE token stands for (GPT-2's byte-to-unicode table inverted)."""
    if not _BYTE_DECODER:
        # printable bytes stand for themselves, the others for chr(256 + n) in byte order
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        extra = 0
        for b in range(256):
            if b in printable:
                _BYTE_DECODER[chr(b)] = b
            else:
                _BYTE_DECODER[chr(256 + extra)] = b
                extra += 1
    return bytes(_BYTE_DECODER[c] for c in tok.convert_ids_to_tokens(i))


def main() -> None:
    torch.set_num_threads(1)
    tok = tokenizer()
    vocab = len(tok)
    ids = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    print(f"vocab {vocab}, document {len(ids)} tokens, {ROUNDS} rounds, torch threads {torch.get_num_threads()}")
    for name, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar),
                        ("outlines-core", bench_outlines), ("spl (llguidance+numpy)", bench_spl)):
        compile_s, run = bench(tok, ids, vocab)
        run()  # warm
        times = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) / len(ids))
        median, best = statistics.median(times) * 1e6, min(times) * 1e6
        print(f"{name:22s} compile {compile_s * 1e3:8.1f} ms   per token median {median:8.1f} us   min {best:8.1f} us")


if __name__ == "__main__":
    main()
