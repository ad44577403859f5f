"""HAPI's rest-hook delivery form: `PUT {endpoint}/{type}/{id}` with the resource as body."""

from __future__ import annotations

import json

from starlette.testclient import TestClient

from clinragen_fhir.webhook import WebhookConfig, make_app
from tests.unit.test_webhook import OBS, SECRET, MemorySeen


def client() -> tuple[TestClient, list[tuple[str, int]]]:
    queue: list[tuple[str, int]] = []
    app = make_app(WebhookConfig(secret=SECRET, debounce_s=2), MemorySeen(),
                   lambda pid, countdown: queue.append((pid, countdown)))
    return TestClient(app), queue


def test_hapi_update_delivery_enqueues_and_answers_an_operation_outcome() -> None:
    http, queue = client()
    body = json.dumps(OBS).encode()
    r = http.put("/notify/Observation/o1", content=body,
                 headers={"X-Clinragen-Secret": SECRET.decode(),
                          "Content-Type": "application/fhir+json"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "information"
    assert queue == [("p1", 2)]
    again = http.put("/notify/Observation/o1", content=body,
                     headers={"X-Clinragen-Secret": SECRET.decode()})
    assert again.status_code == 200 and "duplicate" in again.json()["issue"][0]["diagnostics"]
    assert len(queue) == 1


def test_hapi_delivery_without_the_secret_is_refused() -> None:
    http, queue = client()
    r = http.put("/notify/Observation/o1", content=json.dumps(OBS).encode(),
                 headers={"X-Clinragen-Secret": "wrong-secret-wrong-secret"})
    assert r.status_code == 401 and r.json()["issue"][0]["code"] == "security"
    assert http.delete("/notify/Observation/o1").status_code == 401
    ok = http.delete("/notify/Observation/o1", headers={"X-Clinragen-Secret": SECRET.decode()})
    assert ok.status_code == 200
    assert queue == []
