"""`diagnose_batch` (issue 17, item 1): several patients per task, each as `diagnose` would be.

Run eagerly against a fake FHIR server (httpx.MockTransport, batches through tests/fhir_batch.py)
and an in-memory state store (tests/unit/test_log_grep.FakeState). A patient's final error
dead-letters that patient alone as a `diagnose` task; a transient one sends that patient on in a
new batch message with its retry count one up; a redelivered batch (its worker died) is split
into one `diagnose` task per patient; nothing is written twice.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest

from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.logs import hash_id
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.worker import tasks
from clinragen_fhir.worker.app import task_reprs
from tests.fhir_batch import batching
from tests.observations import a1c
from tests.unit.test_log_grep import FakeState

BASE = "http://127.0.0.1:9/fhir"
KG = load_graph(None)


class Ward:
    """Patients p0, p1, ... with one HbA1c each; `gone` answers 404, `flaky` 503; reports kept."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.transactions = 0
        self.readings: dict[str, dict[str, Any]] = {}  # one effective time for every run

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir").strip("/")
        searchset: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if request.method == "POST":
            self.transactions += 1
            out = []
            for entry in json.loads(request.content)["entry"]:
                resource, url = entry["resource"], entry["request"]["url"]
                if resource["resourceType"] == "DiagnosticReport":
                    rid = next((i for i, r in self.reports.items()
                                if r["identifier"][0]["value"] == url.rsplit("|", 1)[-1]),
                               str(next(self.ids)))
                    self.reports[rid] = {**resource, "id": rid, "meta": {"versionId": "1"}}
                    out.append({"response": {"location": f"DiagnosticReport/{rid}/_history/1"}})
                else:
                    out.append({"response": {"location": f"{resource['resourceType']}/x"}})
            return httpx.Response(200, json={"resourceType": "Bundle",
                                             "type": "transaction-response", "entry": out})
        pid = path.split("/")[1] if path.startswith("Patient/") else \
            str(request.url.params.get("patient", request.url.params.get("subject", "")))
        pid = pid.removeprefix("Patient/")
        if pid == "gone":
            return httpx.Response(404, json={"resourceType": "OperationOutcome"})
        if pid == "flaky":
            return httpx.Response(503, json={"resourceType": "OperationOutcome"})
        if path.startswith("Patient/"):
            return httpx.Response(200, json={"resourceType": "Patient", "id": pid,
                                             "gender": "female", "birthDate": "1960-01-01"})
        if path == "Observation":
            reading = self.readings.setdefault(pid, {**a1c(pid, 7.4, 20, f"o-{pid}"),
                                                     "meta": {"versionId": "1"}})
            return httpx.Response(200, json={**searchset, "entry": [{"resource": reading}]})
        if path == "DiagnosticReport":
            mine = [r for r in self.reports.values()
                    if r["subject"]["reference"] == f"Patient/{pid}"]
            return httpx.Response(200, json={**searchset,
                                             "entry": [{"resource": r} for r in mine]})
        return httpx.Response(200, json=searchset)


@pytest.fixture()
def worker(monkeypatch: pytest.MonkeyPatch) -> tuple[Ward, FakeState, list[dict[str, Any]]]:
    """The task's runtime on the fake server and store; messages it would publish, kept."""
    ward, state = Ward(), FakeState()
    settings = Settings(fhir={"base_url": BASE, "retries": 0},
                        worker={"max_retries": 2, "retry_backoff_s": 0.01})
    monkeypatch.setattr(tasks, "load_runtime", lambda: (settings, KG, RuleBaseline(KG)))
    monkeypatch.setattr(tasks, "WorkerState", lambda url: state)
    client = FhirEndpoint.client
    monkeypatch.setattr(FhirEndpoint, "client", lambda self, transport=None, observer=None:
                        client(self, transport=httpx.MockTransport(batching(ward.handler)),
                               observer=observer))
    sent: list[dict[str, Any]] = []
    for task in (tasks.diagnose, tasks.diagnose_batch):
        monkeypatch.setattr(task, "apply_async", lambda args, kwargs=None, _t=task.name, **o:
                            sent.append({"task": _t, "args": args, "kwargs": kwargs, **o}))
    return ward, state, sent


def test_a_batch_writes_each_report_once_and_letters_a_final_error_alone(
        worker: tuple[Ward, FakeState, list[dict[str, Any]]]) -> None:
    ward, state, sent = worker
    result = tasks.diagnose_batch.apply((["p0", "gone", "p1"],)).get()
    assert [o["status"] for o in result["outcomes"]] == ["written", "written"]
    assert result["failed"] == 1 and result["retried"] == 0 and sent == []
    assert len(ward.reports) == 2
    assert [task for task, _ in state.letters] == ["clinragen.diagnose"]  # the 404, alone
    assert "HTTP 404" in state.letters[0][1]
    again = tasks.diagnose_batch.apply((["p0", "p1"],)).get()  # a re-run: nothing new
    assert [o["status"] for o in again["outcomes"]] == ["exists", "exists"]
    assert len(ward.reports) == 2
    assert all(set(o["timings"]) >= {"fhir_read_s", "encode_s", "predict_s", "write_s"}
               for o in result["outcomes"])


def test_a_transient_failure_goes_on_alone_in_a_new_batch_message(
        worker: tuple[Ward, FakeState, list[dict[str, Any]]]) -> None:
    _, state, sent = worker
    result = tasks.diagnose_batch.apply((["p0", "flaky"],), {"backfill": "run-1"}).get()
    assert result["retried"] == 1 and len(result["outcomes"]) == 1
    [message] = sent
    assert message["task"] == "clinragen.diagnose_batch" and message["args"] == (["flaky"],)
    assert message["retries"] == 1 and message["countdown"] > 0
    assert message["kwargs"] == {"backfill": "run-1"}
    assert "flaky" not in message["argsrepr"]  # the ids go as their log hashes
    assert state.letters == []
    # the retries spent (max_retries 2: the third run is the last): lettered alone
    last = tasks.diagnose_batch.apply((["flaky"],), retries=2).get()
    assert last["failed"] == 1 and [t for t, _ in state.letters] == ["clinragen.diagnose"]


def test_a_redelivered_batch_is_split_into_single_tasks(
        worker: tuple[Ward, FakeState, list[dict[str, Any]]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ward, state, sent = worker
    monkeypatch.setattr(state, "count_delivery", lambda *a: 2)  # its worker died once
    result = tasks.diagnose_batch.apply((["p0", "p1"],), {"backfill": "run-1"}).get()
    assert result == {"outcomes": [], "split": 2} and ward.reports == {}
    assert [(m["task"], m["args"]) for m in sent] == [("clinragen.diagnose", ("p0",)),
                                                      ("clinragen.diagnose", ("p1",))]
    assert all(m["kwargs"] == {"backfill": "run-1"} for m in sent)
    # past max_deliveries a batch of one is dead-lettered as that patient's diagnose task
    monkeypatch.setattr(state, "count_delivery", lambda *a: 99)
    failed = tasks.diagnose_batch.apply((["p0"],))
    assert failed.failed() and [t for t, _ in state.letters] == ["clinragen.diagnose"]
    assert "DeliveryLimitExceeded" in state.letters[0][1]


def test_task_reprs_hash_a_batch_of_ids() -> None:
    shown = task_reprs((["p-one", "p-two"],), {"backfill": "run-1"})
    assert "p-one" not in shown["argsrepr"] and f"#{hash_id('p-two')}" in shown["argsrepr"]
    assert "run-1" in shown["kwargsrepr"]
