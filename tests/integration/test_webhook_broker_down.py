"""Issue 13, item 1: a notification that arrives while the broker is down is not lost.

The receiver used to set its de-duplication keys before queueing: with the broker down it
answered 500, the FHIR server retried, got 200 "duplicate", and the notification was gone. Here
a real Redis broker (a private redis-server on its own port, started and stopped by the test)
is stopped mid-run: notifications sent meanwhile must get 503, and once the broker is back the
FHIR server's retries must queue them, so that every patient ends with exactly one queued task.
The receiver is the production wiring (`create_app`: Settings, the Redis state store and the
`diagnose` task's publish), with the publish pointed at the private broker.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from clinragen_fhir.config import Settings
from clinragen_fhir.worker.app import make_app as make_celery

pytestmark = pytest.mark.integration

SECRET = "broker-down-webhook-secret-0123456789"
QUEUE = "clinragen"  # task_default_queue


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


class PrivateRedis:
    """A redis-server on its own loopback port and directory, with an fsync-always AOF so a
    graceful stop and start keeps what was queued (as deploy/redis/start's persistence does)."""

    def __init__(self, root: Path) -> None:
        self.port, self.dir = _free_port(), root / "redis"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self) -> bool:
        return subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                              text=True, timeout=10).stdout.strip() == "PONG"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
             str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.dir / "redis.log")])
        _wait(f"redis on {self.port}", self.ping)

    def stop(self) -> None:
        """SHUTDOWN, waited for: the port is closed when this returns."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)  # redis-server shuts down cleanly on TERM
        self.proc.wait(30)
        self.proc = None
        _wait(f"redis on {self.port} to stop", lambda: not self.ping())

    def queued(self) -> Counter[str]:
        """Patients of the diagnose tasks on the broker queue (kombu's JSON envelope)."""
        import redis

        raw = redis.Redis.from_url(self.url(0)).lrange(QUEUE, 0, -1)
        patients: Counter[str] = Counter()
        for message in raw:
            envelope = json.loads(message)
            assert envelope["headers"]["task"] == "clinragen.diagnose"
            args = json.loads(base64.b64decode(envelope["body"]))[0]
            patients[args[0]] += 1
        return patients


@pytest.fixture()
def redis_factory(tmp_path: Path) -> Iterator[Callable[[str], PrivateRedis]]:
    started: list[PrivateRedis] = []

    def make(name: str) -> PrivateRedis:
        server = PrivateRedis(tmp_path / name)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def _receiver(monkeypatch: pytest.MonkeyPatch, broker: PrivateRedis,
              state: PrivateRedis) -> TestClient:
    """create_app() as `clinragen-fhir webhook` runs it, on the private servers."""
    from clinragen_fhir import webhook
    from clinragen_fhir.worker import tasks

    monkeypatch.setenv("CLINRAGEN_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("CLINRAGEN_WEBHOOK__DEBOUNCE_S", "1")
    monkeypatch.setenv("CLINRAGEN_BROKER_URL", broker.url(0))
    monkeypatch.setenv("CLINRAGEN_RESULT_BACKEND", broker.url(1))
    monkeypatch.setenv("CLINRAGEN_STATE_URL", state.url(4))
    celery = make_celery(Settings())  # the worker's own Celery configuration

    def publish(args: tuple[Any, ...], **options: Any) -> None:  # create_app's options kept
        celery.send_task("clinragen.diagnose", args, **options)

    monkeypatch.setattr(tasks.diagnose, "apply_async", publish)
    return TestClient(webhook.create_app(), raise_server_exceptions=False)


def _notification(pid: str) -> bytes:
    return json.dumps({"resourceType": "Observation", "id": f"obs-{pid}", "status": "final",
                       "meta": {"versionId": "1"}, "code": {"text": "HbA1c"},
                       "subject": {"reference": f"Patient/{pid}"}}).encode()


def _send(client: TestClient, pid: str) -> int:
    """One delivery as HAPI makes it: PUT {endpoint}/Observation/{id} with the secret header."""
    return client.put(f"/notify/Observation/obs-{pid}", content=_notification(pid),
                      headers={"X-Clinragen-Secret": SECRET,
                               "Content-Type": "application/fhir+json"}).status_code


def _outage_run(client: TestClient, broker: PrivateRedis) -> tuple[dict[str, list[int]], float]:
    """Five notifications, the broker stopped, five more, the broker back; then the FHIR
    server's redelivery of every notification (the retry of a 503, or a repeat of a 200),
    and up to two more retries of any answered neither 2xx nor "duplicate". Returns the
    answers per patient and the seconds the five notifications during the outage took."""
    before, during = [f"bd-{i}" for i in range(5)], [f"bd-{i}" for i in range(5, 10)]
    answers: dict[str, list[int]] = {pid: [_send(client, pid)] for pid in before}
    broker.stop()
    t0 = time.monotonic()
    for pid in during:
        answers[pid] = [_send(client, pid)]
    outage_s = time.monotonic() - t0
    broker.start()
    for pid in before + during:
        answers[pid].append(_send(client, pid))
        while answers[pid][-1] >= 300 and len(answers[pid]) < 4:
            time.sleep(1)
            answers[pid].append(_send(client, pid))
    return answers, outage_s


def test_broker_stopped_mid_run_loses_no_notification(
        monkeypatch: pytest.MonkeyPatch, redis_factory: Callable[[str], PrivateRedis]) -> None:
    """Broker and state store on separate Redis servers; the broker's is stopped mid-run."""
    broker, state = redis_factory("broker"), redis_factory("state")
    client = _receiver(monkeypatch, broker, state)
    answers, outage_s = _outage_run(client, broker)
    assert broker.queued() == Counter({pid: 1 for pid in answers}), answers  # none lost
    assert [a[0] for a in answers.values()] == [200] * 5 + [503] * 5, answers
    assert all(a[-1] == 200 for a in answers.values()), answers
    assert outage_s < 20, f"a publish to a stopped broker must fail fast ({outage_s:.0f} s)"


def test_one_redis_for_broker_and_state_stopped_mid_run_loses_no_notification(
        monkeypatch: pytest.MonkeyPatch, redis_factory: Callable[[str], PrivateRedis]) -> None:
    """The default deployment: one Redis is broker and state store; it is stopped mid-run."""
    shared = redis_factory("shared")
    client = _receiver(monkeypatch, shared, shared)
    answers, outage_s = _outage_run(client, shared)
    assert shared.queued() == Counter({pid: 1 for pid in answers}), answers
    assert [a[0] for a in answers.values()] == [200] * 5 + [503] * 5, answers
    assert all(a[-1] == 200 for a in answers.values()), answers
    assert outage_s < 20, f"a publish to a stopped broker must fail fast ({outage_s:.0f} s)"
