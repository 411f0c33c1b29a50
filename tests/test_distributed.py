"""Context parallelism (superlinear.distributed) on CPU: two real processes on gloo give what one
process gives, for the attention kernel, prefill, decode and a session's state moved between
world sizes through a real safetensors file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_model_hybrid import make_state_matter, tiny_hybrid_config

from superlinear.distributed import ContextParallel, ContextSlices, SlicedCache, merge_partials, new_cache
from superlinear.errors import InvalidRequest
from superlinear.kernels import SpanParams
from superlinear.kernels.attention.reference import reference_prefill
from superlinear.model.random_weights import random_model

WORLD = 2
PROMPT = 230  # prefill length; the two slices of a 246-token cache meet at 123
CHUNK = 37  # prefill chunks that straddle the slice boundary
STEPS = 8  # decode steps on two ranks
MORE = 6  # decode steps after a state moved from two ranks to one
MOVED = 4  # decode steps after a state moved from one process to two ranks (on the Triton decode)
KERNEL_BOUNDARY = 137
KERNEL_PARAMS = {
    "integer power": SpanParams(3, 3, 3.0, 1.0, 0.5, inv_search_power=2),
    "float power, no forward": SpanParams(4, 2, 2.0, 0.0, 0.55, search_power=0.55),
}


def _model(device="cpu"):
    torch.manual_seed(0)  # the same weights in every process
    model = make_state_matter(random_model(tiny_hybrid_config(), name="tiny-hybrid", device="cpu", dtype="fp32",
                                           seed=1))
    if device == "cpu":
        return model
    on_device = random_model(tiny_hybrid_config(), name="tiny-hybrid", device=device, dtype="fp32", seed=1)
    on_device.hf.load_state_dict(model.hf.state_dict())  # the same values as on CPU
    return on_device


def _prompt() -> list[int]:
    return torch.randint(0, 512, (PROMPT,), generator=torch.Generator().manual_seed(7)).tolist()


def _greedy(model, cache, logits, steps):
    tokens, every = [], []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = model.decode_step(cache, tokens[-1])
        every.append(logits)
    return tokens, torch.stack(every).cpu(), logits


def _kernel_inputs(ties: bool, device="cpu"):
    g = torch.Generator().manual_seed(11)
    q1, q2 = torch.randn(2, 1, 4, 300, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 300, 16, generator=g)
    if ties:  # every candidate scores exactly the same (small integers): the tie rule alone picks
        q1 = q1.mul(2).round()
        k = k[:, :, :1].mul(2).round().expand(-1, -1, 300, -1).contiguous()
    return tuple(x.to(device) for x in (q1, q2, k, v))


def _kernel_case(ties: bool, params: SpanParams, device) -> torch.Tensor:
    """All 300 rows at once (prefill), then the last row alone (decode), from this rank's keys."""
    q1, q2, k, v = _kernel_inputs(ties, device)
    part = ContextParallel(ContextSlices((0, KERNEL_BOUNDARY)))
    lo, hi = part.key_start, part.key_end or 300
    pos = torch.arange(300, device=device)
    rows = reference_prefill(q1, q2, k[:, :, lo:hi], v[:, :, lo:hi], pos, params, key_start=lo, exchange=part)
    last = reference_prefill(q1[:, :, -1:], q2[:, :, -1:], k[:, :, lo:hi], v[:, :, lo:hi], pos[-1:], params,
                             key_start=lo, exchange=part)
    return torch.cat([rows, last], dim=2)


def _triton_decode_case(ties: bool, params: SpanParams, device) -> torch.Tensor:
    """The last row as a Triton decode step over this rank's keys (the interpreter on CPU)."""
    from superlinear.kernels.attention.triton_decode import triton_decode

    q1, q2, k, v = _kernel_inputs(ties, device)
    part = ContextParallel(ContextSlices((0, KERNEL_BOUNDARY)))
    part.length_bound = 300
    lo, hi = part.key_start, part.key_end or 300
    return triton_decode(q1[:, :, -1:], q2[:, :, -1:], k[:, :, lo:hi], v[:, :, lo:hi],
                         torch.tensor([299], device=device), params, key_start=lo, exchange=part, length_bound=300)


def _graph_writes(cache) -> list[list[int]]:
    """Where a captured decode step's write lands: the model's protocol with the position as a
    device tensor (``begin_forward(..., write_index=)``), at a position of each slice; the local
    indices this rank changed, per write."""
    landed = []
    for position in (100, 200):
        probe = cache.clone()
        before = probe.local.keys[2].clone()
        probe.begin_forward(0, 1, write_index=torch.tensor([position], device=cache.device))
        new = torch.full((1, 2, 1, 16), 7.0, device=cache.device)
        keys, values = probe.update(new, new, 2)
        changed = (keys != before).any(dim=-1).any(dim=1)[0]
        landed.append(changed.nonzero().flatten().tolist())
    return landed


