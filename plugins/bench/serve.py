"""``spl bench serve``: a load generator against a running server (spl's, or any that speaks
OpenAI's chat completions), in the spirit of vLLM's ``benchmark_serving``.

Each load level (``--concurrency 1,4,8``: one level per value, in one run; or ``--request-rate``:
Poisson arrivals) sends ``--num-prompts`` streamed chat requests with prompts of real text sized
in the server's tokens and ``max_tokens`` + ``ignore_eos`` outputs, and measures on the client:
TTFT, TPOT, every inter-token gap (ITL), request and output-token throughput, errors; and each
level's throughput over the concurrency-1 level's. ``--sessions`` makes multi-turn
conversations under a ``session_id`` (each turn resends the history; the server's cached prompt
tokens are counted). ``--mix long-prefill`` starts one long prompt per level and runs the chats
while it is prefilled, reported apart from it.

The server is the one the other commands talk to (``--url``, ``$SPL_SERVER_URL``, ``spl server
connect``, your local server), with the usual API key (``$SPL_API_KEY`` or the stored one).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import asdict, dataclass, field

import click
import httpx

from superlinear.bus import Context
from superlinear.errors import InvalidRequest, Unauthorized, Unavailable
from superlinear.plugins.bench.lengths import parse_length
from superlinear.plugins.bench.provenance import provenance
from superlinear.plugins.bench.serve_load import Level, LoadRunner
from superlinear.plugins.bench.serve_prompts import PromptMaker
from superlinear.plugins.bench.serve_request import chat_body, error_message, stream_chat
from superlinear.plugins.bench.serve_stats import add_ratios, markdown

MAX_LEVELS = 16
MAX_CONCURRENCY = 1024
MAX_PROMPTS = 10_000  # per level; every prompt's text is made before the level starts
MAX_PROMPT_TOKENS = 1 << 20
MAX_LONG_PROMPT_TOKENS = 16 << 20
MAX_OUTPUT_TOKENS = 1 << 16


@dataclass(frozen=True)
class LengthRange:
    """A token count: fixed (``512``) or drawn uniformly from a range (``256:1024``)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, limit: int, what: str) -> LengthRange:
        try:
            parts = [parse_length(p) for p in str(text).split(":")]
        except ValueError:
            raise InvalidRequest(f"{what} must be a token count like 512 or a range like 256:1024, "
                                 f"got {text!r}") from None
        if len(parts) not in (1, 2) or not all(1 <= p <= limit for p in parts) or parts[0] > parts[-1]:
            raise InvalidRequest(f"{what} must be from 1 to {limit:,} tokens (a range low:high with low <= high), "
                                 f"got {text!r}")
        return cls(parts[0], parts[-1])

    def draw(self, rng) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class BenchServe:
    name = "bench.serve"
    url: str | None = None
    model: str | None = None  # None: the first model the server lists
    concurrency: tuple[int, ...] = (1,)
    request_rate: float | None = None  # Poisson arrivals a second (replaces concurrency)
    num_prompts: int = 16  # requests per level
    duration: float | None = None  # seconds per level after which no new request is sent
    prompt_tokens: LengthRange = field(default_factory=lambda: LengthRange(512, 512))
    output_tokens: LengthRange = field(default_factory=lambda: LengthRange(64, 64))
    sessions: bool = False
    turns: int = 3
    mix: str | None = None  # "long-prefill"
    long_prompt_tokens: int = 4096
    long_output_tokens: int = 1
    mix_delay: float = 2.0  # the longest wait for the long request to be taken before the chats start
    request_timeout: float = 600.0
    seed: int = 0


def levels_of(command: BenchServe) -> list[Level]:
    if command.request_rate is not None:
        return [Level(request_rate=command.request_rate)]
    return [Level(concurrency=c) for c in command.concurrency]


