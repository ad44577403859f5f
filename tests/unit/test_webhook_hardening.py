"""Issue 13, items 1 and 5: the receiver loses no notification to a broker or store outage
(claim, queue, then keep; 503 on failure), and is hardened: FHIR patient ids only, a cap on
patients per notification, a bounded HMAC timestamp, canonical replay keys, the Subscriptions
Backport `notification-event` parts and id-only `fullUrl`s, and a body-digest fallback key."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from starlette.testclient import TestClient

from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.notifications import patients_in
from clinragen_fhir.webhook import (
    MAX_SKEW_S,
    SECRET_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookConfig,
    make_app,
    sign,
)

SECRET = b"0123456789abcdef-hardening"
HEADER = {SECRET_HEADER: SECRET.decode()}


class ClockStore:
    """An in-memory ClaimStore (and plain SeenStore) on a clock the test moves; it can be
    made to fail like a stopped Redis."""

    def __init__(self) -> None:
        self.now = 0.0
        self.keys: dict[str, tuple[str, float]] = {}
        self.down = False
        self.release_fails = False

    def _live(self, key: str) -> str | None:
        value = self.keys.get(key)
        return value[0] if value and value[1] > self.now else None

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("store down")

    def add(self, key: str, ttl_s: int) -> bool:
        self._check()
        if self._live(key) is not None:
            return False
        self.keys[key] = ("1", self.now + ttl_s)
        return True

    def claim(self, key: str, ttl_s: int) -> str:
        self._check()
        if (value := self._live(key)) is not None:
            return "pending" if value == "pending" else "done"
        self.keys[key] = ("pending", self.now + ttl_s)
        return "new"

    def keep(self, key: str, ttl_s: int) -> None:
        self._check()
        self.keys[key] = ("1", self.now + ttl_s)

    def release(self, key: str) -> None:
        self._check()
        if self.release_fails:
            raise ConnectionError("store down")
        self.keys.pop(key, None)


class Queue:
    """enqueue() that fails while `down` (or for the patients in `refuse`), like a broker."""

    def __init__(self) -> None:
        self.tasks: list[str] = []
        self.down = False
        self.refuse: set[str] = set()

    def __call__(self, patient_id: str, countdown: int) -> None:
        if self.down or patient_id in self.refuse:
            raise ConnectionError("broker down")
        self.tasks.append(patient_id)


def receiver(**config: Any) -> tuple[TestClient, ClockStore, Queue]:
    store, queue = ClockStore(), Queue()
    app = make_app(WebhookConfig(secret=SECRET, **config), store, queue)
    return TestClient(app, raise_server_exceptions=False), store, queue


def obs(patient: str, oid: str = "o1") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"text": "HbA1c"}, "subject": {"reference": f"Patient/{patient}"}}


def post(client: TestClient, payload: Any, headers: dict[str, str] | None = None) -> Any:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post("/notify", content=body, headers=headers or HEADER)


# -- item 1: nothing lost when the broker or the store is down -----------------------------------
def test_broker_down_answers_503_and_the_retry_is_queued() -> None:
    client, _store, queue = receiver()
    queue.down = True
    first = post(client, obs("p1"))
    assert first.status_code == 503 and first.headers["retry-after"]
    queue.down = False
    retry = post(client, obs("p1"))  # the FHIR server retries the very same notification
    assert retry.status_code == 202 and retry.json()["accepted"] == 1
    assert queue.tasks == ["p1"]
    assert post(client, obs("p1")).json()["reason"] == "duplicate"  # kept once queued


def test_store_down_answers_503_not_500() -> None:
    client, store, queue = receiver()
    store.down = True
    assert post(client, obs("p1")).status_code == 503
    store.down = False
    assert post(client, obs("p1")).status_code == 202 and queue.tasks == ["p1"]


def test_partial_queue_failure_queues_each_patient_exactly_once() -> None:
    client, _store, queue = receiver()
    bundle = {"resourceType": "Bundle", "type": "history",
              "entry": [{"resource": obs("p1", "o1")}, {"resource": obs("p2", "o2")}]}
    queue.refuse = {"p2"}
    assert post(client, bundle).status_code == 503
    queue.refuse = set()
    assert post(client, bundle).status_code == 202
    assert sorted(queue.tasks) == ["p1", "p2"]


def test_claims_left_by_a_failed_release_answer_503_until_they_expire() -> None:
    """The store failing right after the broker did: the claims cannot be given back, so they
    must not read as "duplicate" (that would drop the retry); they expire by themselves."""
    client, store, queue = receiver()
    queue.down, store.release_fails = True, True
    assert post(client, obs("p1")).status_code == 503
    queue.down, store.release_fails = False, False
    assert post(client, obs("p1")).status_code == 503  # pending, not "duplicate"
    store.now += 121  # the claim's time-to-live (CLAIM_TTL_S)
    assert post(client, obs("p1")).status_code == 202 and queue.tasks == ["p1"]


def test_hapi_put_delivery_gets_a_transient_503_outcome() -> None:
    client, _store, queue = receiver()
    queue.down = True
    r = client.put("/notify/Observation/o1", content=json.dumps(obs("p1")), headers=HEADER)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["issue"][0]["code"] == "transient"


# -- item 5: patient ids ---------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["Patient/..", "Patient/.", "Patient/p1?_format=xml",
                                 "Patient/p1#x", "Patient/" + "a" * 65, "Patient/a b",
                                 "Patient/a%2F..", "Patient/../Observation/o1",
                                 "Patient?identifier=x|1", "Patient/a..b"])
def test_invalid_patient_ids_are_refused(ref: str) -> None:
    payload = {**obs("x"), "subject": {"reference": ref}}
    assert patients_in(payload)[0] == set()
    client, _store, queue = receiver()
    answer = post(client, payload)
    assert answer.status_code == 200 and answer.json()["reason"] == "invalid patient id"
    assert queue.tasks == []


def test_invalid_patient_resource_id_is_refused() -> None:
    assert patients_in({"resourceType": "Patient", "id": ".."})[0] == set()
    assert patients_in({"resourceType": "Patient", "id": "A-1.b"})[0] == {"A-1.b"}


def test_valid_ids_in_relative_absolute_and_versioned_references() -> None:
    for ref, pid in [("Patient/A-1.b", "A-1.b"), ("Patient/p7/_history/2", "p7"),
                     ("https://fhir.example/fhir/Patient/p8", "p8"), ("Patient/" + "z" * 64,
                                                                     "z" * 64)]:
        assert patients_in({**obs("x"), "subject": {"reference": ref}})[0] == {pid}


def test_patients_per_notification_are_capped() -> None:
    client, _store, queue = receiver(max_patients=3)
    bundle = {"resourceType": "Bundle", "type": "history",
              "entry": [{"resource": obs(f"p{i}", f"o{i}")} for i in range(4)]}
    assert post(client, bundle).status_code == 413 and queue.tasks == []
    bundle["entry"] = bundle["entry"][:3]
    assert post(client, bundle).status_code == 202 and len(queue.tasks) == 3


# -- item 5: HMAC and replays ----------------------------------------------------------------
def signed(body: bytes, stamp: str | None = None) -> dict[str, str]:
    stamp = stamp if stamp is not None else str(int(time.time()))
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(SECRET, stamp, body)}


def test_one_byte_appended_to_a_signed_body_is_refused() -> None:
    client, _store, queue = receiver()
    body = json.dumps(obs("p1")).encode()
    headers = signed(body)
    for extra in (b" ", b"\n", b"}"):
        assert post(client, body + extra, headers).status_code == 401
    assert post(client, body, headers).status_code == 202
    assert post(client, body, headers).json()["reason"] == "duplicate"
    assert queue.tasks == ["p1"]


def test_replay_with_a_byte_more_is_still_a_duplicate_after_the_debounce() -> None:
    """The replay key is the body in canonical JSON: re-spacing it is the same notification."""
    client, store, queue = receiver(debounce_s=30)
    body = json.dumps(obs("p1")).encode()
    assert post(client, body).status_code == 202
    store.now += 31  # past the patient debounce, well within the replay window
    for variant in (body + b" ", body + b"\n", json.dumps(obs("p1"), indent=1).encode()):
        answer = post(client, variant)
        assert answer.json().get("reason") == "duplicate", answer.json()
    assert queue.tasks == ["p1"]


def test_a_timestamp_that_is_not_whole_seconds_is_refused() -> None:
    """`nan` passed the window check (every comparison with NaN is false): never stale."""
    client, _store, queue = receiver()
    body = json.dumps(obs("p1")).encode()
    for stamp in ("nan", "NaN", "1e12", f" {int(time.time())}", f"{int(time.time())}.0"):
        assert post(client, body, signed(body, stamp)).status_code == 401, stamp
    assert post(client, body, signed(body, str(int(time.time()) - MAX_SKEW_S - 5))) \
        .status_code == 401
    assert queue.tasks == []


def test_require_hmac_refuses_the_header_secret() -> None:
    client, _store, queue = receiver(require_hmac=True)
    body = json.dumps(obs("p1")).encode()
    assert post(client, body, HEADER).status_code == 401
    assert post(client, body, signed(body)).status_code == 202 and queue.tasks == ["p1"]


def test_require_hmac_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """[webhook] settings by environment (CLINRAGEN_WEBHOOK__*, as every setting); the old
    single-underscore names are refused, not ignored (tests/unit/test_webhook_settings.py)."""
    monkeypatch.setenv("CLINRAGEN_WEBHOOK_SECRET", "a-real-webhook-secret-0123456789")
    monkeypatch.setenv("CLINRAGEN_WEBHOOK__REQUIRE_HMAC", "1")
    monkeypatch.setenv("CLINRAGEN_WEBHOOK__MAX_PATIENTS", "7")
    config = WebhookConfig.from_settings(Settings().webhook)
    assert config.require_hmac and config.max_patients == 7


def test_replay_window_must_fit_in_the_dedupe_ttl() -> None:
    with pytest.raises(ValueError, match="dedupe_ttl_s"):
        WebhookConfig(secret=SECRET, dedupe_ttl_s=MAX_SKEW_S)


# -- item 5: Subscriptions Backport payloads -------------------------------------------------
def backport(events: list[tuple[str, str, str | None]], entries: list[dict[str, Any]],
             sub: str | None = "Subscription/s1") -> dict[str, Any]:
    """An R4 Backport notification: a Parameters status with `notification-event` parts."""
    params: list[dict[str, Any]] = [{"name": "status", "valueCode": "active"},
                                    {"name": "type", "valueCode": "event-notification"}]
    if sub:
        params.insert(0, {"name": "subscription", "valueReference": {"reference": sub}})
    for number, focus, context in events:
        parts = [{"name": "event-number", "valueString": number},
                 {"name": "focus", "valueReference": {"reference": focus}}]
        if context:
            parts.append({"name": "additional-context", "valueReference": {"reference": context}})
        params.append({"name": "notification-event", "part": parts})
    return {"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters",
                                               "parameter": params}}, *entries]}


def test_backport_id_only_patient_focus_names_the_patient() -> None:
    payload = backport([("12", "Patient/p5", None)],
                       [{"fullUrl": "https://fhir.example/fhir/Patient/p5"}])
    assert patients_in(payload) == ({"p5"}, "Subscription/s1#12")


def test_backport_id_only_observation_focus_with_patient_context() -> None:
    payload = backport([("3", "Observation/o1", "Patient/p6")],
                       [{"fullUrl": "https://fhir.example/fhir/Observation/o1"}])
    assert patients_in(payload) == ({"p6"}, "Subscription/s1#3")


def test_backport_full_resource_focus_is_followed_to_its_subject() -> None:
    payload = backport([("4", "Observation/o1", None)], [
        {"fullUrl": "https://fhir.example/fhir/Observation/o1", "resource": obs("p7")}])
    assert patients_in(payload) == ({"p7"}, "Subscription/s1#4")


def test_id_only_entries_name_patients_by_full_url() -> None:
    """R4B/R5 id-only: a SubscriptionStatus, then entries that carry only a fullUrl."""
    payload = {"resourceType": "Bundle", "type": "subscription-notification", "entry": [
        {"resource": {"resourceType": "SubscriptionStatus", "type": "event-notification",
                      "subscription": {"reference": "Subscription/s2"},
                      "notificationEvent": [{"eventNumber": "9"}]}},
        {"fullUrl": "https://fhir.example/fhir/Patient/p8"},
        {"fullUrl": "https://fhir.example/fhir/Patient/..%2F"},
        {"fullUrl": "https://fhir.example/fhir/Observation/o3"}]}
    assert patients_in(payload) == ({"p8"}, "Subscription/s2#9")


def test_r5_additional_context_names_the_patient() -> None:
    payload = {"resourceType": "Bundle", "type": "subscription-notification", "entry": [
        {"resource": {"resourceType": "SubscriptionStatus",
                      "subscription": {"reference": "Subscription/s3"},
                      "notificationEvent": [{"eventNumber": 5,
                                             "focus": {"reference": "Observation/o4"},
                                             "additionalContext": [
                                                 {"reference": "Patient/p9"}]}]}}]}
    assert patients_in(payload) == ({"p9"}, "Subscription/s3#5")


@pytest.mark.parametrize("sub", [None, "Subscription/s1"])
def test_status_without_subscription_or_event_number_falls_back_to_the_body(
        sub: str | None) -> None:
    """Two different notifications whose status lacks a subscription or an event number are
    not duplicates of each other (they shared the key "#" before)."""
    client, _store, queue = receiver()
    for pid in ("pa", "pb"):
        status: dict[str, Any] = {"resourceType": "SubscriptionStatus",
                                  "notificationEvent": [{"focus": {"reference": f"Patient/{pid}"}}]}
        if sub:
            status["subscription"] = {"reference": sub}
        payload = {"resourceType": "Bundle", "type": "subscription-notification",
                   "entry": [{"resource": status}]}
        assert patients_in(payload) == ({pid}, "")
        assert post(client, payload).status_code == 202
    assert queue.tasks == ["pa", "pb"]
