"""The Celery app, configured for at-least-once delivery with idempotent tasks.

acks_late + reject_on_worker_lost: a task is acknowledged only after it finished, so a worker
killed mid-task gives the task back to the queue; the report's conditional create makes the
second run harmless. Redis redelivers unacknowledged tasks after `visibility_timeout`, which
must exceed the hard time limit of any task.

With RabbitMQ (an amqp:// broker) a broker restart loses no task when the queue is durable and
the messages persistent (Celery's defaults, pinned here), and publishers wait for the broker's
confirm (`confirm_publish`): `send_task` returns only once RabbitMQ has taken the message over,
written to disk for a persistent message on a durable queue. A delivery unacknowledged when
the connection drops goes back to the queue; acks_late makes that every unfinished task.
Measured in tests/reliability/test_3_broker_restart.py (graceful stop and SIGKILL).
"""

from __future__ import annotations

from celery import Celery

from clinragen_fhir.config import Settings


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("clinragen_fhir", broker=settings.broker_url, backend=settings.result_backend,
                 include=["clinragen_fhir.worker.tasks"])
    w = settings.worker
    amqp = settings.broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
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
    if w.poll_interval_s > 0:  # for servers without Subscriptions: run `celery beat` too
        app.conf.beat_schedule = {"poll-fhir-changes": {
            "task": "clinragen.poll", "schedule": float(w.poll_interval_s)}}
    return app


app = make_app()
