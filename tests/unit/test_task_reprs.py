"""Task messages show hashed patient ids: Flower and `celery inspect` show argsrepr/kwargsrepr."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Retry
from click.testing import CliRunner

from clinragen_fhir.cli import main
from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.errors import FhirUnavailable
from clinragen_fhir.logs import hash_id
from clinragen_fhir.worker import app as app_module
from clinragen_fhir.worker import tasks
from clinragen_fhir.worker.app import task_reprs
from clinragen_fhir.worker.state import DeadLetter

PID = "patient-secret-4711"


@pytest.fixture
def memory_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Celery]:
    """The project's app sends through a memory broker; the test reads the messages back."""
    fresh = Celery("reprs-test", broker="memory://", backend="cache+memory://")
    fresh.conf.task_default_queue = "clinragen"
    monkeypatch.setattr(app_module.app, "send_task", fresh.send_task)
    yield fresh
    fresh.close()


def headers_sent(fresh: Celery) -> list[dict[str, Any]]:
    out = []
    with fresh.connection_for_read() as conn:
        queue = conn.SimpleQueue("clinragen")
        while queue.qsize():
            message = queue.get(timeout=1)
            out.append(dict(message.headers))
            message.ack()
        queue.close()
    return out


def assert_hashed(headers: list[dict[str, Any]], count: int) -> None:
    assert len(headers) == count
    for h in headers:
        assert PID not in h["argsrepr"] and PID not in h["kwargsrepr"]
        assert hash_id(PID) in h["argsrepr"]


def test_reprs_hash_string_arguments_and_keep_plain_keywords() -> None:
    reprs = task_reprs((PID,), {"backfill": "run-1", "patient_id": PID})
    assert reprs == {"argsrepr": f"('#{hash_id(PID)}',)",
                     "kwargsrepr": f"{{'backfill': 'run-1', 'patient_id': '#{hash_id(PID)}'}}"}
    assert task_reprs((), {"since": "2025-01-01T00:00:00Z"})["kwargsrepr"] == (
        "{'since': '2025-01-01T00:00:00Z'}")


def test_cli_diagnose_sends_hashed_ids(memory_app: Celery,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINRAGEN_BROKER_URL", "memory://")
    result = CliRunner().invoke(main, ["diagnose", PID])
    assert result.exit_code == 0, result.output
    assert_hashed(headers_sent(memory_app), 1)


def test_poll_queueing_sends_hashed_ids(memory_app: Celery) -> None:
    class Seen:
        def claim(self, key: str, ttl: int) -> str:
            return "new"

        def keep(self, key: str, ttl: int | None = None) -> None:
            pass

    assert tasks._queue_changed(Seen(), [PID], 0) == 1  # type: ignore[arg-type]
    assert_hashed(headers_sent(memory_app), 1)


def test_dead_letter_requeue_sends_hashed_ids(memory_app: Celery,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    letter = DeadLetter("abc", "clinragen.diagnose", [PID], "boom", 0.0, 3)

    class State:
        def __init__(self, url: str) -> None:
            pass

        def take(self, letter_id: str) -> DeadLetter:
            return letter

    monkeypatch.setattr("clinragen_fhir.worker.state.WorkerState", State)
    monkeypatch.setenv("CLINRAGEN_BROKER_URL", "memory://")
    result = CliRunner().invoke(main, ["dlq", "requeue", "abc"])
    assert result.exit_code == 0, result.output
    assert_hashed(headers_sent(memory_app), 1)


def test_a_retry_sends_hashed_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's retry re-sends the task without the first message's argsrepr."""
    sent: dict[str, Any] = {}

    def retry(**options: Any) -> Exception:
        sent.update(options)
        return Retry()

    def unavailable(*_: Any, **__: Any) -> None:
        raise FhirUnavailable("down")

    monkeypatch.setattr(tasks, "load_runtime", lambda: (Settings(), None, None))
    monkeypatch.setattr(tasks, "WorkerState", lambda url: None)
    monkeypatch.setattr(tasks, "diagnose_patient", unavailable)
    monkeypatch.setattr(tasks.diagnose, "retry", retry)
    tasks.diagnose.apply((PID,), {"backfill": "run-1"})
    assert sent["argsrepr"] == f"('#{hash_id(PID)}',)"
    assert sent["kwargsrepr"] == "{'backfill': 'run-1'}"


def test_webhook_sends_hashed_ids(memory_app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    from clinragen_fhir import webhook

    hooks: dict[str, Any] = {}

    def capture(config: Any, seen: Any, enqueue: Any, recover: Any) -> None:
        hooks.update(enqueue=enqueue, recover=recover)

    monkeypatch.setattr(webhook, "make_app", capture)
    monkeypatch.setattr(webhook.WebhookConfig, "from_settings",
                        classmethod(lambda cls, settings: None))
    monkeypatch.setattr(Settings, "check_site_secrets", lambda self: None)
    monkeypatch.setattr(webhook, "RedisSeen", lambda url: None)
    webhook.create_app()
    hooks["enqueue"](PID, 0)
    hooks["recover"]("2025-01-01T00:00:00Z", 1)
    first, poll = headers_sent(memory_app)
    assert_hashed([first], 1)
    assert poll["kwargsrepr"] == "{'since': '2025-01-01T00:00:00Z'}"


def test_diagnose_all_in_batches_sends_batch_tasks_with_hashed_ids(
        memory_app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """`diagnose-all --batch 2`: clinragen.diagnose_batch tasks of two patients (the last of
    one), every id in argsrepr as its log hash."""
    from clinragen_fhir import cli

    class Checkpoints:
        def __init__(self, url: str) -> None:
            pass

        def backfill_done(self, run: str) -> set[str]:
            return set()

    monkeypatch.setenv("CLINRAGEN_BROKER_URL", "memory://")
    monkeypatch.setattr(cli, "_patient_ids", lambda *a: [PID, f"{PID}-2", f"{PID}-3"])
    monkeypatch.setattr("clinragen_fhir.worker.state.WorkerState", Checkpoints)
    result = CliRunner().invoke(main, ["diagnose-all", "--batch", "2"])
    assert result.exit_code == 0, result.output
    headers = headers_sent(memory_app)
    assert [h["task"] for h in headers] == ["clinragen.diagnose_batch"] * 2
    assert all(PID not in h["argsrepr"] and hash_id(PID) in h["argsrepr"] for h in headers[:1])
    assert all(PID not in h["argsrepr"] for h in headers)
