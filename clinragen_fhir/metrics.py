"""Prometheus metrics: tasks by outcome, latency, FHIR calls by status, model time, queue depth.

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


def observe_fhir(method: str, status: int | None) -> None:
    """FhirClient observer: one count per HTTP exchange ('error' when there was no answer)."""
    FHIR_CALLS.labels(method, str(status) if status is not None else "error").inc()


def serve(port: int, broker_url: str, queue: str, host: str = "127.0.0.1") -> Any:
    """Start the /metrics HTTP server in this (the parent) process, on `host`:`port`."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(QueueDepth(broker_url, queue))
    return start_http_server(port, addr=host, registry=registry)
