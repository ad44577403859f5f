"""The broker settings that make a broker restart lose no task (docs/reliability.md section 3)."""

from __future__ import annotations

import pytest

from clinragen_fhir.config import Settings
from clinragen_fhir.worker.app import make_app


@pytest.mark.parametrize("url", ["amqp://guest:guest@127.0.0.1:5672//",
                                 "amqps://u:p@mq.example.org:5671/clinragen",
                                 "pyamqp://guest@localhost//"])
def test_rabbitmq_gets_publisher_confirms_durable_queue_persistent_messages(url: str) -> None:
    app = make_app(Settings(broker_url=url))
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    assert app.conf.task_default_delivery_mode == "persistent"
    queue = app.amqp.queues["clinragen"]
    assert queue.durable and not queue.auto_delete and queue.exchange.durable
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost


def test_redis_keeps_its_visibility_timeout_and_sweep() -> None:
    options = make_app(Settings()).conf.broker_transport_options
    assert options["visibility_timeout"] == Settings().worker.visibility_timeout_s
    assert options["unacked_restore_throttle"] == 1
    assert "confirm_publish" not in options
