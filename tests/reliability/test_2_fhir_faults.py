"""2. FHIR server faults through a fault-injecting proxy on loopback.

First the exact ambiguous case, deterministically: the report transaction is committed by the
server but the client is answered 500. Then real worker processes through the proxy with 20% of
requests faulted (seeded): every patient ends with exactly one report, retries stay bounded, and
the dead-letter queue holds exactly the patients that cannot succeed (they do not exist), with
the reason.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirHTTPError
from clinragen_fhir.inference.fallback import build_predictor
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import diagnose_patient
from tests.reliability.proxy import FaultProxy, describe, is_report_transaction
from tests.reliability.stack import (
    FULL,
    PATIENT_IDS,
    Hapi,
    Redis,
    Worker,
    base_env,
    celery_app,
    dead_letters,
    enqueue,
    log_lines,
    make_patients,
    outcome_figures,
    record,
    reports_by_patient,
    wait_all_done,
)

pytestmark = pytest.mark.integration

N_PATIENTS = 200 if FULL else 20
N_IMPOSSIBLE = 2
MAX_RETRIES = 5  # worker.max_retries (default)
CLIENT_RETRIES = 3  # fhir.retries (default)


def _upstream(hapi: Hapi) -> str:
    return hapi.url.removesuffix("/fhir")


def _post_commit_once() -> tuple[Any, list[int]]:
    """Answer 500 after committing the first report transaction, pass everything else."""
    hits: list[int] = []

    def choose(method: str, target: str, body: bytes) -> str | None:
        if is_report_transaction(method, target, body):
            hits.append(1)
            return "post-commit-500" if len(hits) == 1 else ""
        return ""
    return choose, hits


@pytest.mark.parametrize("client_retries", [CLIENT_RETRIES, 0],
                         ids=["client-retries", "task-retries"])
def test_committed_but_answered_500_does_not_duplicate(hapi: Hapi, client_retries: int) -> None:
    """The server wrote the report, the client saw 500. The repeat (by the client's own retry,
    or with retries=0 by the task's next attempt) must find the report, not write another."""
    (pid,) = make_patients(hapi.url, f"postcommit{client_retries}", 1)
    choose, hits = _post_commit_once()
    proxy = FaultProxy(_upstream(hapi), rate=0.0, choose=choose)
    proxy.start()
    kg = load_graph(None)
    predictor = build_predictor(None, kg)
    try:
        with FhirClient(proxy.url(), retries=client_retries, backoff=0.1) as client:
            if client_retries:
                outcome = diagnose_patient(client, kg, predictor, pid, ReportSettings())
                assert outcome.status == "written"  # the conditional create answered 200
            else:
                with pytest.raises(FhirHTTPError) as err:
                    diagnose_patient(client, kg, predictor, pid, ReportSettings())
                assert err.value.status == 500
                outcome = diagnose_patient(client, kg, predictor, pid, ReportSettings())
                assert outcome.status == "exists"
    finally:
        proxy.stop()
    assert proxy.counts["post-commit-500"] == 1
    assert len(hits) == (2 if client_retries else 1)
    assert reports_by_patient(hapi.url, [pid])[pid] == 1
    # ... and one successful write AuditEvent: it is PUT by an id of the attempt, so the
    # verbatim retry of the committed transaction finds it (it was POSTed before, and the
    # client's retry added a second one). With retries=0 the task also records the 500 it saw
    # (a failed write attempt, outcome 8): that one is an event of its own, not a duplicate.
    with httpx.Client(timeout=60) as http:
        events = [e["resource"] for e in http.get(f"{hapi.url}/AuditEvent", params={
            "entity": f"Patient/{pid}", "action": "C", "_count": 50}).json().get("entry", [])]
    written = [e for e in events if e["outcome"] == "0"]
    failed = [e for e in events if e["outcome"] != "0"]
    assert len(written) == 1, [e["id"] for e in written]
    assert len(failed) == (0 if client_retries else 1), [e["outcome"] for e in failed]
    record(f"post_commit_{'client' if client_retries else 'task'}", {
        "patients": 1, "post_commit_faults": 1, "reports": 1, "second_attempt": outcome.status,
        "write_audit_events": len(written), "failed_write_audit_events": len(failed),
        "duplicated": 0, "lost": 0})


@pytest.mark.timeout(3600 if FULL else 600)
def test_twenty_percent_faults_end_with_exactly_one_report(hapi: Hapi,
                                                          clean_redis: Redis) -> None:
    pids = make_patients(hapi.url, "faults", N_PATIENTS)
    impossible = [f"rel-faults-missing-{i}" for i in range(N_IMPOSSIBLE)]
    PATIENT_IDS.update(impossible)
    proxy = FaultProxy(_upstream(hapi), rate=0.2, seed=8)
    proxy.start()
    worker = Worker("faults", base_env(proxy.url(), clean_redis))
    try:
        worker.start()
        worker.ready()
        app = celery_app(clean_redis)
        t0 = time.monotonic()
        tasks = enqueue(app, pids + impossible)
        wait_all_done(app, tasks, 1800 if FULL else 240)
        elapsed = time.monotonic() - t0
        worker.stop()
    finally:
        worker.stop()
        proxy.stop()
    figures = outcome_figures(app, tasks, hapi.url, clean_redis)
    fhir_retries = log_lines(worker.logs, "fhir retry")
    task_retries = log_lines(worker.logs, "diagnose retry")
    by_patient_retry = max((int(x["retry"]) for x in task_retries), default=0)
    record("fhir_faults", {
        **figures, "proxy": describe(proxy), "seconds": round(elapsed, 1),
        "impossible_patients": N_IMPOSSIBLE,
        "client_retries_logged": len(fhir_retries),
        "client_retry_max_attempt": max((int(x["attempt"]) for x in fhir_retries), default=0),
        "task_retries_logged": len(task_retries), "task_retry_max": by_patient_retry,
        "limits": {"fhir.retries": CLIENT_RETRIES, "worker.max_retries": MAX_RETRIES},
    })
    counts = reports_by_patient(hapi.url, pids + impossible)
    assert all(counts[p] == 1 for p in pids), figures
    assert figures["duplicated"] == 0 and figures["lost"] == 0, figures
    # retries bounded: per request by fhir.retries, per task by worker.max_retries
    assert all(int(x["attempt"]) <= CLIENT_RETRIES for x in fhir_retries)
    assert by_patient_retry <= MAX_RETRIES
    # the DLQ holds exactly the patients that cannot succeed, each with the reason
    letters = figures["dead_letters"]
    assert len(letters) == N_IMPOSSIBLE, letters
    assert sorted(str(d["args"][0]) for d in dead_letters(clean_redis)) == impossible
    assert all("HTTP 404" in d["error"] for d in letters), letters
    assert sum(proxy.counts.values()) >= 0.1 * proxy.requests  # faults really happened
    assert proxy.with_bearer == proxy.requests  # the token went out on every request
