"""Prometheus metrics: tasks by outcome, latency, FHIR calls by status, model time, queue depth,
dead letters, token failures, and the webhook's requests, refusals and enqueue failures.

Celery's prefork children are separate processes, so the worker runs prometheus_client in
multiprocess mode: `clinragen-fhir worker` sets PROMETHEUS_MULTIPROC_DIR before this module is
first imported, and the parent serves the merged view. Labels never carry patient ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

TASKS = Counter("clinragen_tasks_total", "Diagnose tasks by outcome", ["outcome"])
TASK_SECONDS = Histogram("clinragen_task_seconds", "Diagnose task wall time",
                         buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
FHIR_CALLS = Counter("clinragen_fhir_requests_total", "FHIR requests by method and status",
                     ["method", "status"])
MODEL_SECONDS = Histogram("clinragen_model_seconds", "Predictor time per patient", ["method"],
                          buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30))
CDS_FEEDBACK = Counter("clinragen_cds_feedback_total", "CDS Hooks card feedback by outcome and "
                       "override reason", ["outcome", "reason"])
# What the alert rules (deploy/helm/clinragen/templates/metrics.yaml) watch, one metric each
DEAD_LETTERS = Counter("clinragen_dead_letters_total", "Tasks dead-lettered (retries spent, a "
                       "permanent error, a time limit, a worker lost on every delivery)", ["task"])
TOKEN_FAILURES = Counter("clinragen_token_failures_total", "Access-token failures: the token "
                         "endpoint unreachable, unavailable, refusing or answering no token, or "
                         "the FHIR server refusing the token (401/403)", ["reason"])
# The webhook receiver (its own process: `clinragen-fhir webhook --metrics-port`)
WEBHOOK_REQUESTS = Counter("clinragen_webhook_requests_total", "Webhook requests by outcome",
                           ["outcome"])
WEBHOOK_AUTH_FAILURES = Counter("clinragen_webhook_auth_failures_total", "Webhook requests "
                                "refused as unauthenticated, by reason", ["reason"])
WEBHOOK_ENQUEUE_FAILURES = Counter("clinragen_webhook_enqueue_failures_total", "Tasks the "
                                   "webhook could not queue (answered 503), by task", ["task"])


class QueueDepth(Collector):
    """Messages waiting in the broker queue, read at scrape time (Redis or RabbitMQ)."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self.broker_url, self.queue = broker_url, queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from kombu.connection import Connection

        gauge = GaugeMetricFamily("clinragen_queue_depth", "Messages waiting", labels=["queue"])
        try:
            with Connection(self.broker_url, connect_timeout=2) as conn:
                ok = conn.default_channel.queue_declare(self.queue, passive=True)
                gauge.add_metric([self.queue], float(ok.message_count))
        except Exception:  # broker down or queue not declared yet: report nothing, not a crash
            return
        yield gauge


    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The metric's name without asking the broker (a registry calls this on register)."""
        yield GaugeMetricFamily("clinragen_queue_depth", "Messages waiting", labels=["queue"])


def observe_fhir(method: str, status: int | None) -> None:
    """FhirClient observer: one count per HTTP exchange ('error' when there was no answer); a
    401/403 is a token failure too (the server refused the token we sent)."""
    FHIR_CALLS.labels(method, str(status) if status is not None else "error").inc()
    if status in (401, 403):
        TOKEN_FAILURES.labels(f"fhir-{status}").inc()


def token_failure(status: int | None, retryable: bool) -> None:
    """One failed token fetch (fhir/auth.py): `unreachable` (no answer), `unavailable` (408,
    429, 5xx), `refused` (any other status: a bad assertion, an unknown client or key) or
    `invalid` (an answer without a usable token, no token endpoint discovered)."""
    if status is None:
        reason = "unreachable" if retryable else "invalid"
    else:
        reason = "unavailable" if retryable else "refused"
    TOKEN_FAILURES.labels(reason).inc()


def serve(port: int, broker_url: str, queue: str, host: str = "127.0.0.1") -> Any:
    """Start the /metrics HTTP server in this (the parent) process, on `host`:`port`."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(QueueDepth(broker_url, queue))
    return start_http_server(port, addr=host, registry=registry)
