"""The load of ``spl bench serve``: conversations sent to the server at a fixed concurrency or
arriving as a Poisson process, and the long-prefill mix, all on one asyncio loop.

A conversation is one request, or with sessions ``turns`` requests sent one after another under
one ``session_id``, each resending the history with the replies as they came. Every prompt
text is made before the level's clock starts (the load generator only sends and reads). Every
loop is bounded in count (``num_prompts``) and time (``duration`` for new requests,
``request_timeout`` for each one).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from superlinear.plugins.bench.serve_prompts import PromptMaker
from superlinear.plugins.bench.serve_request import RequestResult, chat_body, stream_chat
from superlinear.plugins.bench.serve_stats import summarize

MAX_IN_FLIGHT = 1024  # requests of a Poisson level at once, whatever the rate


@dataclass(frozen=True)
class Turn:
    text: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ScriptedChat:
    """One simulated user: the turns it sends, in one session or none."""

    turns: tuple[Turn, ...]
    session_id: str | None


@dataclass(frozen=True)
class Level:
    """One load level: ``concurrency`` requests at a time, or ``request_rate`` arrivals a second."""

    concurrency: int | None = None
    request_rate: float | None = None

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate {self.request_rate:g}/s"


class LoadRunner:
    def __init__(self, http: httpx.AsyncClient, model: str, prompts: PromptMaker, options):
        self.http, self.model, self.prompts, self.o = http, model, prompts, options
        self.deadline = math.inf

    async def conversations(self, rng: random.Random, prefix: str) -> list[ScriptedChat]:
        """The level's conversations: ``num_prompts`` turns in all (the last one may be shorter)."""
        turns_each = self.o.turns if self.o.sessions else 1
        out = []
        left = self.o.num_prompts
        while left > 0:
            n = min(turns_each, left)
            turns = []
            for i in range(n):
                prompt = self.o.prompt_tokens.draw(rng)
                text = await self.prompts.make(prompt, rng, first_turn=i == 0)
                turns.append(Turn(text, prompt, self.o.output_tokens.draw(rng)))
            out.append(ScriptedChat(tuple(turns), f"{prefix}-{len(out)}" if self.o.sessions else None))
            left -= n
        return out

    async def converse(self, conv: ScriptedChat, sink: list[RequestResult]) -> None:
        messages: list[dict] = []
        for turn in conv.turns:
            if time.perf_counter() >= self.deadline:
                return
            messages.append({"role": "user", "content": turn.text})
            result = await self.request(chat_body(self.model, messages, turn.output_tokens, conv.session_id),
                                        turn.prompt_tokens)
            sink.append(result)
            if not result.ok:
                return  # the session's history is no longer what the next turn would resend
            messages.append({"role": "assistant", "content": result.reply})

    async def request(self, body: dict, prompt_tokens: int, on_first_event=None) -> RequestResult:
        return await stream_chat(self.http, body, prompt_tokens=prompt_tokens, timeout=self.o.request_timeout,
                                 on_first_event=on_first_event)

    async def fixed(self, convs: list[ScriptedChat], concurrency: int, sink: list[RequestResult],
                    keep_going: Callable[[], bool] = lambda: True) -> None:
        """``concurrency`` workers, each taking the next conversation until none is left, the
        duration is over or ``keep_going()`` says stop."""
        pending = iter(convs)

        async def worker() -> None:
            for conv in pending:
                if time.perf_counter() >= self.deadline or not keep_going():
                    return
                await self.converse(conv, sink)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def poisson(self, convs: list[ScriptedChat], rate: float, rng: random.Random,
                      sink: list[RequestResult]) -> None:
        """Conversations starting at exponential intervals (mean 1 / ``rate``)."""
        gate = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def one(conv: ScriptedChat) -> None:
            async with gate:
                await self.converse(conv, sink)

        tasks = []
        for conv in convs:
            if tasks:
                await asyncio.sleep(rng.expovariate(rate))
            if time.perf_counter() >= self.deadline:
                break
            tasks.append(asyncio.create_task(one(conv)))
        await asyncio.gather(*tasks)

    async def run_level(self, level: Level, index: int, run_id: str) -> dict:
        rng = random.Random(f"{self.o.seed}:{index}")
        convs = await self.conversations(rng, f"bench-{run_id}-{index}")
        long_text = await self.prompts.make(self.o.long_prompt_tokens, rng) if self.o.mix == "long-prefill" else None
        sink: list[RequestResult] = []
        start = time.perf_counter()
        self.deadline = start + self.o.duration if self.o.duration else math.inf
        try:
            if long_text is not None:
                long = await self._beside_long(long_text, lambda keep: self.fixed(convs, level.concurrency, sink, keep))
            elif level.request_rate is not None:
                await self.poisson(convs, level.request_rate, rng, sink)
            else:
                await self.fixed(convs, level.concurrency, sink)
        finally:
            if self.o.sessions:
                await self._delete_sessions([c.session_id for c in convs])
        out = {"label": level.label + (" + long" if long_text is not None else ""),
               "concurrency": level.concurrency, "request_rate": level.request_rate, **summarize(sink)}
        if long_text is not None:
            out["long"] = long_summary(long, sink)
        return out

    async def _beside_long(self, text: str, chats: Callable[[Callable[[], bool]], Awaitable[None]]) -> RequestResult:
        """The long request, and the chats from the moment the server took it (its first
        streamed event, or ``mix_delay`` seconds) until it ends."""
        taken = asyncio.Event()
        body = chat_body(self.model, [{"role": "user", "content": text}], self.o.long_output_tokens, None)
        task = asyncio.create_task(self.request(body, self.o.long_prompt_tokens, on_first_event=taken.set))
        try:
            await asyncio.wait_for(taken.wait(), self.o.mix_delay)
        except TimeoutError:
            pass
        await chats(lambda: not task.done())
        return await task

    async def _delete_sessions(self, ids: list[str | None]) -> None:
        """Remove the level's sessions from the server (best effort: a server without the
        sessions API keeps nothing anyway)."""
        for sid in ids:
            if sid is None:
                continue
            try:
                await self.http.delete(f"/v1/sessions/{sid}", timeout=10.0)
            except httpx.HTTPError:
                return


def long_summary(long: RequestResult, chats: list[RequestResult]) -> dict:
    """The long request's numbers, and how many chats started / got their first token while it ran."""
    end = long.ended if long.ended is not None else math.inf
    return {"ok": long.ok, "error": long.error, "prompt_tokens": long.prompt_tokens,
            "prompt_tokens_asked": long.prompt_tokens_asked, "output_tokens": long.output_tokens,
            "ttft_s": long.ttft, "e2e_s": long.latency, "server_queued_s": long.server_queued_s,
            "chats_started_during": sum(r.started < end for r in chats),
            "chats_first_token_during": sum(r.ok and r.ttft is not None and r.started + r.ttft < end for r in chats)}