def run_bench(command: BenchServe, ctx: Context | None = None) -> dict:
    from superlinear.client import no_server_message, resolve_api_key, resolve_target

    target = resolve_target(command.url)
    if target.source == "configured":  # no server of ours runs: never load someone else's by default
        raise Unavailable(no_server_message(target.url))
    return asyncio.run(_run(command, target.url, resolve_api_key()))


async def _run(command: BenchServe, url: str, api_key: str | None) -> dict:
    levels = levels_of(command)
    in_flight = max(level.concurrency or MAX_CONCURRENCY for level in levels) + 1
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers,
                                 timeout=httpx.Timeout(command.request_timeout, connect=10.0),
                                 limits=httpx.Limits(max_connections=in_flight + 4,
                                                     max_keepalive_connections=in_flight + 4)) as http:
        model, server = await _preflight(http, url, command.model)
        prompts = PromptMaker(http, model)
        await prompts.calibrate()
        warmup = await stream_chat(http, chat_body(model, [{"role": "user", "content": "Hello"}], 2, None),
                                   prompt_tokens=0, timeout=command.request_timeout)
        runner = LoadRunner(http, model, prompts, command)
        run_id = secrets.token_hex(4)
        results = [await runner.run_level(level, i, run_id) for i, level in enumerate(levels)]
    add_ratios(results)
    settings = {k: v for k, v in asdict(command).items() if k != "url"}
    settings.update(prompt_tokens=str(command.prompt_tokens), output_tokens=str(command.output_tokens),
                    concurrency=None if command.request_rate is not None else list(command.concurrency))
    return {**provenance(), "target": {"url": url, "model": model, **server}, "settings": settings,
            "prompt_sizing": prompts.sizing, "template_tokens": prompts.template_tokens,
            "warmup": {"ok": warmup.ok, "error": warmup.error, "e2e_s": warmup.latency},
            "levels": results}


async def _preflight(http: httpx.AsyncClient, url: str, model: str | None) -> tuple[str, dict]:
    """The model to ask for and what the server says of itself; an unreachable server or a
    refused key is the user's to fix (exit 2), before any load."""
    try:
        listed = await http.get("/v1/models", timeout=10.0)
    except httpx.HTTPError as exc:
        raise Unavailable(f"cannot reach a server at {url} ({type(exc).__name__}); start one with "
                          "`spl server start` or name one with --url") from None
    if listed.status_code in (401, 403):
        raise Unauthorized(f"the server at {url} refused the API key ({error_message(listed)}); "
                           "set $SPL_API_KEY or use `spl server connect URL --api-key KEY`")
    cards = []
    if listed.status_code == 200:
        try:
            cards = listed.json().get("data") or []
        except ValueError:
            cards = []
    if model is None:
        if not cards:
            raise Unavailable(f"{url}/v1/models names no model (HTTP {listed.status_code}); give one with --model")
        model = str(cards[0].get("id"))
    card = next((c for c in cards if c.get("id") == model), {})
    info = card.get("info") or {}
    server = {"device": info.get("device"), "dtype": info.get("dtype"), "model_kind": info.get("kind")}
    try:
        health = (await http.get("/health", timeout=10.0)).json()
        server.update(server_version=health.get("version"), server_threads=health.get("threads"))
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return model, server


def _ints(text: str, what: str, low: int, high: int) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidRequest(f"{what} must be comma-separated whole numbers, got {text!r}") from None
    if not values or len(values) > MAX_LEVELS or not all(low <= v <= high for v in values):
        raise InvalidRequest(f"{what} must be 1 to {MAX_LEVELS} numbers from {low} to {high}, got {text!r}")
    return values


@click.command("serve")
@click.option("--url", default=None, metavar="URL",
              help="Server to load (default: $SPL_SERVER_URL, `spl server connect`, your local server).")
@click.option("--model", default=None, help="Model to ask for (default: the first one the server lists).")
@click.option("--concurrency", default=None,
              help="Requests in flight (default 1); a list (1,4,8) runs one level per value and reports each "
                   "level's throughput over the concurrency-1 level's.")
