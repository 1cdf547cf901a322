"""The engine on its own thread, for asyncio callers (the HTTP server).

One thread owns the `LLMEngine` and is the only one to change it after construction (others only call
its thread-safe `make_request`, `check_context`, `default_max_tokens` and `stats`): it takes commands
(add requests, abort) from a thread-safe queue between steps, runs `step()` while any request is
unfinished, and hands every event to the asyncio loop of the caller that submitted the request. So
requests arriving at any time join the running batch at the next step (continuous batching), and a
caller that goes away (client disconnect) aborts its requests, which frees their cache blocks before
the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from dsv2.infer.engine import LLMEngine, Request, StreamEvent

Sink = Callable[[StreamEvent | BaseException], None]
RATE_WINDOW_S = 10.0


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dsv2-engine", daemon=True)
        self.totals = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0, "aborted": 0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    async def stream(self, requests: list[Request]) -> AsyncIterator[StreamEvent]:
        """Submit requests together; yield their events as produced until all have finished. Leaving
        early (the consumer stops, is cancelled or errors) aborts whichever are still running."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(item: StreamEvent | BaseException) -> None:
            if not loop.is_closed():  # the caller may be gone; its requests are being aborted
                loop.call_soon_threadsafe(events.put_nowait, item)

        running = {r.request_id for r in requests}
        self._commands.put(("add", requests, sink))
        self._wake.set()
        try:
            while running:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    running.discard(item.request_id)
                yield item
        finally:
            for request_id in running:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))
        self._wake.set()

    # ------------------------------------------------------------------------------ the engine thread
    def _apply(self, command: str, payload, sink: Sink | None) -> None:
        if command == "abort":
            if self.engine.abort(payload) is not None:
                self.totals["aborted"] += 1
            self._sinks.pop(payload, None)
            return
        for request in payload:
            try:
                self.engine.add_request(request)
            except ValueError as e:  # validated already; a duplicate id is the only way here
                sink(e)
                continue
            self._sinks[request.request_id] = sink
            self.totals["requests"] += 1
            self.totals["prompt_tokens"] += len(request.out.prompt_token_ids)

    def _loop(self) -> None:
        while not self._stopping:
            while True:
                try:
                    self._apply(*self._commands.get_nowait())
                except queue.Empty:
                    break
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step fails its requests, never the server
                for request_id, sink in list(self._sinks.items()):
                    self.engine.abort(request_id)
                    sink(e)
                self._sinks.clear()
                continue
            for event in events:
                sink = self._sinks.get(event.request_id)
                if sink is not None:
                    sink(event)
                if event.finish_reason is not None:
                    self._sinks.pop(event.request_id, None)
            self.totals["generation_tokens"] += len(events)
            self._recent.append((time.monotonic(), len(events)))

    # ---------------------------------------------------------------------------------------- metrics
    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last few seconds."""
        cutoff = time.monotonic() - RATE_WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return sum(n for _, n in list(self._recent)) / RATE_WINDOW_S

    def snapshot(self) -> dict[str, float]:
        """The figures /metrics serves: the engine's `stats` and the request and token totals kept here."""
        s = self.engine.stats()
        return {
            "requests_running": s.running, "requests_waiting": s.waiting,
            "cache_blocks_total": s.blocks_total, "cache_blocks_used": s.blocks_used,
            "cache_blocks_cached": s.blocks_cached, "cache_bytes_per_token": s.cache_bytes_per_token,
            "prefix_cache_queried_tokens_total": s.totals["prefix_queried_tokens"],
            "prefix_cache_hit_tokens_total": s.totals["prefix_hit_tokens"],
            "preemptions_total": s.totals["preemptions"], "tokens_per_second": self.tokens_per_second(),
            # every thread of the server (engine and HTTP): what serving cost, whatever else shares the machine
            "process_cpu_seconds_total": time.process_time(),
            **{f"{k}_total": v for k, v in self.totals.items()},
        }
