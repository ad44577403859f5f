"""CDS Hooks on the real stack: `clinragen-fhir cds-hooks` (uvicorn, JWT auth, Redis card store)
answers a patient-view hook with a card built from a report the pipeline wrote to HAPI, links to
its HTML page, and records the clinician's feedback as an AuditEvent that HAPI hands back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from clinragen_fhir.cds_hooks import SERVICE_ID
from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from tests.integration.conftest import ROOT, worker_env
from tests.integration.hospital import free_port, new_patient, wait_for  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
NewPatient = Callable[[list[tuple[float, int]]], str]
ISSUER = "https://ehr.itest.example"


@pytest.fixture(scope="module")
def ehr_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def service(ehr_key: ec.EllipticCurvePrivateKey, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[str]:
    """`clinragen-fhir cds-hooks` on a loopback port, trusting the test EHR's public key."""
    keys = tmp_path_factory.mktemp("cds") / "ehr-jwks.json"
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ehr_key.public_key()))
    keys.write_text(json.dumps({"keys": [{**jwk, "kid": "itest", "alg": "ES384"}]}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (ROOT / ".run").mkdir(exist_ok=True)
    log_path = ROOT / ".run" / "test-cds-hooks.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed at teardown
    env = worker_env(CLINRAGEN_CDS_HOOKS__JWT_ISSUER=ISSUER,
                     CLINRAGEN_CDS_HOOKS__JWT_KEYS_FILE=str(keys),
                     CLINRAGEN_CDS_HOOKS__BASE_URL=base,
                     CLINRAGEN_STATE_URL=os.environ.get("CLINRAGEN_TEST_STATE",
                                                        "redis://127.0.0.1:6379/5"))
    env.pop("CLINRAGEN_CDS_HOOKS__AUTH", None)
    proc = subprocess.Popen([sys.executable, "-m", "clinragen_fhir.cli", "cds-hooks", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"cds-hooks exited: {Path(log_path).read_text()[-2000:]}")
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the CDS Hooks service", up, 60)
    yield base
    proc.terminate()
    proc.wait(30)
    log.close()


def bearer(key: ec.EllipticCurvePrivateKey, aud: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "sub": "itest-ehr", "aud": aud, "iat": now,
                        "exp": now + 120, "jti": str(uuid.uuid4())}, key, algorithm="ES384",
                       headers={"kid": "itest"})
    return {"authorization": f"Bearer {token}"}


def test_hook_answers_from_the_stored_report_and_feedback_is_audited(
        fhir: FhirClient, new_patient: NewPatient, service: str,  # noqa: F811
        ehr_key: ec.EllipticCurvePrivateKey) -> None:
    endpoint = f"{service}/cds-services/{SERVICE_ID}"
    (listed,) = httpx.get(f"{service}/cds-services", timeout=10).json()["services"]
    assert listed["id"] == SERVICE_ID and listed["hook"] == "patient-view"

    pid = new_patient([(6.0, 700), (6.9, 300), (7.4, 30)])
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": pid, "userId": "Practitioner/itest-dr"}}
    # no report yet: no card, and no error
    none = httpx.post(endpoint, json=body, headers=bearer(ehr_key, endpoint), timeout=30)
    assert none.status_code == 200 and none.json() == {"cards": []}
    assert httpx.post(endpoint, json=body, timeout=30).status_code == 401

    kg = load_graph()
    outcome = diagnose_patient(fhir, kg, RuleBaseline(kg), pid, ReportSettings())
    assert outcome.status == "written" and "44054006" in outcome.diagnoses, outcome
    report = fhir.read("DiagnosticReport", outcome.report_id)
    names = [c["display"] for cc in report["conclusionCode"] for c in cc["coding"]]

    answer = httpx.post(endpoint, json={**body, "hookInstance": str(uuid.uuid4())},
                        headers=bearer(ehr_key, endpoint), timeout=30)
    assert answer.status_code == 200, answer.text
    (card,) = answer.json()["cards"]
    assert names and all(n in card["summary"] for n in names[:3]), (names, card["summary"])
    assert f"{outcome.claims_held} of {outcome.claims} lab claims checked" in card["detail"]
    assert card["indicator"] == "info" and card["source"]["label"]
    (link,) = card["links"]
    assert link["type"] == "absolute" and f"/reports/{outcome.report_id}" in link["url"]
    page = httpx.get(link["url"], timeout=30)
    assert page.status_code == 200 and names[0] in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]

    feedback_url = f"{endpoint}/feedback"
    stamp = "2025-06-01T10:00:00Z"
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": stamp,
            "overrideReason": {"reason": card["overrideReasons"][0]}}
    done = httpx.post(feedback_url, json={"feedback": [item]},
                      headers=bearer(ehr_key, feedback_url), timeout=30)
    assert done.status_code == 200, done.text
    again = httpx.post(feedback_url, json={"feedback": [item]},  # the EHR's retry
                       headers=bearer(ehr_key, feedback_url), timeout=30)
    assert again.status_code == 200

    def feedback_events() -> list[dict[str, Any]]:
        return [e for e in fhir.search("AuditEvent", {"entity": f"Patient/{pid}"})
                if e.get("action") == "E"]

    (event,) = feedback_events()  # one, though the feedback came twice
    details = {d["type"]: d["valueString"] for d in event["entity"][0]["detail"]}
    assert details["cds card"] == card["uuid"] and details["outcome"] == "overridden"
    assert details["override reason"] == card["overrideReasons"][0]["code"]
    assert details["outcomeTimestamp"] == stamp
    assert details["report"].startswith(f"DiagnosticReport/{outcome.report_id}/_history/")
    assert {"type": "DiagnosticReport", "identifier": {
        "system": ReportSettings().identifier_system, "value": outcome.identifier}} in [
        x["what"] for x in event["entity"]]
    assert event["subtype"][0]["code"] == "overridden"
    assert event["agent"][0]["who"]["reference"].startswith("Device/")

    log_text = (ROOT / ".run" / "test-cds-hooks.log").read_text()
    assert pid not in log_text  # hashed ids only


def test_the_service_refuses_to_start_open_off_loopback() -> None:
    env = worker_env(CLINRAGEN_CDS_HOOKS__AUTH="none")
    for name in ("CLINRAGEN_CDS_HOOKS__JWT_ISSUER", "CLINRAGEN_CDS_HOOKS__JWT_KEYS_FILE"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "clinragen_fhir.cli", "cds-hooks", "--host",
                           "0.0.0.0", "--port", str(free_port())], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0 and "without JWT auth" in done.stderr