def _worker(rank: int, work: str, kind: str) -> None:
    """One rank: gloo on CPU, NCCL on GPU ``rank`` (tests/test_distributed_gpu.py)."""
    torch.set_num_threads(1)
    device = torch.device("cpu") if kind == "cpu" else torch.device("cuda", rank)
    meet = f"file://{Path(work, 'rendezvous')}"  # a file, not a port: no collision with anything
    if kind == "cpu":
        dist.init_process_group("gloo", init_method=meet, rank=rank, world_size=WORLD)
    else:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=meet, rank=rank, world_size=WORLD, device_id=device)
    try:
        cases = [(f"{name}, ties={ties}", ties, params) for name, params in KERNEL_PARAMS.items()
                 for ties in (False, True)]
        out = {"kernel": {case: _kernel_case(ties, params, device) for case, ties, params in cases},
               "triton": {case: _triton_decode_case(ties, params, device) for case, ties, params in cases}}
        model = _model(str(device))
        cache = new_cache(model, PROMPT + 2 * STEPS)
        out["first"] = model.prefill(cache, _prompt(), chunk_size=CHUNK)
        out["tokens"], out["logits"], last = _greedy(model, cache, out["first"], STEPS)
        out["held"], out["nbytes"] = cache.local.position, cache.nbytes()
        out["graph_writes"] = _graph_writes(cache)
        out["empty"] = {n: tuple(t.shape) for n, t in new_cache(model, 64).state_tensors().items()}
        state = cache.state_tensors()  # collective: the whole sequence on every rank
        if rank == 0:
            save_file({**state, "next": last[None]}, str(Path(work, "two_ranks.safetensors")))
        # a one-process state goes onto two ranks
        single = load_file(str(Path(work, "one_process.safetensors")), device=str(device))
        moved = new_cache(model, PROMPT + 2 * STEPS)
        moved.load_state_tensors({n: t for n, t in single.items() if n != "next"}, PROMPT)
        os.environ["SPL_ATTENTION_BACKEND"] = "triton"  # decode steps on the split Triton decode
        out["moved_tokens"], out["moved_logits"], _ = _greedy(model, moved, single["next"][0], MOVED)
        del os.environ["SPL_ATTENTION_BACKEND"]
        torch.save(_to_cpu(out), Path(work, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def run_both(work: Path, kind: str) -> dict:
    """One process's greedy run, then the same on two ranks (spawned once for every check)."""
    model = _model("cpu" if kind == "cpu" else "cuda:0")
    cache = model.new_cache(PROMPT + 2 * STEPS + MORE)
    first = model.prefill(cache, _prompt(), chunk_size=CHUNK)
    save_file(_to_cpu({**cache.state_tensors(), "next": first[None]}), str(work / "one_process.safetensors"))
    tokens, logits, _ = _greedy(model, cache, first, STEPS + MORE)
    interpret = os.environ.get("TRITON_INTERPRET")
    if kind == "cpu":  # the ranks run the Triton decode kernels in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        mp.spawn(_worker, args=(str(work), kind), nprocs=WORLD, join=True)
    finally:
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    ranks = [torch.load(work / f"rank{r}.pt") for r in range(WORLD)]
    return {"model": model, "first": first.cpu(), "tokens": tokens, "logits": logits.cpu(), "work": work,
            "ranks": ranks}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_both(tmp_path_factory.mktemp("dist"), "cpu")


@pytest.mark.parametrize("case", [f"{name}, ties={ties}" for name in KERNEL_PARAMS for ties in (False, True)])
def test_sliced_kernel_equals_the_whole_one(runs, case):
    name, ties = case.rsplit(", ties=", 1)
    params, ties = KERNEL_PARAMS[name], ties == "True"
    q1, q2, k, v = _kernel_inputs(ties)
    pos = torch.arange(300)
    plan = {}
    whole = reference_prefill(q1, q2, k, v, pos, params, plan=plan)
    expected = torch.cat([whole, whole[:, :, -1:]], dim=2)
    for rank in runs["ranks"]:
        torch.testing.assert_close(rank["kernel"][case], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["triton"][case], whole[:, :, -1:], rtol=1e-5, atol=2e-5)
    if ties:  # the farthest anchors win a tie: the lower rank's, over candidates of both ranks
        assert bool((plan["anchor"][:, :, -1] < KERNEL_BOUNDARY).all())
    else:  # spans that straddle the boundary were selected, so both halves of them were needed
        straddle = (plan["lo"] < KERNEL_BOUNDARY) & (plan["hi"] >= KERNEL_BOUNDARY)
        assert int(straddle.sum()) > 10


def test_two_ranks_prefill_and_decode_like_one_process(runs):
    for rank in runs["ranks"]:
        torch.testing.assert_close(rank["first"], runs["first"], rtol=1e-4, atol=1e-4)
        assert rank["tokens"] == runs["tokens"][:STEPS]
        torch.testing.assert_close(rank["logits"], runs["logits"][:STEPS], rtol=1e-4, atol=1e-4)
    # the ranks agree bit for bit (the same collectives' results, combined in the same order)
    assert torch.equal(runs["ranks"][0]["logits"], runs["ranks"][1]["logits"])
    assert len(set(runs["tokens"])) > 3  # not a degenerate model


def test_a_captured_step_writes_only_on_the_rank_holding_the_position(runs):
    assert runs["ranks"][0]["graph_writes"] == [[100], []]
    assert runs["ranks"][1]["graph_writes"] == [[], [200 - 123]]


def test_an_empty_sequence_gathers_to_an_empty_state(runs):
    for rank in runs["ranks"]:
        assert rank["empty"] == {n: tuple(t.shape) for n, t in runs["model"].new_cache(64).state_tensors().items()}
        assert rank["empty"]["layers.2.key"] == (1, 2, 0, 16)


def test_each_rank_holds_only_its_slice(runs):
    held = [rank["held"] for rank in runs["ranks"]]
    assert held == [123, PROMPT + STEPS - 123]
    whole = runs["model"].new_cache(PROMPT + STEPS)
    whole.reserve(PROMPT + STEPS, exact=True)
    assert all(rank["nbytes"] < whole.nbytes() for rank in runs["ranks"])


def test_state_saved_on_two_ranks_continues_on_one(runs):
    model = runs["model"]
    saved = load_file(str(runs["work"] / "two_ranks.safetensors"))
    last = saved.pop("next")[0]
    cache = model.cache_from_state(saved, PROMPT + STEPS, PROMPT + STEPS + MORE)
    tokens, logits, _ = _greedy(model, cache, last, MORE)
    assert tokens == runs["tokens"][STEPS:]
    torch.testing.assert_close(logits, runs["logits"][STEPS:], rtol=1e-4, atol=1e-4)


def test_state_saved_on_one_process_continues_on_two_ranks(runs):
    """(decoding on the Triton kernels over each rank's slice: the interpreter on CPU)"""
    for rank in runs["ranks"]:
        assert rank["moved_tokens"] == runs["tokens"][:MOVED]
        torch.testing.assert_close(rank["moved_logits"], runs["logits"][:MOVED], rtol=1e-4, atol=1e-4)


def test_merge_partials_is_the_softmax_over_the_union():
    g = torch.Generator().manual_seed(3)
    scores, values = torch.randn(9, generator=g), torch.randn(9, 4, generator=g)
    parts = [slice(0, 4), slice(4, 4), slice(4, 9)]  # the middle part holds no key
    outs = torch.stack([torch.softmax(scores[p], 0) @ values[p] if p.stop > p.start else torch.zeros(4)
                        for p in parts])
    lses = torch.stack([torch.logsumexp(scores[p], 0) for p in parts])
    torch.testing.assert_close(merge_partials(outs, lses), torch.softmax(scores, 0) @ values)
    assert torch.equal(merge_partials(torch.zeros(2, 4), torch.full((2,), float("-inf"))), torch.zeros(4))


def test_one_process_without_a_group_is_one_slice_holding_everything():
    model = _model()
    cache = new_cache(model, 64)
    assert isinstance(cache, SlicedCache) and cache.partition.world_size == 1
    ids = list(range(100, 140))
    # the first chunk ends before the window does: no row has a candidate anchor yet
    sliced = model.prefill(cache, ids, chunk_size=8)
    plain = model.prefill(model.new_cache(64), ids, chunk_size=8)
    torch.testing.assert_close(sliced, plain, rtol=1e-5, atol=1e-5)
    # a rewind to a saved position decodes the same again
    saved, token = cache.recurrent_state(), int(sliced.argmax())
    again = model.decode_step(cache, token)
    cache.truncate(len(ids), recurrent_state=saved)
    assert cache.position == len(ids) == cache.local.position
    torch.testing.assert_close(model.decode_step(cache, token), again)
    # transformers' own forward writes through the same cache protocol
    theirs = model.with_attention(fast_paths=False)
    torch.testing.assert_close(theirs.prefill(new_cache(model, 64), ids, chunk_size=8), plain, rtol=1e-4, atol=1e-4)
    with pytest.raises(InvalidRequest, match="superlinear"):
        model.with_attention("dense").prefill(new_cache(model, 64), ids)
    with pytest.raises(InvalidRequest, match="2 slices for a group of 1"):
        ContextParallel(ContextSlices((0, 10)))
