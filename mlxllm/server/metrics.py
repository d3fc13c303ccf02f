"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own per server."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mlxllm_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mlxllm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("mlxllm_cached_prompt_tokens", "Prompt tokens reused from the prefix cache",
                                     registry=r)
        self.generated_tokens = Counter("mlxllm_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("mlxllm_time_to_first_token_seconds", "Submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mlxllm_inter_token_latency_seconds", "Time between a request's events",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("mlxllm_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("mlxllm_running_batch_size", "Sequences decoding in the batch", registry=r)
        self.prefilling = Gauge("mlxllm_prefilling_requests", "Admitted requests whose prompt is being read", registry=r)
        self.kv_bytes = Gauge("mlxllm_kv_cache_bytes", "KV cache bytes of running requests", registry=r)
        self.prompt_cache_bytes = Gauge("mlxllm_prompt_cache_bytes", "Bytes held by the prefix cache", registry=r)
        self.prompt_cache_entries = Gauge("mlxllm_prompt_cache_entries", "Prefixes held by the prefix cache", registry=r)
        self.draft_proposed = Gauge("mlxllm_draft_tokens_proposed", "Tokens the draft model proposed (--draft-model)",
                                    registry=r)
        self.draft_accepted = Gauge("mlxllm_draft_tokens_accepted", "Drafted tokens the model kept", registry=r)
        self._last: dict[str, float] = {}

    def watch(self, engine: Any) -> None:
        """Read the gauges from ``engine``'s plain counters at scrape time."""
        self.queue.set_function(lambda: engine.queued)
        self.running.set_function(lambda: engine.running)
        self.prefilling.set_function(lambda: engine.prefilling)
        self.kv_bytes.set_function(lambda: engine.kv_bytes_now)
        draft = engine.draft
        if draft is not None:
            self.draft_proposed.set_function(lambda: draft.proposed)
            self.draft_accepted.set_function(lambda: draft.accepted)
        cache = engine.prefix_cache
        if cache is not None:
            self.prompt_cache_bytes.set_function(lambda: cache.stats()["bytes"])
            self.prompt_cache_entries.set_function(lambda: cache.stats()["entries"])

    def on_event(self, event: Any, elapsed: float) -> None:
        """Count one engine event; ``elapsed``: seconds since its request was submitted."""
        rid = event.request_id
        if event.ttft is not None:
            self.ttft.observe(event.ttft)
        elif rid in self._last:
            self.itl.observe(elapsed - self._last[rid])
        self._last[rid] = elapsed
        self.generated_tokens.inc(len(event.tokens))
        if event.finish_reason is not None:
            self._last.pop(rid, None)
            self.prompt_tokens.inc(event.prompt_tokens)
            self.cached_tokens.inc(event.cached_tokens)

    def forget(self, request_id: str) -> None:
        self._last.pop(request_id, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)
