"""Continuous batching: the turns of many sequences advance together, one model step at a time.

Each live sequence (a chat turn or a completion) runs its plain, sequential engine code on a
thread of its own, but only one thread runs at any moment: the scheduler hands control to a
sequence and waits until it asks for model work (``decode`` / ``prefill`` below) or ends. So
the turn code stays a straight line and the engine's state needs no locks; the model calls are
the only points where a sequence parks. Each ``step()``:

1. decodes the next token of every sequence waiting for one, in one ``Model.decode_batch``;
2. then prefills chunks of ``max_step_tokens`` tokens of waiting prompts, round-robin, until
   the step's budget is spent (at least one chunk), so a long prompt never starves the others
   nor freezes the running streams for longer than one chunk;
3. resumes every sequence whose work is done, each until its next request.

A prompt is always cut at multiples of ``max_step_tokens`` from its start, so its numbers do
not depend on what else runs. A sequence alone (no other live sequence, nothing arriving) calls
the model directly: batch 1 pays no hand-off. Cancellation (``should_cancel``) stops a prefill
between chunks with ``Cancelled``; a decode finishes its token and the decode loop sees the
flag. Errors of one sequence's model work go to that sequence only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Prefill tokens per step by default: on CPU a step of the default model prefills ~1-2K tokens/s
# on one thread, so 256 keeps the other streams' token gap at a few hundred ms; a GPU prefills
# thousands of tokens in a few ms.
CPU_MAX_STEP_TOKENS = 256
CUDA_MAX_STEP_TOKENS = 4096

_local = threading.local()  # .seq: the Sequence whose thread this is


def default_max_step_tokens(device) -> int:
    return CUDA_MAX_STEP_TOKENS if getattr(device, "type", str(device)) == "cuda" else CPU_MAX_STEP_TOKENS


@dataclass
class _Decode:
    model: object
    cache: object
    token: int


@dataclass
class _Prefill:
    model: object
    cache: object
    ids: list[int]
    should_cancel: Callable[[], bool] | None
    on_logits: Callable | None
    chunk: int  # tokens per model call (at most the step's budget)
    done: int = 0  # tokens prefilled so far


@dataclass
class StepStats:
    """What the scheduler did, for /health and /metrics (read from any thread)."""

    steps: int = 0
    last_batch: int = 0  # sequences in the last step's decode batch
    last_prefill_tokens: int = 0
    decoding: int = 0  # live sequences waiting for a decode (running streams)
    prefilling: int = 0  # live sequences waiting for prefill chunks
    live: int = 0


class LiveSequence:
    """One live sequence: ``fn`` on its own thread, run by hand-off with the scheduler."""

    def __init__(self, scheduler: Scheduler, fn: Callable[[], None], name: str,
                 on_end: Callable[[BaseException | None], None] | None = None):
        import torch

        self.threads = torch.get_num_threads()  # torch's CPU threads are per thread: the worker's
        self.scheduler = scheduler
        self.on_end = on_end
        self.request: _Decode | _Prefill | None = None
        self.result = None
        self.error: BaseException | None = None
        self.finished = False
        self.prefilled = False  # had a prefill chunk in a step
        self.outcome: BaseException | None = None  # what ``fn`` raised
        self._go = threading.Event()
        self._back = threading.Event()
        self._fn = fn
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        _local.seq = self
        self._go.wait()
        self._go.clear()
        try:
            self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever started it
            self.outcome = exc
        finally:
            self.finished = True
            self._back.set()

    def resume(self) -> None:
        """Run the sequence until it asks for model work or ends (on the scheduler's thread)."""
        if not self._thread.is_alive() and not self.finished:
            self._thread.start()
        self._go.set()
        self._back.wait()
        self._back.clear()

    def wait(self, request):
        """On the sequence's thread: park until the scheduler did ``request``; its result."""
        self.request, self.result, self.error = request, None, None
        self._back.set()
        self._go.wait()
        self._go.clear()
        self.request = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.result

    def complete(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.request = None


class Scheduler:
    """Owned by the model's worker: ``start`` a sequence, ``step`` while any is live.
    ``arrivals()``: whether work waits to be admitted (a sequence alone then hands off)."""

    def __init__(self, max_step_tokens: int | None = None, *, arrivals: Callable[[], bool] = lambda: False,
                 on_step: Callable[[int, int, float], None] | None = None):
        if max_step_tokens is not None and max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be positive, got {max_step_tokens}")
        self.max_step_tokens = max_step_tokens  # None: default_max_step_tokens of the model's device
        self.arrivals = arrivals
        self.on_step = on_step  # (decode batch, prefill tokens, seconds) after every step
        self.live: list[LiveSequence] = []
        self.stats = StepStats()
        self._prefills: deque[LiveSequence] = deque()  # round-robin order of waiting prompts

    def step_tokens(self, model) -> int:
        return self.max_step_tokens or default_max_step_tokens(model.device)

    # -- sequences -------------------------------------------------------------------------------
    def start(self, fn: Callable[[], None], *, name: str = "spl-sequence",
              on_end: Callable[[BaseException | None], None] | None = None) -> LiveSequence:
        """Run ``fn`` as a new sequence until its first model request (or its end);
        ``on_end(error)`` when it ends."""
        seq = LiveSequence(self, fn, name, on_end)
        self.live.append(seq)
        self._run(seq)
        return seq

    def alone(self, seq: LiveSequence) -> bool:
        return len(self.live) == 1 and not self.arrivals()

    def _run(self, seq: LiveSequence) -> None:
        seq.resume()
        if seq.finished:
            self.live.remove(seq)
            if seq in self._prefills:
                self._prefills.remove(seq)
            if seq.on_end is not None:
                seq.on_end(seq.outcome)
        elif isinstance(seq.request, _Prefill) and seq not in self._prefills:
            # a prompt that never had a turn goes first: a short chat waits for no long ingest
            if seq.prefilled:
                self._prefills.append(seq)
            else:
                self._prefills.appendleft(seq)
        self._count()

    def _count(self) -> None:
        s = self.stats
        s.live = len(self.live)
        s.decoding = sum(isinstance(q.request, _Decode) for q in self.live)
        s.prefilling = len(self._prefills)

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> None:
        """Decode every waiting decode, prefill up to the token budget, resume who is done."""
        t0 = time.perf_counter()
        decodes = [s for s in self.live if isinstance(s.request, _Decode)]
        if decodes:
            self._decode(decodes)
        served, tokens = self._prefill()
        self.stats.steps += 1
        self.stats.last_batch, self.stats.last_prefill_tokens = len(decodes), tokens
        for seq in decodes + served:
            if seq.request is None:  # its work is done
                self._run(seq)
        self._count()
        if self.on_step is not None:
            self.on_step(len(decodes), tokens, time.perf_counter() - t0)

    def _decode(self, seqs: list[LiveSequence]) -> None:
        by_model: dict[int, list[LiveSequence]] = {}
        for s in seqs:
            by_model.setdefault(id(s.request.model), []).append(s)
        for group in by_model.values():
            model = group[0].request.model
            try:
                logits = model.decode_batch([s.request.cache for s in group], [s.request.token for s in group])
            except Exception:  # noqa: BLE001 - find whose token failed: one at a time, each its own error
                for s in group:
                    try:
                        s.complete(model.decode_step(s.request.cache, s.request.token))
                    except Exception as exc:  # noqa: BLE001 - that sequence's error, raised in its thread
                        s.complete(error=exc)
                continue
            for i, s in enumerate(group):
                s.complete(logits[i])

    def _prefill(self) -> tuple[list[LiveSequence], int]:
        """Chunks of waiting prompts, round-robin, up to the step's token budget."""
        from superlinear.model.model import Cancelled

        served: list[LiveSequence] = []
        used = 0
        for _ in range(len(self._prefills)):
            seq = self._prefills[0]
            req = seq.request
            budget = self.step_tokens(req.model)
            chunk = min(req.chunk, len(req.ids) - req.done)
            if used and used + chunk > budget:
                break
            self._prefills.rotate(-1)  # served: to the back of the line
            served.append(seq)
            seq.prefilled = True
            if req.should_cancel is not None and req.should_cancel():
                seq.complete(error=Cancelled(f"prefill cancelled at position {req.cache.position}"))
                self._prefills.remove(seq)
                continue
            try:
                logits = req.model.prefill(req.cache, req.ids[req.done:req.done + chunk], chunk_size=chunk,
                                           on_logits=req.on_logits)
            except Exception as exc:  # noqa: BLE001 - that sequence's error
                seq.complete(error=exc)
                self._prefills.remove(seq)
                continue
            req.done += chunk
            used += chunk
            if req.done == len(req.ids):
                seq.complete(logits)
                self._prefills.remove(seq)
        return served, used


# -- what the engine calls for model work ---------------------------------------------------------
def decode(model, cache, token_id: int):
    """``model.decode_step(cache, token_id)``, batched with the other live sequences' decodes
    when called from a scheduled sequence."""
    seq: LiveSequence | None = getattr(_local, "seq", None)
    if seq is None:
        return model.decode_step(cache, token_id)
    if seq.scheduler.alone(seq):
        seq.scheduler.stats.decoding = 1
        return model.decode_step(cache, token_id)
    cache.reserve(cache.position + 1)  # a refusal (limit, memory) is this sequence's alone
    return seq.wait(_Decode(model, cache, int(token_id)))


def prefill(model, cache, ids: Sequence[int], *, chunk_size: int | None = None,
            should_cancel: Callable[[], bool] | None = None, on_logits: Callable | None = None):
    """``model.prefill(cache, ids, ...)``; from a scheduled sequence, in chunks of the step's
    token budget that take turns with the other sequences' work."""
    from superlinear.model.model import Cancelled

    seq: LiveSequence | None = getattr(_local, "seq", None)
    if seq is None:
        return model.prefill(cache, ids, chunk_size=chunk_size, should_cancel=should_cancel, on_logits=on_logits)
    ids = list(ids)
    cache.reserve(cache.position + len(ids))
    chunk = min(chunk_size or len(ids), seq.scheduler.step_tokens(model))
    done, logits = 0, None
    stats = seq.scheduler.stats
    try:
        while done < len(ids) and seq.scheduler.alone(seq):  # nobody to share with: no hand-off
            stats.prefilling, stats.decoding = 1, 0
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"prefill cancelled at position {cache.position}")
            logits = model.prefill(cache, ids[done:done + chunk], chunk_size=chunk, on_logits=on_logits)
            done += min(chunk, len(ids) - done)
            seq.prefilled = True
    finally:
        stats.prefilling = 0
    if done == len(ids):
        return logits
    return seq.wait(_Prefill(model, cache, ids[done:], should_cancel, on_logits, chunk))
