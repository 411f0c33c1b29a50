"""``spl bench generate``: prefill and decode tokens/s of a loaded model at several context
lengths, superlinear against dense attention in the same run (one set of weights).

For each length L and attention: a cache of L + decode tokens, a chunked prefill of L tokens
(timed), then ``--decode-tokens`` greedy decode steps timed twice from the same position: as
replays of the captured CUDA graph (CUDA only) and as eager steps. Dense attention is skipped
above ``--dense-max-len`` (it is O(L^2)). torch is imported only when the command runs.

``--world-size N`` (under ``torchrun --nproc-per-node N``) splits the session's context over N
ranks (``superlinear.distributed``): every number is the session's, the memory the largest of
one rank's. ``--probe`` does not prefill the L tokens: it allocates the cache for L and times one
prefill chunk and the decode steps at depth L over zeroed keys, which measures what fits and the
speed per step at depths a full prefill cannot reach within one run.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import click

from superlinear.bus import Context
from superlinear.output import emit
from superlinear.plugins.bench.batch_decode import batch_rows, markdown_rows, probe_tail, release, sync
from superlinear.plugins.bench.lengths import (
    ModelCases,
    case_error,
    exit_on_failed_cases,
    fmt_length,
    parse_length,
)
from superlinear.plugins.bench.provenance import provenance, provenance_line
from superlinear.plugins.bench.ranks import Ranks


@dataclass(frozen=True)
class BenchGenerate(ModelCases):
    decode_tokens: int = 32
    graph: bool = True
    world_size: int = 1
    probe: bool = False
    batches: tuple[int, ...] = ()  # --batch: sessions decoding together (bench.batch_decode)


def _decode(model, cache, first_token: int, n: int, graph: bool) -> tuple[float, int]:
    """Time ``n`` greedy steps; returns (seconds, last token). The first graph step captures and
    is not timed."""
    import torch

    variant = model.with_attention(cuda_graph=graph)
    token = first_token
    if graph and variant.info()["cuda_graph"]:
        token = int(variant.decode_step(cache, token).argmax())
        n -= 1
    sync(model.device)
    start = time.perf_counter()
    for _ in range(n):
        token = int(torch.argmax(variant.decode_step(cache, token)))
    sync(model.device)
    return time.perf_counter() - start, n


def _warm_up(model, ids, chunk_size: int, ranks: Ranks) -> None:
    """Compile every kernel the timed run uses: a full chunk and a partial one (Triton compiles
    and autotunes per shape), then capture the decode graph."""
    cache = ranks.new_cache(model, len(ids) + 4)
    logits = model.prefill(cache, ids, chunk_size=min(chunk_size, max(1, len(ids) - 1)))
    for _ in range(2):
        logits = model.decode_step(cache, int(logits.argmax()))
    sync(model.device)


def run_bench(command: BenchGenerate, ctx: Context | None = None) -> dict:
    import torch

    from superlinear.errors import TooLarge
    from superlinear.model import load_model
    from superlinear.pluginloader import model_loaders

    ranks = Ranks(command.world_size, command.device)
    start = time.perf_counter()
    base = load_model(command.model, device=ranks.device, dtype=command.dtype, loaders=model_loaders())
    load_s = time.perf_counter() - start
    on_cuda = base.device.type == "cuda"
    lengths = command.lengths or ((4096, 32768, 131072, 1 << 20) if on_cuda else (512, 2048, 4096))
    generator = torch.Generator().manual_seed(0)
    vocab = int(base.hf.config.vocab_size)
    chunk_size = command.chunk_size or base.prefill_chunk_size()
    rows = []
    warmed: set = set()

    def warm(model, attention: str, ids, length: int) -> None:
        """Compile the kernels and capture once per attention and device, untimed."""
        if (attention, model.device.type) not in warmed:
            _warm_up(model, ids[:min(length, max(2 * model.window, chunk_size) + 512)], chunk_size, ranks)
            warmed.add((attention, model.device.type))

    for length in lengths:
        ids = torch.randint(min(1000, vocab // 2), vocab - 1, (length,), generator=generator)
        for attention in command.attentions:
            if attention == "dense" and length > command.dense_max_len:
                rows.append({"length": length, "attention": attention, "skipped": "above --dense-max-len"})
                continue
            if attention == "dense" and ranks.split:
                rows.append({"length": length, "attention": attention, "skipped": "one rank only"})
                continue
            model = ranks.variant(base, attention)
            if command.batches:
                warm(model, attention, ids, length)
                rows.extend(batch_rows(model, ids, length, attention, command, chunk_size))
                continue
            row = {"length": length, "attention": attention}
            cache = None
            try:
                warm(model, attention, ids, length)
                cache = ranks.new_cache(model, length + command.decode_tokens + 2)
                timed = ids
                if command.probe:  # the last chunk only, at its depth, over the (zeroed) cache
                    timed = probe_tail(cache, ids, length, command.decode_tokens + 2, chunk_size)
                    row["probe"] = True
                sync(model.device)
                ranks.barrier()
                t0 = time.perf_counter()
                logits = model.prefill(cache, timed, chunk_size=chunk_size)
                sync(model.device)
                row["prefill_s"] = ranks.max(time.perf_counter() - t0)
                row["prefill_tok_s"] = len(timed) / row["prefill_s"]
                row["cache_bytes"] = ranks.sum(cache.nbytes())  # allocated by the prefill (lazily)
                first = int(logits.argmax())
                saved = cache.recurrent_state() if cache.has_recurrent_state else None
                modes = [("eager", False)]
                if on_cuda and command.graph and model.info()["cuda_graph"]:
                    modes.insert(0, ("graph", True))
                for label, graph in modes:
                    cache.truncate(length, recurrent_state=saved)
                    seconds, steps = _decode(model, cache, first, command.decode_tokens, graph)
                    seconds = ranks.max(seconds)
                    row[f"decode_{label}_tok_s"] = steps / seconds if seconds > 0 else float("nan")
                if on_cuda:
                    row["peak_gib"] = ranks.max(torch.cuda.max_memory_allocated(model.device) / 2**30)
            except Exception as exc:  # one failing case (e.g. out of memory) must not end the run
                if ranks.split and not isinstance(exc, TooLarge):
                    raise  # the ranks no longer run the same steps: end the run (torchrun stops them all)
                row["error"] = case_error(exc)
            finally:
                del cache
                release(model.device)
            rows.append(row)
    device_name = torch.cuda.get_device_name(base.device) if on_cuda else (platform.processor() or "cpu")
    info = base.info()
    return {
        **provenance(base.device),
        "model": base.name,
        "device": f"{base.device} ({device_name}, {torch.get_num_threads()} threads)" if not on_cuda
        else f"{base.device} ({device_name})",
        "dtype": str(base.dtype).replace("torch.", ""),
        "load_s": load_s,
        "window": base.window,
        "span_params": info["attention"],
        "chunk_size": chunk_size,
        "forward": info["forward"],
        "forward_reason": info["forward_reason"],
        "forward_paths": info["forward_paths"],
        "parameters": base.num_parameters(),
        "decode_tokens": command.decode_tokens,
        "world_size": ranks.world_size,
        "rank": ranks.rank,
        "cuda_graph_error": info["cuda_graph_error"],
        "batch_graph_error": info.get("batch_graph_error"),
        "rows": rows,
    }


def _f(value, fmt="{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(result: dict) -> str:
    world = result.get("world_size", 1)
    lines = [
        f"{result['date']} · model `{result['model']}` · {result['device']}"
        f"{f' × {world} ranks (context split)' if world > 1 else ''} · {result['dtype']} · "
        f"window {result['window']} · chunk {result['chunk_size']} · {result['decode_tokens']} decode "
        f"tokens · load {result['load_s']:.2f} s",
        f"{provenance_line(result)} · forward {result.get('forward')}"
        + (f" ({result['forward_reason']})" if result.get("forward_reason") else ""),
        "",
    ]
    if any("batch" in r for r in result["rows"]):
        return "\n".join(lines + markdown_rows(result["rows"]))
    lines += [
        "| context | attention | prefill tok/s | prefill s | decode tok/s (CUDA graph) | decode tok/s (eager) "
        "| cache | peak GPU memory |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        note = r.get("skipped") or r.get("error")
        if note:
            lines.append(f"| {fmt_length(r['length'])} | {r['attention']} | {note} | | | | | |")
            continue
        cache = r.get("cache_bytes")
        probe = " (probe: last chunk)" if r.get("probe") else ""
        lines.append(
            f"| {fmt_length(r['length'])}{probe} | {r['attention']} | {_f(r.get('prefill_tok_s'))} | "
            f"{_f(r.get('prefill_s'), '{:.2f}')} | {_f(r.get('decode_graph_tok_s'), '{:.1f}')} | "
            f"{_f(r.get('decode_eager_tok_s'), '{:.1f}')} | "
            f"{'-' if cache is None else f'{cache / 2**30:.2f} GiB'} | "
            f"{_f(r.get('peak_gib'), '{:.1f} GiB')} |")
    return "\n".join(lines)


@click.command("generate")
@click.option("--model", default="default", show_default=True,
              help="A model spec; random:default or random:superlinear-exp-30b build a shipped shape with "
                   "random weights on the device (no weights needed).")
@click.option("--device", default=None, help="cpu / cuda (default: cuda if available).")
@click.option("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on CUDA, fp32 on CPU).")
@click.option("--lengths", default=None,
              help="Comma-separated context lengths, e.g. 4K,32K,1M (default: 512,2K,4K on CPU; "
                   "4K,32K,128K,1M on CUDA).")
@click.option("--attention", "attentions", default="superlinear,dense", show_default=True,
              help="Attentions to run, comma-separated: superlinear, dense (plain causal).")
@click.option("--chunk-size", default=None, type=int,
              help="Prefill chunk (default: the model's choice for throughput: 32K on a GPU where memory allows).")
@click.option("--decode-tokens", default=32, show_default=True, type=int,
              help="Tokens decoded after each prefill (the decode rate's sample).")
@click.option("--dense-max-len", default="128K", show_default=True, help="Skip dense attention above this.")
@click.option("--no-graph", is_flag=True, help="Do not time CUDA-graph decode (eager only).")
@click.option("--world-size", default=1, show_default=True, type=int,
              help="Split the context over this many ranks; run under torchrun --nproc-per-node N.")
@click.option("--probe", is_flag=True,
              help="Allocate the cache for each length and time only its last chunk and the decode there.")
@click.option("--batch", "batches", default=None,
              help="Comma-separated session counts, e.g. 1,8: that many sessions of each length decode "
                   "together (one forward per step); aggregate and per-stream decode tok/s.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def command(model, device, dtype, lengths, attentions, chunk_size, decode_tokens, dense_max_len, no_graph,
            world_size, probe, batches, as_json) -> None:
    """Prefill and decode tokens/s at several context lengths, superlinear vs dense."""
    parsed = tuple(parse_length(x) for x in lengths.split(",")) if lengths else ()
    counts = _batch_counts(batches) if batches else ()
    if counts and world_size > 1:
        raise click.UsageError("--batch runs on one rank (--world-size 1)")
    result = run_bench(BenchGenerate(model=model, device=device, dtype=dtype, lengths=parsed,
                                    attentions=tuple(a.strip() for a in attentions.split(",") if a.strip()),
                                    chunk_size=chunk_size, decode_tokens=max(2, decode_tokens),
                                    dense_max_len=parse_length(dense_max_len), graph=not no_graph,
                                    world_size=world_size, probe=probe, batches=counts))
    if result.get("rank", 0) == 0:
        emit(result, as_json, markdown)
    exit_on_failed_cases(result["rows"])


def _batch_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: comma-separated session counts, e.g. 1,8", param_hint="--batch") from None
    if not counts or any(not 1 <= n <= 1024 for n in counts):
        raise click.BadParameter(f"{text!r}: each count between 1 and 1024", param_hint="--batch")
    return counts
