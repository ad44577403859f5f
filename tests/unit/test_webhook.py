"""The Subscription receiver: authentication, size limit, R4 and R5 payloads, de-duplication."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from starlette.testclient import TestClient

from clinragen_fhir.fhir.notifications import patients_in
from clinragen_fhir.webhook import WebhookConfig, authenticate, make_app, sign

SECRET = b"0123456789abcdef-secret"


class MemorySeen:
    """SeenStore in memory (the real one is Redis SET NX EX; same contract)."""

    def __init__(self) -> None:
        self.keys: dict[str, float] = {}

    def add(self, key: str, ttl_s: int) -> bool:
        now = time.monotonic()
        if self.keys.get(key, 0) > now:
            return False
        self.keys[key] = now + ttl_s
        return True


@pytest.fixture()
def app_and_queue() -> tuple[TestClient, list[tuple[str, int]]]:
    queue: list[tuple[str, int]] = []
    app = make_app(WebhookConfig(secret=SECRET, max_body_bytes=64 * 1024), MemorySeen(),
                   lambda pid, countdown: queue.append((pid, countdown)))
    return TestClient(app), queue


OBS = {"resourceType": "Observation", "id": "o1", "status": "final",
       "code": {"text": "HbA1c"}, "subject": {"reference": "Patient/p1"}}
R5_BUNDLE = {"resourceType": "Bundle", "type": "subscription-notification", "entry": [
    {"resource": {"resourceType": "SubscriptionStatus", "type": "event-notification",
                  "subscription": {"reference": "Subscription/s1"},
                  "notificationEvent": [{"eventNumber": "7",
                                         "focus": {"reference": "Observation/o9"}}]}},
    {"resource": {**OBS, "id": "o9", "subject": {"reference": "Patient/p2"}}}]}


def signed(body: bytes, ts: float | None = None) -> dict[str, str]:
    stamp = str(int(ts if ts is not None else time.time()))
    return {"X-Clinragen-Timestamp": stamp, "X-Clinragen-Signature": sign(SECRET, stamp, body)}


def test_header_secret_accepts_and_enqueues_the_patient(app_and_queue: Any) -> None:
    client, queue = app_and_queue
    r = client.post("/notify", content=json.dumps(OBS),
                    headers={"X-Clinragen-Secret": SECRET.decode()})
    assert r.status_code == 202 and queue == [("p1", 30)]


def test_unauthenticated_forged_and_stale_are_rejected(app_and_queue: Any) -> None:
    client, queue = app_and_queue
    body = json.dumps(OBS).encode()
    assert client.post("/notify", content=body).status_code == 401
    assert client.post("/notify", content=body,
                       headers={"X-Clinragen-Secret": "guess"}).status_code == 401
    forged = signed(body)
    assert client.post("/notify", content=body + b" ", headers=forged).status_code == 401
    stale = signed(body, time.time() - 3600)
    assert client.post("/notify", content=body, headers=stale).status_code == 401
    assert queue == []


def test_signed_notification_is_accepted_once(app_and_queue: Any) -> None:
    client, queue = app_and_queue
    body = json.dumps(R5_BUNDLE).encode()
    headers = signed(body)
    first = client.post("/notify", content=body, headers=headers)
    replay = client.post("/notify", content=body, headers=headers)
    assert first.status_code == 202 and first.json()["accepted"] == 1
    assert replay.json() == {"accepted": 0, "reason": "duplicate"}
    assert queue == [("p2", 30)]


def test_burst_for_one_patient_enqueues_one_task(app_and_queue: Any) -> None:
    client, queue = app_and_queue
    for i in range(5):
        body = json.dumps({**OBS, "id": f"o{i}"})
        client.post("/notify", content=body, headers={"X-Clinragen-Secret": SECRET.decode()})
    assert queue == [("p1", 30)]


def test_oversized_and_malformed_bodies(app_and_queue: Any) -> None:
    client, queue = app_and_queue
    big = b"{" + b" " * (70 * 1024) + b"}"
    assert client.post("/notify", content=big, headers=signed(big)).status_code == 413
    bad = b"[1, 2]"
    assert client.post("/notify", content=bad, headers=signed(bad)).status_code == 400
    empty = client.post("/notify", content=b"", headers=signed(b""))
    assert empty.status_code == 200 and empty.json()["accepted"] == 0
    assert queue == []


def test_r4_backport_parameters_bundle() -> None:
    bundle = {"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {"resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/s"}},
            {"name": "events-since-subscription-start", "valueString": "3"}]}},
        {"resource": {"resourceType": "DocumentReference", "id": "d",
                      "subject": {"reference": "Patient/p3"}}}]}
    assert patients_in(bundle) == ({"p3"}, "Subscription/s#3")


def test_authenticate_never_accepts_without_credentials() -> None:
    assert authenticate({}, b"x", SECRET) == "no credentials"
    assert authenticate({"x-clinragen-timestamp": "x", "x-clinragen-signature": "y"}, b"",
                        SECRET) == "bad timestamp"
