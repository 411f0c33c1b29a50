"""A loaded model: a transformers causal LM running superlinear (or dense) attention over our cache.

``Model`` owns nothing transformers-specific beyond the module it wraps: chunked prefill,
single-token decode (captured as a CUDA graph on CUDA), caches, info and fingerprint.
``with_attention`` makes a sibling that shares the weights but runs another attention
(dense, or other span parameters): side-by-side checks and the bench load weights once.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from superlinear.errors import InvalidRequest
from superlinear.kernels import resolve_backend
from superlinear.model.attention import ForwardContext, attach
from superlinear.model.batch import BUCKETS, BatchCache, StaticRows, bound_for, bucket_for, rows_backend
from superlinear.model.cache import Cache, CacheLayout
from superlinear.model.checkpoint_meta import model_fingerprint, span_dict
from superlinear.model.hybrid import HybridForward

from . import layer_types

# Activation bytes per token and unit of hidden size in one prefill chunk (model.prefill_chunk_size).
_ACTIVATION_BYTES_PER_HIDDEN = 64
# The prefill chunk off CUDA: progress (a bar) advances once a chunk.
CPU_PREFILL_CHUNK = 2048


class Cancelled(Exception):
    """Raised by ``prefill`` between chunks when ``should_cancel()`` says so."""


@dataclass
class _Shared:
    """State shared by a model and its ``with_attention`` siblings (one set of weights)."""

    hf: torch.nn.Module
    ctx: ForwardContext
    hybrid: HybridForward | None = None  # our forward for Nemotron-H hybrids (None: transformers')
    lock: threading.RLock = field(default_factory=threading.RLock)
    graph_error: str | None = None  # set when a capture failed: decode stays eager from then on
    # batched decode steps (decode_batch): per (graph key, bucket) its static buffers and graph
    batch_steps: dict = field(default_factory=dict)
    batch_graph_error: str | None = None  # a batched capture failed: batches decode eagerly


@dataclass
class _DecodeGraph:
    graph: Any
    ids: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor


@dataclass
class _BatchStep:
    """A batched decode step for one bucket: its buffers and (on CUDA) its captured graph."""

    rows: StaticRows
    graph: Any = None
    logits: torch.Tensor | None = None


def warm_up_on_side_stream(run: Callable[[], Any], times: int = 2) -> None:
    """Call ``run`` ``times`` on a side stream before a CUDA graph captures it (PyTorch's recipe:
    the first calls compile kernels and allocate, which a capture must not see)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(times):
            run()
    torch.cuda.current_stream().wait_stream(stream)


