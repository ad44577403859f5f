"""Polling loses no change to a broker outage (issue 13, item 1, the polling side).

`poll_changes` marked the patient's de-duplication key before it queued the task, as the webhook
did: with the broker down the publish failed, the key stayed for the debounce window, and the
next poll (which finds the same change again, the cursor not having moved) skipped the patient,
so the change was never diagnosed. It now claims the key, queues, then keeps it (RedisSeen, as
the webhook does), gives the key back when the publish fails and leaves the cursor where it was.
The state store is a private redis-server; the FHIR server and the broker are fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from kombu.exceptions import OperationalError

from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.worker import tasks
from clinragen_fhir.worker.state import CURSOR_KEY, RedisSeen
from tests.unit.test_delivery_limit import private_redis

BASE = "http://127.0.0.1:9/fhir"
DEBOUNCE_S = 300  # far longer than the test: a key left behind would skip the next poll


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


def observation(oid: str, patient: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "subject": {"reference": f"Patient/{patient}"},
            "meta": {"versionId": "1", "lastUpdated": "2026-01-02T03:04:05.000Z"}}


def server(request: httpx.Request) -> httpx.Response:
    """Two changed lab results (patients p-a and p-b), no changed notes."""
    rtype = request.url.path.removeprefix("/fhir").strip("/")
    found = [observation("o1", "p-a"), observation("o2", "p-b")] if rtype == "Observation" \
        else []
    return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                     "entry": [{"resource": r} for r in found]})


class Broker:
    """`diagnose.apply_async`, down for the first `down` publishes."""

    def __init__(self, down: int) -> None:
        self.down, self.queued = down, list[str]()

    def apply_async(self, args: tuple[str], countdown: int = 0, **_: Any) -> None:
        if self.down:
            self.down -= 1
            raise OperationalError("Error 111 connecting to broker:6379. Connection refused.")
        self.queued.append(args[0])


@pytest.fixture()
def poll(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[Broker], Any]:
    redis.Redis.from_url(redis_url).flushdb()
    kg = load_graph(None)
    settings = Settings(fhir={"base_url": BASE, "retries": 1}, state_url=redis_url)
    monkeypatch.setattr(tasks, "load_runtime", lambda: (settings, kg, RuleBaseline(kg)))
    client = FhirEndpoint.client
    monkeypatch.setattr(FhirEndpoint, "client", lambda self, observer=None: client(
        self, transport=httpx.MockTransport(server), observer=observer))

    def run(broker: Broker) -> Any:
        monkeypatch.setattr(tasks.diagnose, "apply_async", broker.apply_async)
        return tasks.poll_changes(debounce_s=DEBOUNCE_S)

    return run


def test_a_publish_failure_leaves_the_patient_unmarked_for_the_next_poll(
        poll: Callable[[Broker], Any], redis_url: str) -> None:
    down = Broker(down=1)
    with pytest.raises(tasks.PollIncomplete, match="queue unavailable") as failed:
        poll(down)
    assert failed.value.__cause__ is None  # the broker's error text (its host) is not chained
    assert down.queued == []
    r = redis.Redis.from_url(redis_url)
    assert not r.exists(RedisSeen.PREFIX + "patient:p-a")  # given back, not left "pending"
    assert not r.exists(RedisSeen.PREFIX + "patient:p-b")  # never claimed
    assert not r.hexists(CURSOR_KEY, BASE)  # the cursor did not move past the change

    up = Broker(down=0)
    result = poll(up)
    assert up.queued == ["p-a", "p-b"]  # the next poll queues both
    assert result["queued"] == 2
    assert r.get(RedisSeen.PREFIX + "patient:p-a") == b"1"  # kept for the debounce window
    assert 0 < r.ttl(RedisSeen.PREFIX + "patient:p-a") <= DEBOUNCE_S
    assert r.hexists(CURSOR_KEY, BASE)


def test_a_failure_after_some_publishes_keeps_those_and_frees_the_rest(
        poll: Callable[[Broker], Any], redis_url: str) -> None:
    class Flaky(Broker):
        def apply_async(self, args: tuple[str], countdown: int = 0, **_: Any) -> None:
            if args[0] == "p-b" and not self.queued.count("p-b") and self.down:
                self.down -= 1
                raise OperationalError("connection reset")
            self.queued.append(args[0])

    flaky = Flaky(down=1)
    with pytest.raises(tasks.PollIncomplete):
        poll(flaky)
    assert flaky.queued == ["p-a"]
    r = redis.Redis.from_url(redis_url)
    assert r.get(RedisSeen.PREFIX + "patient:p-a") == b"1"
    assert not r.exists(RedisSeen.PREFIX + "patient:p-b")
    result = poll(flaky)  # p-a is debounced (its task is queued), p-b is queued now
    assert flaky.queued == ["p-a", "p-b"] and result["queued"] == 1


def test_a_patient_being_queued_elsewhere_is_left_to_that_caller(
        poll: Callable[[Broker], Any], redis_url: str) -> None:
    """The webhook holds a "pending" claim on p-a: the poll leaves it (and its release) alone."""
    assert RedisSeen(redis_url).claim("patient:p-a", 120) == "new"
    up = Broker(down=0)
    assert poll(up)["queued"] == 1 and up.queued == ["p-b"]
    assert redis.Redis.from_url(redis_url).get(RedisSeen.PREFIX + "patient:p-a") == b"pending"
