"""Missed Subscription events are recovered (issue 14, item 6): HAPI 8.8 offers no
`Subscription/<id>/$events`, so the receiver remembers each subscription's last event number
and time (RedisSeen, on a private redis-server); a gap in the numbers (deliveries the server
gave up on while the receiver was down) queues a poll from the last event seen, and a first
poll with no cursor resumes from the newest notification seen, not from a fixed look-back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from starlette.testclient import TestClient

from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.fhir.notifications import read_notification, resume_point
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.webhook import WebhookConfig, make_app
from clinragen_fhir.worker import tasks
from clinragen_fhir.worker.state import RedisSeen
from tests.unit.test_delivery_limit import private_redis

SECRET = b"0123456789abcdef-secret"
BASE = "http://127.0.0.1:9/fhir"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


@pytest.fixture()
def store(redis_url: str) -> RedisSeen:
    redis.Redis.from_url(redis_url).flushdb()
    return RedisSeen(redis_url)


def event(number: int, patient: str, stamp: str) -> dict[str, Any]:
    """An R4B/R5 (backport) event notification for one Observation of `patient`."""
    return {"resourceType": "Bundle", "type": "subscription-notification", "entry": [
        {"resource": {"resourceType": "SubscriptionStatus", "type": "event-notification",
                      "subscription": {"reference": "Subscription/labs"},
                      "notificationEvent": [{"eventNumber": str(number), "timestamp": stamp,
                                             "focus": {"reference": f"Observation/o{number}"}}]}},
        {"resource": {"resourceType": "Observation", "id": f"o{number}", "status": "final",
                      "subject": {"reference": f"Patient/{patient}"}}}]}


def heartbeat(count: int) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "subscription-notification", "entry": [
        {"resource": {"resourceType": "SubscriptionStatus", "type": "heartbeat",
                      "subscription": {"reference": "Subscription/labs"},
                      "eventsSinceSubscriptionStart": str(count)}}]}


def receiver(store: RedisSeen, recover: Any) -> tuple[TestClient, list[str]]:
    queue: list[str] = []
    app = make_app(WebhookConfig(secret=SECRET, debounce_s=1), store,
                   lambda pid, countdown: queue.append(pid), recover)
    return TestClient(app), queue


def post(client: TestClient, payload: dict[str, Any]) -> httpx.Response:
    return client.post("/notify", content=json.dumps(payload).encode(),
                       headers={"x-clinragen-secret": SECRET.decode()})


def test_a_gap_in_event_numbers_queues_a_poll_from_the_last_event(store: RedisSeen) -> None:
    polls: list[tuple[str, int]] = []
    client, queue = receiver(store, lambda since, missed: polls.append((since, missed)))
    assert post(client, event(1, "p1", "2026-03-01T10:00:00Z")).status_code == 202
    assert post(client, event(2, "p2", "2026-03-01T10:05:00+00:00")).status_code == 202
    assert polls == []  # consecutive: nothing missed
    # the receiver was down; events 3..5 were given up on by the server; 6 arrives
    assert post(client, event(6, "p6", "2026-03-01T12:00:00Z")).status_code == 202
    assert polls == [("2026-03-01T10:05:00.000Z", 3)]  # from event 2, the last one seen
    assert queue == ["p1", "p2", "p6"]
    assert store.last_seen() == "2026-03-01T12:00:00.000Z"
    # the server's retry of event 6 is a duplicate, and no second poll
    assert post(client, event(6, "p6", "2026-03-01T12:00:00Z")).json()["reason"] == "duplicate"
    assert len(polls) == 1
    # a heartbeat that counts more events than were delivered reveals a gap as well
    assert post(client, heartbeat(8)).status_code == 200
    assert polls[-1] == ("2026-03-01T12:00:00.000Z", 2)
    # a restarted server counts from 1 again: not a gap (and the count starts over)
    assert post(client, event(1, "p9", "2026-03-02T08:00:00Z")).status_code < 300
    assert post(client, event(2, "p9", "2026-03-02T08:01:00Z")).status_code < 300
    assert len(polls) == 2


def test_a_recovery_poll_that_cannot_be_queued_answers_503_and_the_retry_sees_the_gap(
        store: RedisSeen) -> None:
    calls: list[str] = []

    def down(since: str, missed: int) -> None:
        calls.append(since)
        if len(calls) == 1:
            raise ConnectionError("broker down")

    client, _ = receiver(store, down)
    post(client, event(1, "p1", "2026-03-01T10:00:00Z"))
    first = post(client, event(4, "p4", "2026-03-01T11:00:00Z"))
    assert first.status_code == 503 and first.headers["Retry-After"]
    retry = post(client, event(4, "p4", "2026-03-01T11:00:00Z"))
    assert retry.status_code < 300
    assert calls == ["2026-03-01T10:00:00.000Z"] * 2


def test_resume_point_prefers_event_times_then_arrival_less_a_margin() -> None:
    found = read_notification(event(3, "p", "2026-03-01T10:00:00+01:00"))
    assert resume_point(found) == "2026-03-01T09:00:00.000Z"
    plain = read_notification({"resourceType": "Observation", "id": "o", "meta": {
        "lastUpdated": "2026-03-01T10:00:00.123Z"}, "subject": {"reference": "Patient/p"}})
    assert resume_point(plain) == "2026-03-01T10:00:00.123Z"
    bare = read_notification({"resourceType": "Observation", "id": "o",
                              "subject": {"reference": "Patient/p"}})
    before = time.time()
    resumed = tasks._moment(resume_point(bare)).timestamp()
    assert before - 125 < resumed < before - 115


class Broker:
    def __init__(self) -> None:
        self.queued: list[str] = []

    def apply_async(self, args: tuple[str], countdown: int = 0, **_: Any) -> None:
        self.queued.append(args[0])


@pytest.fixture()
def poll(store: RedisSeen, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    kg = load_graph(None)
    settings = Settings(fhir={"base_url": BASE, "retries": 1}, state_url=redis_url)
    monkeypatch.setattr(tasks, "load_runtime", lambda: (settings, kg, RuleBaseline(kg)))
    asked: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        """Changes at 10:30 (p-old) and 11:30 (p-new); answers `_lastUpdated=ge...`."""
        since = tasks._moment(request.url.params["_lastUpdated"].removeprefix("ge"))
        asked.append(request.url.params["_lastUpdated"])
        found = [] if request.url.path.endswith("DocumentReference") else [
            {"resourceType": "Observation", "id": oid, "status": "final",
             "subject": {"reference": f"Patient/{pid}"},
             "meta": {"versionId": "1", "lastUpdated": at}}
            for oid, pid, at in (("o1", "p-old", "2026-03-01T10:30:00.000Z"),
                                 ("o2", "p-new", "2026-03-01T11:30:00.000Z"))
            if tasks._moment(at) >= since]
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": r} for r in found]})

    client = FhirEndpoint.client
    monkeypatch.setattr(FhirEndpoint, "client", lambda self, observer=None: client(
        self, transport=httpx.MockTransport(server), observer=observer))
    broker = Broker()
    monkeypatch.setattr(tasks.diagnose, "apply_async", broker.apply_async)
    return broker, asked


def test_recovery_poll_starts_at_the_last_event_not_the_cursor(poll: Any,
                                                               redis_url: str) -> None:
    broker, asked = poll
    from clinragen_fhir.worker.state import WorkerState

    WorkerState(redis_url).set_cursor(BASE, json.dumps({"since": "2026-03-01T11:00:00Z",
                                                        "boundary": []}))
    plain = tasks.poll_changes(debounce_s=1)
    assert broker.queued == ["p-new"]  # the cursor alone would never see p-old again
    time.sleep(1.1)
    recovered = tasks.poll_changes(debounce_s=1, since="2026-03-01T10:00:00.000Z")
    assert recovered["from"] == "2026-03-01T10:00:00.000Z"
    assert "p-old" in broker.queued
    assert asked[-1] == "ge2026-03-01T10:00:00.000Z"
    assert recovered["cursor"] >= plain["cursor"]  # the cursor never moves back


def test_first_poll_resumes_from_the_last_notification_seen(poll: Any,
                                                            store: RedisSeen) -> None:
    broker, _ = poll
    store.mark_seen("2026-03-01T10:00:00.000Z")  # the receiver's last event, then an outage
    result = tasks.poll_changes(debounce_s=1)  # no cursor yet; the look-back (1 day) is later
    assert result["from"] == "2026-03-01T10:00:00.000Z"
    assert broker.queued == ["p-new", "p-old"]