class Model:
    def __init__(self, hf: torch.nn.Module, tokenizer, *, name: str, kind: str, layout: CacheLayout,
                 span_params, attention: str = "superlinear", routing: str = "attention query",
                 source: str = "", bytes_on_disk: int = 0, weights_hash: str = "",
                 arch_config: dict | None = None, cuda_graph: bool | None = None,
                 backend: str | None = None, fast_paths: bool = True, _shared: _Shared | None = None):
        if attention not in ("superlinear", "dense"):
            raise InvalidRequest(f"unknown attention {attention!r}: use 'superlinear' or 'dense'")
        first_load = _shared is None
        if _shared is None:
            hybrid = HybridForward(hf) if layer_types.from_config(hf.config) else None
            _shared = _Shared(hf, ForwardContext(), hybrid)
            attach(hf, _shared.ctx)
        self._shared = _shared
        # ``fast_paths=False``: transformers' own forward, the reference our hybrid path is
        # checked against (attention-only models always run transformers' forward)
        self.fast_paths = bool(fast_paths) and _shared.hybrid is not None
        self.hf = hf
        self.tokenizer = tokenizer
        self.name = name
        self.kind = kind
        self.layout = layout
        self.span_params = span_params
        self.attention = attention
        self.routing = routing
        self.source = source
        self.bytes_on_disk = bytes_on_disk
        self.weights_hash = weights_hash
        self.arch_config = arch_config or {}
        self.backend = backend
        param = next(hf.parameters())
        self.device = param.device
        self.dtype = param.dtype
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = on_cuda and (cuda_graph is None or bool(cuda_graph))
        # why a CUDA decode runs without a graph (None: it runs with one, or not on CUDA)
        self._graph_off = "cuda_graph=False" if on_cuda and not self.cuda_graph else None
        hybrid = _shared.hybrid
        if hybrid is not None and hybrid.has_moe and not (self.fast_paths and hybrid.experts.fast):
            # transformers' MoE experts loop over the experts a batch hits (host sync): not capturable.
            self.cuda_graph = False
            if on_cuda:
                self._graph_off = "the MoE experts loop syncs with the host"
        self.fingerprint = self._fingerprint()
        # transformers >= 5.20 calls it ``cache``, earlier 5.x ``past_key_values``
        params = inspect.signature(hf.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        reasons = self.slow_reasons() if first_load else []  # named once per load, not per sibling
        if reasons:
            print(f"spl: warning: {name} runs a slow fallback: {'; '.join(reasons)}", file=sys.stderr)

    # -- identity -------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        return model_fingerprint(self.arch_config, self.attention, self.span_params, self.routing, self.weights_hash)

    @property
    def has_recurrent_state(self) -> bool:
        return bool(self.layout.mamba_layers)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    def kv_bytes_per_token(self) -> int:
        """KV bytes one cached token holds in this model's caches (the session budget's unit)."""
        return int(self.layout.kv_bytes_per_token(self.dtype))

    @property
    def window(self) -> int:
        return int(self.span_params.window_len) if self.span_params is not None else 0

    def layer_types(self) -> list[str]:
        cfg = self.hf.config
        return layer_types.from_config(cfg) or [layer_types.ATTENTION] * cfg.num_hidden_layers

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for p in self.hf.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel()
        return total

    def info(self) -> dict:
        counts: dict[str, int] = {}
        for t in self.layer_types():
            counts[t] = counts.get(t, 0) + 1
        attention = {"mode": self.attention, "routing_query": self.routing}
        if self.span_params is not None:
            attention.update(span_dict(self.span_params))
            attention["window"] = self.window
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "parameters": self.num_parameters(),
            "bytes_on_disk": self.bytes_on_disk,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "attention": attention,
            "kv_bytes_per_token": self.layout.kv_bytes_per_token(self.dtype),
            "recurrent_bytes_per_sequence": self.layout.recurrent_bytes(self.dtype),
            "layers": len(self.layer_types()),
            "layer_types": counts,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": int(getattr(self.hf.config, "max_position_embeddings", 0) or 0),
            "cuda_graph": self.cuda_graph and self._shared.graph_error is None,
            "cuda_graph_error": self._shared.graph_error,
            "batch_graph_error": self._shared.batch_graph_error,  # decode_batch's bucket graphs
            **self.forward_info(),
            "fingerprint": self.fingerprint,
        }

    def slow_reasons(self) -> list[str]:
        """The slow fallbacks this model takes on its device, each with its reason (empty: every
        fast path its device offers is in use)."""
        hybrid = self._shared.hybrid
        reasons = []
        if hybrid is not None:
            reasons += hybrid.slow_reasons() if self.fast_paths else [
                "transformers' forward (fast_paths=False): MoE experts loop, Mamba-2 on PyTorch"]
        if self.device.type == "cuda":
            if self.attention == "superlinear" and resolve_backend(self.backend, self.device) != "triton":
                reasons.append("superlinear attention on the PyTorch reference kernels (Triton not installed, "
                               "or backend / SPL_ATTENTION_BACKEND=reference)")
            if self._shared.graph_error is not None:
                reasons.append(f"decode without CUDA graph: the capture failed ({self._shared.graph_error})")
            elif self._graph_off is not None:
                reasons.append(f"decode without CUDA graph ({self._graph_off})")
        return reasons

    def forward_info(self) -> dict:
        """``forward``: ``fast`` or ``fallback``, ``forward_reason`` (None when fast) and the path
        each part takes (``forward_paths``): for ``spl models info`` and the bench JSON."""
        reasons = self.slow_reasons()
        paths = self._shared.hybrid.info() if self.fast_paths else {"model": "transformers' forward"}
        if self.device.type == "cuda":
            paths["decode"] = "CUDA graph" if self.cuda_graph and self._shared.graph_error is None else "eager"
            paths["decode_batch"] = "CUDA graph per batch-size bucket" if self._static_rows() else "eager"
        return {"forward": "fallback" if reasons else "fast", "forward_reason": "; ".join(reasons) or None,
                "forward_paths": paths}

    def with_attention(self, attention: str | None = None, span_params=None,
                       cuda_graph: bool | None = None, fast_paths: bool | None = None) -> Model:
        """A sibling sharing the weights, with another attention mode, span parameters, graph
        setting or forward (``fast_paths``)."""
        return Model(self.hf, self.tokenizer, name=self.name, kind=self.kind, layout=self.layout,
                     span_params=span_params if span_params is not None else self.span_params,
                     attention=attention or self.attention, routing=self.routing, source=self.source,
                     bytes_on_disk=self.bytes_on_disk, weights_hash=self.weights_hash,
                     arch_config=self.arch_config,
                     cuda_graph=self.cuda_graph if cuda_graph is None else cuda_graph,
                     backend=self.backend, fast_paths=self.fast_paths if fast_paths is None else fast_paths,
                     _shared=self._shared)

    def chat_token_ids(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of ``messages`` rendered with the tokenizer's chat template."""
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, **kwargs)
        if hasattr(out, "keys") and "input_ids" in out:
            out = out["input_ids"]
        if hasattr(out, "tolist"):
            out = out.tolist()
        if out and isinstance(out[0], list):
            out = out[0]
        return [int(t) for t in out]

    # -- caches ---------------------------------------------------------------------------------
    def new_cache(self, max_seq_len: int) -> Cache:
        if max_seq_len < 1:
            raise InvalidRequest(f"max_seq_len must be positive, got {max_seq_len}")
        return Cache(self.layout, max_seq_len, self.device, self.dtype)

    def cache_from_state(self, tensors: dict[str, torch.Tensor], position: int, max_seq_len: int) -> Cache:
        cache = self.new_cache(max(int(max_seq_len), int(position)))
        cache.load_state_tensors(tensors, position)
        return cache

    # -- compute --------------------------------------------------------------------------------
    def _set_ctx(self, start: int, length: int, positions: torch.Tensor, graph: bool, batch=None) -> None:
        ctx = self._shared.ctx
        ctx.mode, ctx.params, ctx.backend = self.attention, self.span_params, self.backend
        ctx.start, ctx.length, ctx.positions, ctx.graph, ctx.batch = start, length, positions, graph, batch

    def _forward(self, cache: Cache, ids: torch.Tensor, start: int, every: bool = False) -> torch.Tensor:
        """Logits ``[V]`` of the last token of ``ids``, or ``[T, V]`` of every token (``every``)."""
        length = ids.shape[1]
        positions = torch.arange(start, start + length, device=self.device)
        self._set_ctx(start, length, positions, graph=False)
        cache.begin_forward(start, length)
        logits = self._run(ids, positions, cache, keep=0 if every else 1)[0].float()
        return logits if every else logits[-1]

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, cache: Cache, keep: int = 1) -> torch.Tensor:
        """One forward of ``ids [1, T]`` at ``positions``: logits ``[1, keep, V]`` of the last
        ``keep`` tokens (0: all)."""
        self._shared.ctx.partition = cache.partition
        if self.fast_paths:
            return self._shared.hybrid(ids, cache, keep=keep)
        return self.hf(input_ids=ids, position_ids=positions[None], use_cache=True, logits_to_keep=keep,
                       **{self._cache_kw: cache}).logits

    def prefill_chunk_size(self) -> int:
        """The prefill chunk for throughput: on CUDA the largest of 32K/16K/8K tokens whose
        activations (estimated at ``_ACTIVATION_BYTES_PER_HIDDEN`` bytes per token and hidden
        unit, an upper bound of the measured peaks in docs/benchmarks.md) take at most half the
        free memory; 2K elsewhere: a CPU chunk is seconds long, progress is reported after each,
        and 2K prefills as fast as 8K there (docs/benchmarks.md)."""
        if self.device.type != "cuda":
            return CPU_PREFILL_CHUNK
        free, _ = torch.cuda.mem_get_info(self.device)
        per_token = _ACTIVATION_BYTES_PER_HIDDEN * int(self.hf.config.hidden_size)
        for chunk in (32768, 16384, 8192):
            if chunk * per_token <= free // 2:
                return chunk
        return 4096

    @torch.inference_mode()
    def prefill(self, cache: Cache, token_ids: Sequence[int] | torch.Tensor, chunk_size: int | None = None,
                should_cancel: Callable[[], bool] | None = None,
                on_logits: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Append ``token_ids`` to the cache in chunks (``prefill_chunk_size()`` by default);
        fp32 logits ``[V]`` of the last token. ``on_logits`` gets every chunk's logits ``[T, V]``
        (every token's, as a prompt's log-likelihood needs: pick a chunk small enough for
        ``T * V`` floats)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise InvalidRequest("prefill needs at least one token")
        if chunk_size is None:
            chunk_size = self.prefill_chunk_size()
        if chunk_size < 1:
            raise InvalidRequest(f"chunk_size must be positive, got {chunk_size}")
        cache.reserve(cache.position + ids.numel())  # the limit, then the memory
        ids = ids.to(self.device)
        logits = None
        total = ids.numel()
        with self._shared.lock:
            for begin in range(0, total, chunk_size):
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"prefill cancelled at position {cache.position}")
                chunk = ids[begin:begin + chunk_size][None]
                logits = self._forward(cache, chunk, cache.position, every=on_logits is not None)
                if on_logits is not None:
                    on_logits(logits)
                    logits = logits[-1]
                cache.position += chunk.shape[1]
        return logits

    @torch.inference_mode()
    def decode_step(self, cache: Cache, token_id: int) -> torch.Tensor:
        """Append one token; fp32 logits ``[V]`` of it."""
        cache.reserve(cache.position + 1)
        with self._shared.lock:
            if self.cuda_graph and self._shared.graph_error is None:
                logits = self._decode_graphed(cache, int(token_id))
                if logits is not None:
                    cache.position += 1
                    return logits
            ids = torch.tensor([[int(token_id)]], dtype=torch.long, device=self.device)
            logits = self._forward(cache, ids, cache.position)
            cache.position += 1
            return logits

    @torch.inference_mode()
    def decode_batch(self, caches: Sequence[Cache], token_ids: Sequence[int], *,
                     graph: bool | None = None) -> torch.Tensor:
        """Append one token to each cache (``token_ids[b]`` to ``caches[b]``; each session its own
        cache, of any length); fp32 logits ``[B, V]``, row b what ``decode_step(caches[b],
        token_ids[b])`` returns. Every weight is read once for the B rows; attention and the
        recurrent state are per sequence (``superlinear.model.batch``). One row is ``decode_step``
        (its CUDA graph). ``graph``: None = a CUDA graph per batch-size bucket where decode runs
        graphs (superlinear attention on Triton); True = the static tables a graph captures (run
        eagerly off CUDA: tests, under the Triton interpreter; superlinear attention only);
        False = eager. If it raises, no cache has advanced (the recurrent states are written back
        only after a step's forward; its keys at the positions are rewritten by the next step),
        except, above 64 rows, the caches of the slices of 64 before the failing one."""
        caches, ids = list(caches), [int(t) for t in token_ids]
        if len(caches) != len(ids):
            raise InvalidRequest(f"decode_batch needs one token per cache, got {len(caches)} caches and "
                                 f"{len(ids)} tokens")
        if len({id(c) for c in caches}) != len(caches):
            raise InvalidRequest("decode_batch got the same cache twice: one token per sequence and step")
        if not caches:
            return torch.empty((0, self.vocab_size), dtype=torch.float32, device=self.device)
        if len(caches) == 1 and graph is not True:
            return self.decode_step(caches[0], ids[0])[None]
        if not self._batches(caches):  # a forward that runs one sequence: a step each
            return torch.stack([self.decode_step(c, t) for c, t in zip(caches, ids, strict=True)])
        for cache in caches:
            cache.reserve(cache.position + 1)
        # the static tables serve the superlinear kernels only (dense attention runs per row)
        static = self._static_rows() if graph is None else bool(graph) and self.attention == "superlinear"
        out = []
        with self._shared.lock:
            for begin in range(0, len(caches), BUCKETS[-1]):
                part, part_ids = caches[begin:begin + BUCKETS[-1]], ids[begin:begin + BUCKETS[-1]]
                logits = self._decode_static(part, part_ids) if static else None
                if logits is None:
                    logits = self._decode_rows(part, part_ids)
                for cache in part:
                    cache.position += 1
                out.append(logits)
        return torch.cat(out)

    def batch_steps(self) -> list[dict]:
        """The batched decode steps built so far (one per bucket): ``bucket``, ``bound`` (the
        largest cache capacity its tables serve) and ``graph`` (captured as a CUDA graph)."""
        return sorted(({"bucket": s.rows.bucket, "bound": s.rows.bound, "graph": s.graph is not None}
                       for s in self._shared.batch_steps.values()), key=lambda s: s["bucket"])

    def _batches(self, caches: list[Cache]) -> bool:
        """Whether this forward runs B sequences in one pass: ours for hybrids, transformers'
        for the attention-only (llama-family) models, over plain caches of this model."""
        forward_ok = self.fast_paths or self._shared.hybrid is None
        return forward_ok and all(type(c) is Cache and c.layout == self.layout for c in caches)

    def _static_rows(self) -> bool:
        return (self.cuda_graph and self._shared.batch_graph_error is None and self.attention == "superlinear"
                and rows_backend(self.backend, self.device, self.attention) == "triton")

    def _run_rows(self, batch: BatchCache, ids: torch.Tensor) -> torch.Tensor:
        """One forward of ``ids [B, 1]``, row b at ``batch.positions[b]``: logits ``[B, 1, V]``."""
        self._set_ctx(0, 1, batch.positions, graph=False, batch=batch)
        self._shared.ctx.partition = None
        try:
            if self.fast_paths:
                return self._shared.hybrid(ids, batch)
            return self.hf(input_ids=ids, position_ids=batch.positions[:, None], use_cache=True, logits_to_keep=1,
                           **{self._cache_kw: batch}).logits
        finally:
            self._shared.ctx.batch = None

    def _decode_rows(self, caches: list[Cache], ids: list[int]) -> torch.Tensor:
        batch = BatchCache.rows(caches, rows_backend(self.backend, self.device, self.attention))
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)[:, None]
        logits = self._run_rows(batch, tokens)[:, -1].float()
        batch.scatter()
        return logits

    def _decode_static(self, caches: list[Cache], ids: list[int]) -> torch.Tensor | None:
        """The step on a bucket's static buffers, replayed as a CUDA graph on CUDA (None: the
        capture failed; the caller decodes eagerly)."""
        bucket = bucket_for(len(caches))
        key = (self._graph_key(), bucket)
        step = self._shared.batch_steps.get(key)
        if step is None or not step.rows.fits(caches):
            # a larger bound replaces the bucket's old step (graph and pool freed first)
            self._shared.batch_steps.pop(key, None)
            bound = bound_for(max(c.capacity for c in caches))
            step = _BatchStep(StaticRows(self.layout, bucket, bound, self.device, self.dtype))
            if self.device.type == "cuda":
                try:
                    self._capture_rows(step, caches, ids)
                except Exception as exc:  # an optimisation: fall back to eager batched decode
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    print(f"spl: warning: CUDA graph capture of a batched step failed ({reason}); "
                          "decoding batches without graphs", file=sys.stderr)
                    self._shared.batch_graph_error = reason
                    torch.cuda.synchronize()
                    return None
            self._shared.batch_steps[key] = step
        batch = step.rows.load(caches, ids)
        if step.graph is not None:
            self._set_ctx(0, 1, batch.positions, graph=True)
            step.graph.replay()
            logits = step.logits
        else:
            logits = self._run_rows(batch, step.rows.ids)
        step.rows.store(caches)
        return logits[:len(caches), -1].float().clone()

    def _capture_rows(self, step: _BatchStep, caches: list[Cache], ids: list[int]) -> None:
        """Capture the bucket's step: two warm-up runs on a side stream (they write this step's
        keys, which the real step rewrites, and step only the static recurrent buffers), then
        the graph."""
        warm_up_on_side_stream(lambda: self._run_rows(step.rows.load(caches, ids), step.rows.ids))
        batch = step.rows.load(caches, ids)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step.logits = self._run_rows(batch, step.rows.ids)
        step.graph = graph

    # -- CUDA graph decode ----------------------------------------------------------------------
    def _graph_key(self) -> tuple:
        return (self.attention, repr(self.span_params), self.backend, self.fast_paths)

    def _decode_graphed(self, cache: Cache, token_id: int) -> torch.Tensor | None:
        graphs = cache.decode_graphs
        entry = graphs.get(self._graph_key())
        if entry is None:
            try:
                entry = self._capture(cache)
            except Exception as exc:  # capture is an optimisation: fall back to eager decode
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"spl: warning: CUDA graph capture failed ({reason}); decoding without graphs",
                      file=sys.stderr)
                self._shared.graph_error = reason
                torch.cuda.synchronize()
                return None
            graphs[self._graph_key()] = entry
        entry.ids.fill_(token_id)
        entry.pos.fill_(cache.position)
        self._set_ctx(0, 1, entry.pos, graph=True)
        entry.graph.replay()
        return entry.logits[0, -1].float().clone()

    def _capture(self, cache: Cache) -> _DecodeGraph:
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        pos = torch.full((1,), cache.position, dtype=torch.long, device=self.device)
        saved = cache.recurrent_state() if cache.has_recurrent_state else None

        def run():
            self._set_ctx(0, 1, pos, graph=True)
            cache.begin_forward(0, 1, write_index=pos)
            try:
                return self._run(ids, pos, cache)
            finally:
                cache.begin_forward(0, 0)

        try:
            warm_up_on_side_stream(run)
            graph = torch.cuda.CUDAGraph()
            # each graph gets its own memory pool: a pool shared with graphs that were freed
            # (their cache was dropped) trips the caching allocator
            with torch.cuda.graph(graph):
                logits = run()
        finally:
            if saved is not None:  # the warm-up steps advanced the recurrent state: put it back
                cache.load_recurrent_state(saved)
        return _DecodeGraph(graph, ids, pos, logits)
