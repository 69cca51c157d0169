"""Prometheus metrics of the HTTP API (`GET /metrics`), per pipeline and per model.

Counters and histograms are this ingress replica's (each replica serves its own `/metrics`;
Prometheus scrapes and sums them). The engine gauges are read from every model deployment's
`stats()` at scrape time; a deployment without `stats` (or one that does not answer within
`timeout_s`) is left out rather than failing the scrape.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("collab_ray.api")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# model server stats() key -> (gauge name, help)
ENGINE_GAUGES = {
    "sessions_open": ("collab_sessions_open", "Decode sessions open in the model's engine."),
    "kv_tokens": ("collab_kv_tokens", "KV-cache tokens in use in the model's engine."),
    "kv_capacity_tokens": ("collab_kv_capacity_tokens", "KV-cache token budget of the model's engine."),
    "queue_depth": ("collab_queue_depth", "Work waiting in the model's engine queue."),
    "running": ("collab_running", "Work the model's engine is running this step."),
}
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "collab_requests", "HTTP API requests by pipeline, endpoint and status.", ["pipeline", "endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "collab_time_to_first_token_seconds", "Time to the first streamed token.", ["pipeline"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "collab_e2e_request_latency_seconds", "End-to-end latency of answered requests.", ["pipeline", "endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("collab_prompt_tokens", "Prompt tokens of answered requests.", ["pipeline"], registry=r)
        self.generation_tokens = Counter("collab_generation_tokens", "Generated tokens of answered requests.", ["pipeline"], registry=r)
        self.model_calls = Counter("collab_model_calls", "Calls from a pipeline to a model.", ["pipeline", "model"], registry=r)
        self.model_prompt_tokens = Counter(
            "collab_model_prompt_tokens", "Tokens models read for a pipeline.", ["pipeline", "model"], registry=r
        )
        self.model_generation_tokens = Counter(
            "collab_model_generation_tokens", "Tokens models produced for a pipeline.", ["pipeline", "model"], registry=r
        )
        self.model_seconds = Counter(
            "collab_model_seconds", "Time pipelines waited on a model.", ["pipeline", "model"], registry=r
        )
        self.in_flight = Gauge("collab_requests_in_flight", "HTTP API requests being answered now.", registry=r)
        self.engine = {key: Gauge(name, help_, ["model"], registry=r) for key, (name, help_) in ENGINE_GAUGES.items()}

    def request_done(self, pipeline: str, endpoint: str, status: int) -> None:
        self.requests.labels(pipeline, endpoint, str(status)).inc()

    def answered(self, pipeline: str, endpoint: str, latency_s: float, results: list, prompt_tokens: int) -> None:
        """Record a request's latency, tokens and per-model calls from its `StrategyResult`s."""
        self.latency.labels(pipeline, endpoint).observe(latency_s)
        self.prompt_tokens.labels(pipeline).inc(prompt_tokens)
        self.generation_tokens.labels(pipeline).inc(sum(r.usage.completion_tokens for r in results))
        for r in results:
            for role, s in (r.meta.get("models") or {}).items():
                self.model_calls.labels(pipeline, role).inc(s.get("calls", 0))
                self.model_prompt_tokens.labels(pipeline, role).inc(s.get("prompt_tokens", 0))
                self.model_generation_tokens.labels(pipeline, role).inc(s.get("completion_tokens", 0))
                self.model_seconds.labels(pipeline, role).inc(s.get("latency_s", 0.0))

    async def refresh_engine(self, backends: dict, timeout_s: float = 2.0) -> None:
        """Set the engine gauges from each model deployment's `stats()` (skipped where absent)."""

        async def one(name, backend):
            handle = getattr(backend, "handle", None)
            try:
                if handle is not None:
                    stats = await asyncio.wait_for(handle.stats.remote(), timeout_s)
                elif hasattr(backend, "stats"):
                    stats = await asyncio.wait_for(backend.stats(), timeout_s)
                else:
                    return
            except Exception as e:  # no stats() yet, or the model is busy/down: leave its gauges out
                log.debug("no engine stats from model %s: %s", name, type(e).__name__)
                return
            if isinstance(stats, dict):
                for key, gauge in self.engine.items():
                    if isinstance(stats.get(key), (int, float)):
                        gauge.labels(name).set(stats[key])

        await asyncio.gather(*(one(n, b) for n, b in backends.items()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
