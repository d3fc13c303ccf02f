"""The bridge between the HTTP side and the engine: one thread (the main one) owns the model and
steps the ``BatchEngine``; requests come in from the event loop, which runs on its own thread, and
their events go back to it as plain values.

Loading happens on the engine's thread too, after the server is already listening, so ``/health``
can say 503 until the model is in. An exception inside a step ends the requests of that step with an
error and the loop goes on: one bad request never takes the server down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from ..engine.batching import BatchEngine
from ..engine.requests import Event, Request
from .metrics import Metrics

log = logging.getLogger("mlxllm.server")


@dataclass
class Loaded:
    """What the loader hands the worker: the engine and what the API needs to know about the model."""

    engine: BatchEngine
    tokenizer: Any


class NotReady(Exception):
    """The model is still loading (HTTP 503)."""


class Worker:
    """Runs ``load`` and then the engine loop, on the thread that calls ``run`` (the main thread:
    MLX is used from that one thread only)."""

    def __init__(self, load: Callable[[], Loaded], metrics: Metrics, on_load_failure: Callable[[], None] | None = None):
        self.metrics = metrics
        self._on_load_failure = on_load_failure
        self.loaded: Loaded | None = None
        self.load_error: str | None = None
        self._load = load

    def run(self, done: Callable[[], bool]) -> None:
        """Load the model, then step the engine until ``done()`` (the HTTP side has shut down)."""
        try:
            self.loaded = self._load()
        except BaseException as e:  # noqa: BLE001  (reported through /health and at exit)
            self.load_error = str(e) or type(e).__name__
            log.debug("loading failed", exc_info=True)
            if self._on_load_failure is not None:
                self._on_load_failure()
            return
        self.metrics.watch(self.loaded.engine)
        engine = self.loaded.engine
        while not done():
            try:
                if not engine.step():
                    engine.wait(0.05)
            except Exception as e:  # noqa: BLE001
                log.exception("engine step failed; ending its requests")
                engine.fail_all(f"internal error: {type(e).__name__}: {e}")

    @property
    def ready(self) -> bool:
        return self.loaded is not None

    def engine(self) -> BatchEngine:
        if self.loaded is None:
            raise NotReady(self.load_error or "the model is loading")
        return self.loaded.engine

    def open(self, request: Request, is_disconnected: Callable[[], Any] | None = None) -> AsyncIterator[Event]:
        """Submit ``request`` now (so a full queue or a request that cannot run fails before any
        response starts) and return an iterator over its events. Leaving it early (the client went
        away, the task was cancelled; ``is_disconnected`` is polled while waiting) cancels the
        request in the engine, which frees its KV at the next step."""
        engine = self.engine()
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        engine.submit(request, lambda e: loop.call_soon_threadsafe(inbox.put_nowait, e))
        return self._events(engine, request, inbox, is_disconnected)

    async def _events(self, engine: BatchEngine, request: Request, inbox: asyncio.Queue,
                      is_disconnected: Callable[[], Any] | None) -> AsyncIterator[Event]:
        started = time.perf_counter()
        event = first = None
        try:
            while True:
                try:
                    event = await asyncio.wait_for(inbox.get(), 0.5 if is_disconnected else None)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        return
                    continue
                if first is None and event.tokens:
                    first = time.perf_counter()
                self.metrics.on_event(event, time.perf_counter() - started)
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if event is None or event.finish_reason is None:
                engine.cancel(request.id)
                self.metrics.forget(request.id)
            _log_request(request, event, started, first)


def _log_request(request: Request, last: Event | None, started: float, first: float | None) -> None:
    """One line per request: id, prompt / cached / generated tokens, TTFT, decode speed, how it ended."""
    now = time.perf_counter()
    generated = last.generation_tokens if last else 0
    rate = (generated - 1) / (now - first) if first is not None and generated > 1 and now > first else 0.0
    finish = (last.finish_reason if last else None) or "disconnected"
    log.info("%s prompt=%d cached=%d generated=%d ttft=%s tok/s=%.1f finish=%s", request.id,
             len(request.prompt), last.cached_tokens if last else 0, generated,
             f"{first - started:.3f}s" if first is not None else "-", rate, finish)


async def collect(events: AsyncIterator[Event]) -> tuple[str, list[Event]]:
    """A whole completion: its text and every event."""
    text, got = [], []
    async for event in events:
        text.append(event.text)
        got.append(event)
    if got and got[-1].finish_reason == "error":
        raise RuntimeError(got[-1].error or "generation failed")
    return "".join(text), got
