"""``spl bench generate --batch 1,8``: B sessions of one context length decoding together
(``Model.decode_batch``: one forward per step for all B), aggregate and per-stream tokens/s.

Each session gets its own prompt (the bench's ids rotated), its own cache and prefill; then
two untimed batched steps (they compile, and capture the bucket's CUDA graph on CUDA) and
``--decode-tokens`` timed ones, greedy. ``--probe`` prefills only each session's last chunk over
a zeroed cache of the full length, as the single-session bench does. torch is imported only
when the command runs.
"""

from __future__ import annotations

import time

from superlinear.plugins.bench.lengths import case_error, fmt_length


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device) -> None:
    """After a case, its caches dropped: their memory goes back to CUDA and the peak count starts
    again, so the next case's ``peak_gib`` is its own."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def probe_tail(cache, ids, length: int, room: int, chunk_size: int):
    """``--probe``: the cache holds ``length + room`` tokens at once and stands where the last
    chunk of ``ids`` begins (the keys before it zeroed); returns that chunk, the part to prefill."""
    cache.reserve(length + room, exact=True)
    tail = ids[max(0, length - chunk_size):]
    cache.position = length - len(tail)
    return tail


def _sessions(model, ids, count: int, length: int, command, chunk_size: int):
    """``count`` prefilled caches (each its own rotation of ``ids``), their first tokens, seconds."""
    import torch

    caches, first = [], []
    sync(model.device)
    start = time.perf_counter()
    for b in range(count):
        cache = model.new_cache(length + command.decode_tokens + 4)
        prompt = torch.roll(ids, shifts=b * 7919)
        if command.probe:
            prompt = probe_tail(cache, prompt, length, command.decode_tokens + 4, chunk_size)
        first.append(int(model.prefill(cache, prompt, chunk_size=chunk_size).argmax()))
        caches.append(cache)
    sync(model.device)
    return caches, first, time.perf_counter() - start


def batch_rows(model, ids, length: int, attention: str, command, chunk_size: int) -> list[dict]:
    """One row per batch size of ``command.batches``: decode tok/s of all streams together
    (``decode_tok_s``) and of one stream (``decode_stream_tok_s``)."""
    import torch

    on_cuda = model.device.type == "cuda"
    rows = []
    for count in command.batches:
        row = {"length": length, "attention": attention, "batch": count}
        if command.probe:
            row["probe"] = True
        caches = []
        try:
            caches, tokens, row["prefill_s"] = _sessions(model, ids, count, length, command, chunk_size)
            row["cache_bytes"] = sum(c.nbytes() for c in caches)
            for _ in range(2):  # compile and capture: not timed
                tokens = model.decode_batch(caches, tokens).argmax(-1).tolist()
            sync(model.device)
            start = time.perf_counter()
            for _ in range(command.decode_tokens):
                tokens = model.decode_batch(caches, tokens).argmax(-1).tolist()
            sync(model.device)
            seconds = time.perf_counter() - start
            row["decode_stream_tok_s"] = command.decode_tokens / seconds
            row["decode_tok_s"] = count * command.decode_tokens / seconds
            row["decode_path"] = _path(model, count)
            if on_cuda:
                row["peak_gib"] = torch.cuda.max_memory_allocated(model.device) / 2**30
        except Exception as exc:  # one failing case (e.g. out of memory) must not end the run
            row["error"] = case_error(exc)
        finally:
            del caches
            release(model.device)
        rows.append(row)
    one = next((r.get("decode_tok_s") for r in rows if r["batch"] == 1), None)
    for r in rows:
        if one and r.get("decode_tok_s"):
            r["speedup_vs_one_stream"] = r["decode_tok_s"] / one
    return rows


def _path(model, count: int) -> str:
    """How the steps ran: one row is ``decode_step`` (its CUDA graph), more the bucket graphs."""
    if model.device.type != "cuda":
        return "eager"
    paths = model.info()["forward_paths"]
    return paths.get("decode" if count == 1 else "decode_batch", "eager")


def markdown_rows(rows: list[dict]) -> list[str]:
    lines = ["| context | attention | sessions | decode tok/s (all) | per stream | × one stream | path | "
             "prefill s (all) | cache | peak GPU memory |",
             "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        probe = " (probe)" if r.get("probe") else ""
        head = f"| {fmt_length(r['length'])}{probe} | {r['attention']} | {r['batch']} |"
        if r.get("error") or r.get("skipped"):
            lines.append(f"{head} {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        speedup = r.get("speedup_vs_one_stream")
        cache, peak = r.get("cache_bytes"), r.get("peak_gib")
        lines.append(f"{head} {r['decode_tok_s']:,.1f} | {r['decode_stream_tok_s']:,.1f} | "
                     f"{'-' if speedup is None else f'{speedup:.2f}'} | {r['decode_path']} | {r['prefill_s']:.1f} | "
                     f"{'-' if cache is None else f'{cache / 2**30:.2f} GiB'} | "
                     f"{'-' if peak is None else f'{peak:.1f} GiB'} |")
    return lines
