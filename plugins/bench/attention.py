"""``spl bench attention``: superlinear attention kernels against dense SDPA, one markdown table.

Prefill: a chunk of ``--chunk`` queries (default 16K) at the end of depth L; decode: one query at
depth L, timed as CUDA-graph replays. Shapes HQ=32, HKV=2, D=128, bf16 (all options). Dense is
``scaled_dot_product_attention`` with ``enable_gqa`` (the fast path), timed in the same run.
The floor column is max(FLOPs / rate, bytes / bandwidth) for what the case must do (see
docs/benchmarks.md for the counting). torch is imported only when the command runs.

``--device cpu`` times the CPU backend (the PyTorch reference) at the default model's shapes and
attention config (HQ=9, HKV=3, D=64, fp32, config ``default``) for each ``--threads`` count;
superlinear and dense calls alternate so that a loaded machine slows both alike.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from functools import partial

import click

from superlinear.bus import Context
from superlinear.plugins.bench.lengths import fmt_length, parse_length
from superlinear.plugins.bench.provenance import provenance, provenance_line

CONFIGS = {
    "1": dict(sw_index=3, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.5,
              inv_search_power=2),
    "2": dict(sw_index=65, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.55,
              search_power=0.55),
    # the default model's retrofit (window 2024): superlinear.model.checkpoint_meta.RETROFIT_SPAN
    "default": dict(sw_index=44, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.5,
                    inv_search_power=2),
}
# --device cpu: the default model's attention shapes
CPU_SHAPES = dict(heads=9, kv_heads=3, head_dim=64)
# lengths a CPU gets through in minutes (the GPU defaults reach 1M-4M tokens)
CPU_LENGTHS = ("512,2K,4K", "4K,16K")
# H100 SXM rates used for the floors: measured bf16 GEMM and device copy on this workplace's
# machines (KINDS.md), datasheet fp32 (non-tensor) for the routing dot products
PEAK_MMA = 790e12
PEAK_FP32 = 67e12
BANDWIDTH = 3.0e12


@dataclass(frozen=True)
class BenchAttention:
    configs: tuple = ("1", "2")
    lengths: tuple = (16384, 65536, 262144, 1048576)
    decode_lengths: tuple = (16384, 65536, 262144, 1048576, 4194304)
    chunk: int = 16384
    heads: int = 32
    kv_heads: int = 2
    head_dim: int = 128
    dense: bool = True
    repeats: int = 10
    backend: str = "triton"
    device: str = "cuda"
    threads: tuple = ()  # CPU: torch thread counts to run (empty: torch's default)


@dataclass
class Row:
    config: str
    phase: str
    length: int
    ms: float
    dense_ms: float | None
    floor_ms: float
    note: str = ""
    extra: dict = field(default_factory=dict)
    threads: int | None = None


def floors(params, phase: str, L: int, chunk: int, HQ: int, HKV: int, D: int) -> tuple[float, dict]:
    """(floor ms, counts) of one case: what the function must compute and move at least."""
    import numpy as np

    from superlinear.kernels.attention.params import span_lengths_np, stripe_offsets_np

    k = params.num_spans
    W = params.window_len
    imax = int((L + 1) ** params.power) + 3
    offs = stripe_offsets_np(params, imax)
    back, fwd = span_lengths_np(params, L)
    if phase == "prefill":
        t = np.arange(L - chunk, L)
    else:
        t = np.array([L - 1])
    ncand = np.searchsorted(offs, t + 1, side="right") - (params.sw_index + 1)
    ncand = np.maximum(ncand, 0)
    span = back[t + 1] + fwd[t + 1] + 1
    keys = k * span + W  # keys per (query, head): k spans + the window
    if phase == "prefill":
        fl_mma = float((HQ * keys * D * 4).sum())
        fl_search = float((HQ * ncand * D * 2).sum())
        byts = 2 * (3 * chunk * HQ * D + 2 * L * HKV * D)
        t_ms = max(fl_mma / PEAK_MMA + fl_search / PEAK_FP32, byts / BANDWIDTH) * 1e3
        return t_ms, dict(flops=fl_mma + fl_search, bytes=byts)
    byts = 2 * (HQ * k * int(span[0]) * D * 2 + int(ncand[0]) * HKV * D + W * HKV * D * 2)
    return byts / BANDWIDTH * 1e3, dict(flops=float(HQ * keys[0] * D * 4), bytes=byts)


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, replays: int = 200) -> float:
    """Median time of one call, replayed in a CUDA graph (20 calls per graph, 10 timed replays)."""
    import torch

    from superlinear.model.model import warm_up_on_side_stream

    fn()
    torch.cuda.synchronize()
    warm_up_on_side_stream(fn)
    torch.cuda.synchronize()
    per = 20
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(per):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(3, replays // per)):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per)
    return statistics.median(times)


def _dense_prefill(q, k, v, L, chunk):
    import torch.nn.functional as F

    if L == chunk:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), ""
    try:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(chunk, L)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)  # noqa: E731
        fn()
        return fn, ""
    except Exception:  # older torch: no GQA with a causal bias; attend to all L keys instead
        return (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)), "dense: no causal mask"


def run_bench(command: BenchAttention, ctx: Context | None = None, log=None) -> dict:
    import torch

    from superlinear.errors import Unavailable
    from superlinear.kernels import SpanParams, superlinear_decode, superlinear_prefill

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if command.device == "cpu":
        return run_bench_cpu(command, log)
    if not torch.cuda.is_available():
        raise Unavailable("spl bench attention needs a CUDA GPU (or --device cpu)")
    dev = "cuda"
    HQ, HKV, D, C = command.heads, command.kv_heads, command.head_dim, command.chunk
    rows: list[Row] = []
    gen = torch.Generator(device=dev).manual_seed(0)
    maxlen = max(list(command.lengths) + list(command.decode_lengths))
    k_all = torch.randn(1, HKV, maxlen, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v_all = torch.randn(1, HKV, maxlen, D, device=dev, dtype=torch.bfloat16, generator=gen)
    for cname in command.configs:
        params = SpanParams(**CONFIGS[cname])
        for L in command.lengths:
            chunk = min(C, L)
            k, v = k_all[:, :, :L], v_all[:, :, :L]
            q1 = torch.randn(1, HQ, chunk, D, device=dev, dtype=torch.bfloat16, generator=gen)
            q2 = torch.randn(1, HQ, chunk, D, device=dev, dtype=torch.bfloat16, generator=gen)
            pos = torch.arange(L - chunk, L, device=dev)
            ms = _median_ms(partial(superlinear_prefill, q1, q2, k, v, pos, params, backend=command.backend),
                            command.repeats)
            dense_ms, note = None, ""
            if command.dense:
                fn, note = _dense_prefill(q2, k, v, L, chunk)
                dense_ms = _median_ms(fn, max(3, command.repeats // 3), warmup=1)
            fl, counts = floors(params, "prefill", L, chunk, HQ, HKV, D)
            rows.append(Row(cname, "prefill", L, ms, dense_ms, fl, note, counts))
            log(f"config {cname} prefill L={fmt_length(L)}: {ms:.3f} ms (dense {dense_ms}) floor {fl:.3f}")
            del q1, q2
        for L in command.decode_lengths:
            k, v = k_all[:, :, :L], v_all[:, :, :L]
            q1 = torch.randn(1, HQ, 1, D, device=dev, dtype=torch.bfloat16, generator=gen)
            q2 = torch.randn(1, HQ, 1, D, device=dev, dtype=torch.bfloat16, generator=gen)
            pos = torch.tensor([L - 1], device=dev)
            ms = graph_ms(partial(superlinear_decode, q1, q2, k, v, pos, params, backend=command.backend))
            dense_ms = None
            if command.dense:
                import torch.nn.functional as F

                dense_ms = graph_ms(partial(F.scaled_dot_product_attention, q2, k, v, enable_gqa=True))
            fl, counts = floors(params, "decode", L, 1, HQ, HKV, D)
            rows.append(Row(cname, "decode", L, ms, dense_ms, fl, "", counts))
            log(f"config {cname} decode L={fmt_length(L)}: {ms * 1e3:.1f} us (dense {dense_ms}) floor {fl * 1e3:.1f}")
    return {**provenance(dev), "rows": rows, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "fits": fit_exponents(rows)}


def _interleaved_ms(fns: list, repeats: int) -> list[float]:
    """Median wall ms of each function, called in turn ``repeats`` times after one warm-up round."""
    import time

    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def run_bench_cpu(command: BenchAttention, log) -> dict:
    """The CPU backend against dense SDPA, fp32, alternating calls; one row per (case, threads)."""
    import os

    import torch
    import torch.nn.functional as F

    from superlinear.kernels import SpanParams, superlinear_decode, superlinear_prefill

    HQ, HKV, D, C = command.heads, command.kv_heads, command.head_dim, command.chunk
    gen = torch.Generator().manual_seed(0)
    maxlen = max(list(command.lengths) + list(command.decode_lengths))
    k_all = torch.randn(1, HKV, maxlen, D, generator=gen)
    v_all = torch.randn(1, HKV, maxlen, D, generator=gen)
    rows: list[Row] = []
    before = torch.get_num_threads()
    try:
        for threads in command.threads or (before,):
            torch.set_num_threads(threads)
            for cname in command.configs:
                params = SpanParams(**CONFIGS[cname])
                for L in command.lengths:
                    chunk = min(C, L)
                    k, v = k_all[:, :, :L], v_all[:, :, :L]
                    q1 = torch.randn(1, HQ, chunk, D, generator=gen)
                    q2 = torch.randn(1, HQ, chunk, D, generator=gen)
                    pos = torch.arange(L - chunk, L)
                    fns = [partial(superlinear_prefill, q1, q2, k, v, pos, params, backend="reference")]
                    if command.dense:
                        fns.append(_dense_prefill(q2, k, v, L, chunk)[0])
                    ms, *dense = _interleaved_ms(fns, command.repeats)
                    rows.append(Row(cname, "prefill", L, ms, dense[0] if dense else None, float("nan"),
                                    extra={"chunk": chunk}, threads=threads))
                    log(f"threads {threads} config {cname} prefill L={fmt_length(L)}: {ms:.1f} ms (dense {dense})")
                for L in command.decode_lengths:
                    k, v = k_all[:, :, :L], v_all[:, :, :L]
                    q1 = torch.randn(1, HQ, 1, D, generator=gen)
                    q2 = torch.randn(1, HQ, 1, D, generator=gen)
                    pos = torch.tensor([L - 1])
                    fns = [partial(superlinear_decode, q1, q2, k, v, pos, params, backend="reference")]
                    if command.dense:
                        fns.append(partial(F.scaled_dot_product_attention, q2, k, v, enable_gqa=True))
                    ms, *dense = _interleaved_ms(fns, max(command.repeats, 20))
                    rows.append(Row(cname, "decode", L, ms, dense[0] if dense else None, float("nan"),
                                    threads=threads))
                    log(f"threads {threads} config {cname} decode L={fmt_length(L)}: {ms:.3f} ms (dense {dense})")
    finally:
        torch.set_num_threads(before)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return {**provenance("cpu"), "rows": rows,
            "device": f"CPU ({os.cpu_count()} cores, load average {load} at the end)", "torch": torch.__version__,
            "fits": {}}


def as_json(result: dict) -> str:
    """The result as JSON: rows as objects, the fits keyed ``config/phase``."""
    out = dict(result, rows=[asdict(r) for r in result["rows"]],
               fits={f"{cfg}/{phase}": slope for (cfg, phase), slope in result["fits"].items()})
    return json.dumps(out, indent=2, default=str)


def fit_exponents(rows: list[Row]) -> dict:
    """Slope of log(time) against log(L) over 64K..1M per (config, phase)."""
    out = {}
    for key in {(r.config, r.phase) for r in rows}:
        pts = [(math.log(r.length), math.log(r.ms)) for r in rows
               if (r.config, r.phase) == key and 65536 <= r.length <= 1048576 and r.ms > 0]
        if len(pts) < 2:
            continue
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        out[key] = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return out


def markdown_cpu(result: dict, command_line: str) -> str:
    lines = [
        f"Date: {result['date']}; device: {result['device']}; command: `{command_line}`",
        provenance_line(result),
        "",
        "| config | case | L | threads | superlinear | dense SDPA | superlinear / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        case = (f"prefill {fmt_length(r.extra['chunk'])} queries" if r.phase == "prefill" else "decode step")
        dense = f"{r.dense_ms:.3g} ms" if r.dense_ms is not None else "—"
        ratio = f"{r.ms / r.dense_ms:.2f}×" if r.dense_ms else "—"
        lines.append(f"| {r.config} | {case} | {fmt_length(r.length)} | {r.threads} | {r.ms:.3g} ms | {dense} | "
                     f"{ratio} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict, command_line: str) -> str:
    rows = result["rows"]
    if rows and rows[0].threads is not None:
        return markdown_cpu(result, command_line)
    lines = [
        f"Date: {result['date']}; device: {result['device']}; command: `{command_line}`",
        provenance_line(result),
        "",
        "| config | case | L | superlinear | dense SDPA | dense / superlinear | floor | superlinear / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        unit, f = ("ms", 1.0) if r.phase == "prefill" else ("µs", 1e3)
        case = "prefill 16K-query chunk" if r.phase == "prefill" else "decode step (CUDA graph)"
        dense = f"{r.dense_ms * f:.3g} {unit}" if r.dense_ms is not None else "—"
        ratio = f"{r.dense_ms / r.ms:.2f}×" if r.dense_ms else "—"
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.config} | {case} | {fmt_length(r.length)} | {r.ms * f:.3g} {unit} | {dense}{note} | "
                     f"{ratio} | {r.floor_ms * f:.3g} {unit} | {r.ms / r.floor_ms:.1f}× |")
    if result.get("fits"):
        lines.append("")
        for (cfg, phase), slope in sorted(result["fits"].items()):
            per_q = slope if phase == "decode" else slope  # chunk size is fixed: per-query slope
            lines.append(f"- config {cfg} {phase}: time ∝ L^{per_q:.2f} (least squares, 64K..1M)")
    return "\n".join(lines) + "\n"


def handle(command: BenchAttention, ctx: Context | None = None) -> dict:
    return run_bench(command, ctx)




def _split(text: str) -> tuple:
    return tuple(parse_length(x) for x in text.split(",") if x.strip())


@click.command("attention")
@click.option("--config", "configs", default="1,2", show_default=True,
              help="Configs to run: 1 = (s=3,k=3,bf=3,ff=1,p=sp=0.5), 2 = (s=65,k=3,bf=3,ff=1,p=sp=0.55).")
@click.option("--lengths", default="16K,64K,256K,1M", show_default=True,
              help=f"Prefill depths (CPU: {CPU_LENGTHS[0]} unless given).")
@click.option("--decode-lengths", default="16K,64K,256K,1M,4M", show_default=True,
              help=f"Decode depths (CPU: {CPU_LENGTHS[1]} unless given).")
@click.option("--chunk", default="16K", show_default=True, help="Queries per prefill chunk.")
@click.option("--heads", default=32, show_default=True, type=click.IntRange(1),
              help="Query heads (CPU: the default model's 9 unless given).")
@click.option("--kv-heads", default=2, show_default=True, type=click.IntRange(1),
              help="Key/value heads, grouped-query (CPU: the default model's 3 unless given).")
@click.option("--head-dim", default=128, show_default=True, type=click.IntRange(1),
              help="Dimension of each head (CPU: the default model's 64 unless given).")
@click.option("--no-dense", is_flag=True, help="Skip the dense SDPA baseline.")
@click.option("--repeats", default=10, show_default=True, help="Timed prefill calls per case (median).")
@click.option("--backend", default=None, type=click.Choice(["triton", "reference"]),
              help="Superlinear kernels on CUDA: triton (default) or the PyTorch reference; CPU runs the reference.")
@click.option("--device", default=None, type=click.Choice(["cuda", "cpu"]),
              help="Where to run (default: cuda if a GPU is there, else cpu). cpu: the reference backend, fp32, "
                   "default-model shapes and config unless given.")
@click.option("--threads", type=click.IntRange(1, 1024), multiple=True,
              help="CPU threads of torch, as in `spl serve --threads`; repeat it to run counts side by side "
                   "(--threads 1 --threads 2). Default: torch's.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output (rows, fits, provenance).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="Also write the markdown table to this file (with --json too).")
@click.pass_context
def command(click_ctx, configs, lengths, decode_lengths, chunk, heads, kv_heads, head_dim, no_dense, repeats,
            backend, device, threads, json_out, out_file):
    """Time superlinear prefill and decode against dense SDPA (on the GPU if there is one, else the CPU)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # the default model's shapes and config, and lengths a CPU gets through, unless the user gave others
        given = {name for name in ("configs", "heads", "kv_heads", "head_dim", "lengths", "decode_lengths")
                 if click_ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
        configs = configs if "configs" in given else "default"
        heads, kv_heads, head_dim = (v if n in given else CPU_SHAPES[n]
                                     for n, v in (("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim)))
        lengths = lengths if "lengths" in given else CPU_LENGTHS[0]
        decode_lengths = decode_lengths if "decode_lengths" in given else CPU_LENGTHS[1]
    thread_counts = tuple(threads)
    cmd = BenchAttention(configs=tuple(c.strip() for c in configs.split(",") if c.strip()),
                         lengths=_split(lengths), decode_lengths=_split(decode_lengths),
                         chunk=parse_length(chunk), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                         dense=not no_dense, repeats=repeats, backend=backend or "triton", device=device,
                         threads=thread_counts)
    for c in cmd.configs:
        if c not in CONFIGS:
            raise click.BadParameter(f"unknown config {c!r} (choose from {', '.join(CONFIGS)})")
    result = handle(cmd)
    args = sys.argv[sys.argv.index("attention") + 1:] if "attention" in sys.argv else []
    text = markdown(result, " ".join(["spl bench attention", *args]))
    click.echo(as_json(result) if json_out else text)
    if out_file:
        with open(out_file, "w") as fh:
            fh.write(text)
