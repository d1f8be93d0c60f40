"""The server's Prometheus metrics, in a registry of its own (never prometheus-client's global
one, so two apps in one process, e.g. tests, do not collide).

Counters: `vbatch_requests_total{endpoint, status}` (HTTP requests answered),
`vbatch_prompt_tokens_total`, `vbatch_generation_tokens_total` (tokens of finished requests);
gauges, updated by the engine loop after every step: `vbatch_num_requests_waiting`,
`vbatch_num_requests_running` (engine requests, a request of n samples counting once) and
`vbatch_kv_free_blocks` (KV-cache blocks no sequence holds: back to its idle value once every
request finished or was aborted); histogram `vbatch_time_to_first_token_seconds` (streamed
requests: from arrival to the first generated token).
"""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from vbatch.engine.llm_engine import LLMEngine

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The metrics of one server app (see module docstring); `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vbatch_requests", "HTTP requests answered, by endpoint and "
                                "status code", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("vbatch_prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=self.registry)
        self.generation_tokens = Counter("vbatch_generation_tokens", "Generated tokens of "
                                         "finished requests", registry=self.registry)
        self.waiting = Gauge("vbatch_num_requests_waiting", "Engine requests waiting to run",
                             registry=self.registry)
        self.running = Gauge("vbatch_num_requests_running", "Engine requests running",
                             registry=self.registry)
        self.kv_free_blocks = Gauge("vbatch_kv_free_blocks", "KV-cache blocks no sequence "
                                    "holds", registry=self.registry)
        self.time_to_first_token = Histogram(
            "vbatch_time_to_first_token_seconds", "Arrival to first generated token of "
            "streamed requests", buckets=TTFT_BUCKETS, registry=self.registry)

    def observe_engine(self, engine: LLMEngine) -> None:
        """Refresh the gauges from `engine` (on the engine loop's thread)."""
        waiting: set[str] = set()
        running: set[str] = set()
        for ve in engine.virtual_engines:
            waiting.update(seq.request_id for seq in ve.scheduler.waiting)
            running.update(seq.request_id for seq in ve.scheduler.running)
        self.waiting.set(len(waiting - running))
        self.running.set(len(running))
        self.kv_free_blocks.set(engine.num_free_kv_blocks)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