@click.option("--request-rate", type=click.FloatRange(min=0.001, max=10_000), default=None,
              help="Poisson arrivals: requests a second (instead of --concurrency).")
@click.option("--num-prompts", type=click.IntRange(1, MAX_PROMPTS), default=16, show_default=True,
              help="Requests per level.")
@click.option("--duration", type=click.FloatRange(min=0.1, max=86_400), default=None,
              help="Seconds per level after which no new request is sent.")
@click.option("--prompt-tokens", default="512", show_default=True, help="Prompt length: 512, or 256:1024 (uniform).")
@click.option("--output-tokens", default="64", show_default=True, help="Output length: 64, or 16:128 (uniform).")
@click.option("--sessions", is_flag=True, help="Multi-turn conversations under a session_id, resending the history.")
@click.option("--turns", type=click.IntRange(1, 1000), default=3, show_default=True, help="Turns per session.")
@click.option("--mix", type=click.Choice(["long-prefill"]), default=None,
              help="long-prefill: one long prompt per level, the chats run while it is prefilled.")
@click.option("--long-prompt-tokens", default="4096", show_default=True, help="The long prompt's length (4K, 1M).")
@click.option("--long-output-tokens", type=click.IntRange(1, MAX_OUTPUT_TOKENS), default=1, show_default=True,
              help="Tokens generated after each long prompt.")
@click.option("--request-timeout", type=click.FloatRange(min=1, max=86_400), default=600, show_default=True,
              help="Seconds a request may take in all before it counts as an error.")
@click.option("--seed", type=int, default=0, show_default=True, help="Prompt texts, drawn lengths, arrivals.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write the output to this file.")
def command(url, model, concurrency, request_rate, num_prompts, duration, prompt_tokens, output_tokens, sessions,
            turns, mix, long_prompt_tokens, long_output_tokens, request_timeout, seed, as_json, out_file) -> None:
    """Load a running server: TTFT, TPOT, ITL, throughput at several concurrencies or a Poisson rate."""
    if request_rate is not None and mix:
        raise InvalidRequest("--mix long-prefill runs at a fixed --concurrency, not a --request-rate")
    if request_rate is not None and concurrency is not None:
        raise InvalidRequest("give --concurrency or --request-rate, not both")
    long = LengthRange.parse(long_prompt_tokens, MAX_LONG_PROMPT_TOKENS, "--long-prompt-tokens")
    if long.low != long.high:
        raise InvalidRequest(f"--long-prompt-tokens is one length, got {long_prompt_tokens!r}")
    options = BenchServe(
        url=url if url is None or "://" in url else f"http://{url}", model=model,
        concurrency=_ints(concurrency or "1", "--concurrency", 1, MAX_CONCURRENCY), request_rate=request_rate,
        num_prompts=num_prompts, duration=duration,
        prompt_tokens=LengthRange.parse(prompt_tokens, MAX_PROMPT_TOKENS, "--prompt-tokens"),
        output_tokens=LengthRange.parse(output_tokens, MAX_OUTPUT_TOKENS, "--output-tokens"),
        sessions=sessions, turns=turns, mix=mix, long_prompt_tokens=long.high, long_output_tokens=long_output_tokens,
        request_timeout=request_timeout, seed=seed)
    result = run_bench(options)
    text = json.dumps(result, indent=2, default=str) if as_json else markdown(result)
    click.echo(text)
    if out_file:
        with open(out_file, "w") as fh:
            fh.write(text + "\n")
    failed = sum(level["errors"] for level in result["levels"])
    failed += sum(1 for level in result["levels"] if level.get("long") and not level["long"]["ok"])
    if failed:
        click.echo(f"spl bench serve: {failed} requests failed (see the errors above)", err=True)
        raise SystemExit(1)
