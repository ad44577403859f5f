"""The Celery app, configured for at-least-once delivery with idempotent tasks.

acks_late + reject_on_worker_lost: a task is acknowledged only after it finished, so a worker
killed mid-task gives the task back to the queue; the report's lock and content fingerprint
(report lifecycle: one current report, a new version only when its content changes) make the
second run harmless. Redis redelivers unacknowledged tasks after `visibility_timeout`, which
must exceed the hard time limit of any task. A task whose worker dies on every delivery (a
record that runs it out of memory) would come back forever: tasks.DeadLetteringTask counts the
deliveries and dead-letters it after `worker.max_deliveries`.

With RabbitMQ (an amqp:// broker) a broker restart loses no task when the queue is durable and
the messages persistent (Celery's defaults, pinned here), and publishers wait for the broker's
confirm (`confirm_publish`): `send_task` returns only once RabbitMQ has taken the message over,
written to disk for a persistent message on a durable queue. A delivery unacknowledged when
the connection drops goes back to the queue; acks_late makes that every unfinished task.
Measured in tests/reliability/test_3_broker_restart.py (graceful stop and SIGKILL).

TLS to the broker and the result backend (rediss://, amqps://) verifies the certificate and the
host name (`broker_tls`): kombu's own defaults do neither for rediss:// and no host name check
for amqps://.

Tracing (`[tracing] enabled`, off by default) starts in each pool process (`worker_process_init`,
after the fork: the exporter's thread would not survive it): clinragen_fhir/tracing.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from clinragen_fhir.config import Settings
from clinragen_fhir.logs import hash_id

# keyword arguments that never hold a patient id (a poll's cursor, a backfill's run key),
# shown as they are; any other string argument is shown by its log hash
PLAIN_KWARGS = frozenset({"since", "backfill", "initial_lookback_days", "debounce_s"})


def task_reprs(args: Sequence[Any] = (),
               kwargs: Mapping[str, Any] | None = None) -> dict[str, str]:
    """`argsrepr`/`kwargsrepr` for a task message, to pass to every `apply_async`/`send_task`.

    Celery puts these in the message headers, and Flower, `celery inspect` and the worker's
    own log lines show them in place of the arguments: by default `repr(args)`, the patient's
    id in clear. Here each string argument (a patient id) is its `logs.hash_id`, as log lines
    carry it, so a task can still be joined with the logs."""
    def shown(key: str | None, value: Any) -> Any:
        if isinstance(value, str) and key not in PLAIN_KWARGS:
            return f"#{hash_id(value)}"
        if isinstance(value, list | tuple):  # a batch of patient ids (diagnose_batch)
            return [shown(key, v) for v in value]
        return value

    return {"argsrepr": repr(tuple(shown(None, v) for v in args)),
            "kwargsrepr": repr({k: shown(k, v) for k, v in (kwargs or {}).items()})}


def broker_tls(url: str, ca_file: Path | None = None) -> dict[str, Any] | None:
    """TLS options that verify the server's certificate (system CAs, or `ca_file`) and host
    name, for a rediss:// or amqps:// URL; None for any other.

    Without them kombu connects to rediss:// with CERT_NONE and to amqps:// without matching
    the host name, so anyone on the path could pose as the broker: read every task (patient
    ids) and queue their own. For amqps:// the name is the URL's host (None for a failover
    list: kombu then fills in the host it connects to)."""
    parts = urlsplit(url)
    ca = str(ca_file) if ca_file else None
    if parts.scheme == "rediss":  # redis-py's SSLConnection keywords (redis >= 4.x)
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True,
                "ssl_ca_certs": ca}
    if parts.scheme == "amqps":  # py-amqp's SSLTransport keywords
        return {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": ca,
                "server_hostname": None if ";" in url else parts.hostname}
    return None


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("clinragen_fhir", broker=settings.broker_url, backend=settings.result_backend,
                 include=["clinragen_fhir.worker.tasks"])
    w = settings.worker
    amqp = settings.broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # bounded: worker.max_deliveries
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_soft_time_limit=w.soft_time_limit_s,
        task_time_limit=w.time_limit_s,
        # kombu sweeps Redis's unacked set only every interval x throttle (10 s x 10) by default:
        # a dead worker's task came back up to 100 s after its visibility timeout. Throttle 1:
        # a sweep every 10 s (one ZRANGE), measured in tests/reliability/test_1_worker_kill.py.
        broker_transport_options={"confirm_publish": True} if amqp else {
            "visibility_timeout": w.visibility_timeout_s, "unacked_restore_throttle": 1},
        task_default_delivery_mode="persistent",  # RabbitMQ writes the message to disk
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue="clinragen",
    )
    if tls := broker_tls(settings.broker_url, settings.broker_ca_file):
        app.conf.broker_use_ssl = tls
    if settings.result_backend.startswith("rediss://"):
        app.conf.redis_backend_use_ssl = broker_tls(settings.result_backend,
                                                    settings.broker_ca_file)
    if w.poll_interval_s > 0:  # for servers without Subscriptions: run `celery beat` too
        app.conf.beat_schedule = {"poll-fhir-changes": {
            "task": "clinragen.poll", "schedule": float(w.poll_interval_s)}}
    return app


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _start_tracing(**_: Any) -> None:
    """OpenTelemetry in this pool process, when the settings turn it on: the Celery task and
    every httpx request it makes become spans of one trace (clinragen_fhir/tracing.py)."""
    from clinragen_fhir import tracing

    tracing.setup(Settings().tracing, "worker")


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_tracing(**_: Any) -> None:
    """The spans still batched in this pool process, exported before it exits."""
    from clinragen_fhir import tracing

    tracing.shutdown()


app = make_app()
