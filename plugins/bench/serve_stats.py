"""What ``spl bench serve`` reports for a set of requests: latency distributions (mean, p50, p90,
p99), throughput over the wall time they took, token counts and errors; and the markdown table.

Percentiles are numpy's linear interpolation (as vLLM's benchmark computes them). Throughput is
over the span from the first request's send to the last one's end, counting the tokens the
server says it produced (its usage), not the tokens asked for.
"""

from __future__ import annotations

from collections.abc import Iterable

from superlinear.plugins.bench.serve_request import RequestResult

PERCENTILES = (50, 90, 99)
MAX_ERROR_MESSAGES = 5


def distribution(values: Iterable[float]) -> dict:
    import numpy as np

    data = np.asarray([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return {"n": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"n": int(data.size), "mean": float(data.mean()),
            **{f"p{p}": float(np.percentile(data, p)) for p in PERCENTILES}}


def summarize(results: list[RequestResult]) -> dict:
    """Counts, token totals, throughput and the TTFT / TPOT / ITL / end-to-end distributions of
    ``results`` (failed requests count as errors only)."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    messages: list[str] = []
    for r in failed:
        if r.error not in messages and len(messages) < MAX_ERROR_MESSAGES:
            messages.append(r.error)
    span = 0.0
    if results:
        ends = [r.ended for r in results if r.ended is not None]
        span = max(ends) - min(r.started for r in results) if ends else 0.0
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens or 0 for r in done)
    cached = sum(r.cached_tokens or 0 for r in done)
    out = {
        "requests": len(results), "completed": len(done), "errors": len(failed), "error_messages": messages,
        "duration_s": span,
        "request_throughput": len(done) / span if span > 0 else None,
        "output_throughput": output / span if span > 0 else None,
        "total_token_throughput": (prompt + output) / span if span > 0 else None,
        "prompt_tokens": {"asked_mean": _mean(r.prompt_tokens_asked for r in done),
                          "mean": _mean(r.prompt_tokens for r in done if r.prompt_tokens is not None),
                          "total": prompt, "cached": cached, "new": prompt - cached},
        "output_tokens": {"asked_total": sum(r.output_tokens_asked for r in done), "total": output,
                          "mean": _mean(r.output_tokens for r in done),
                          "short": sum(r.output_tokens < r.output_tokens_asked for r in done),
                          "counted": sorted({r.counted for r in done})},
        "ttft_s": distribution(r.ttft for r in done),
        "tpot_s": distribution(r.tpot for r in done),
        "itl_s": distribution(gap for r in done for gap in r.itl),
        "e2e_s": distribution(r.latency for r in done),
        "server_queued_s": distribution(r.server_queued_s for r in done),
    }
    return out


def _mean(values: Iterable[float]) -> float | None:
    data = list(values)
    return sum(data) / len(data) if data else None


def add_ratios(levels: list[dict]) -> None:
    """``ratio_to_c1``: each level's output token throughput over the concurrency-1 level's of
    the same run (None where the run has none, and for the chats beside a long prefill: their
    throughput is not what the level scales)."""
    plain = [lv for lv in levels if not lv.get("long")]
    base = next((lv for lv in plain if lv.get("concurrency") == 1 and lv.get("output_throughput")), None)
    for level in levels:
        value = level.get("output_throughput")
        ok = base is not None and value is not None and level in plain
        level["ratio_to_c1"] = value / base["output_throughput"] if ok else None


def _ms(dist: dict) -> str:
    if not dist or dist.get("n", 0) == 0:
        return "-"
    return " / ".join(f"{dist[f'p{p}'] * 1000:,.0f}" for p in PERCENTILES)


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(result: dict) -> str:
    from superlinear.plugins.bench.provenance import provenance_line

    s = result["settings"]
    shape = f"prompts {s['prompt_tokens']} tok, outputs {s['output_tokens']} tok"
    if s.get("mix") == "long-prefill":
        shape += f", one long prompt of {s['long_prompt_tokens']} tok (+{s['long_output_tokens']} out) per level"
    if s.get("sessions"):
        shape += f", sessions of {s['turns']} turns"
    lines = [
        f"{result['date']} · `{result['target']['model']}` at {result['target']['url']} · {shape} · "
        f"prompt sizing: {result['prompt_sizing']}",
        provenance_line(result),
        "",
        "| load | ok / errors | req/s | output tok/s | × c=1 | TTFT ms p50/p90/p99 | TPOT ms p50/p90/p99 "
        "| ITL ms p50/p90/p99 | queued s (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in result["levels"]:
        queued = lv["server_queued_s"].get("mean")
        lines.append(
            f"| {lv['label']} | {lv['completed']} / {lv['errors']} | {_num(lv['request_throughput'], '{:.2f}')} | "
            f"{_num(lv['output_throughput'], '{:.1f}')} | {_num(lv.get('ratio_to_c1'), '{:.2f}×')} | "
            f"{_ms(lv['ttft_s'])} | {_ms(lv['tpot_s'])} | {_ms(lv['itl_s'])} | {_num(queued, '{:.2f}')} |")
    longs = [(lv["label"], lv["long"]) for lv in result["levels"] if lv.get("long")]
    if longs:
        lines += ["", "Long-prefill request (the rows above are the chats that ran beside it):", "",
                  "| load | prompt tok | TTFT s | end-to-end s | chats started during it | chats with first token "
                  "during it | error |", "|---|---:|---:|---:|---:|---:|---|"]
        for label, long in longs:
            lines.append(f"| {label} | {_num(long.get('prompt_tokens'), '{:,}')} | "
                         f"{_num(long.get('ttft_s'), '{:.2f}')} | {_num(long.get('e2e_s'), '{:.2f}')} | "
                         f"{long['chats_started_during']} | "
                         f"{long['chats_first_token_during']} | {long.get('error') or ''} |")
    errors = [(lv["label"], m) for lv in result["levels"] for m in lv["error_messages"]]
    if errors:
        lines += ["", "Errors (first messages):"] + [f"- {label}: {m}" for label, m in errors]
    return "\n".join(lines)
