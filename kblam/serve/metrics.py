"""Prometheus metrics (prometheus_client, one registry per app): requests, latency, KB size, queue, batches."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kblam_http_requests", "HTTP requests answered, by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("kblam_http_request_duration_seconds", "Time to the end of each response, by route",
                                 ["route"], buckets=_SECONDS, registry=r)
        self.kb_triples = Gauge("kblam_kb_triples", "Triples in the served KB", registry=r)
        self.kb_version = Gauge("kblam_kb_version", "The served KB's version (its store generation)", registry=r)
        self.queue_depth = Gauge("kblam_queue_depth", "Questions waiting for a batch", registry=r)
        self.batch_questions = Histogram("kblam_batch_questions", "Questions answered per batch (micro-batching)",
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_seconds = Histogram("kblam_batch_duration_seconds", "Time to answer one batch",
                                       buckets=_SECONDS, registry=r)
        self.kb_writes = Counter("kblam_kb_writes", "Committed KB writes, by kind", ["kind"], registry=r)

    def batch(self, questions: int, seconds: float) -> None:
        self.batch_questions.observe(questions)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response and its duration by route template (not the raw path: bounded labels)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
