"""SMART scopes: the default covers exactly what the worker does (issue 13, item 10).

The default scope (`system/*.rs system/DiagnosticReport.c system/Provenance.cu`) lacked the
writes every task makes: the application Device (conditional create) and the AuditEvents. On a
server that enforces scopes every task was refused and dead-lettered. Here the worker's requests
are recorded on a fake server during a real `diagnose_patient` run (audit events on) and mapped
to SMART v2 letters; they must be exactly `WORKER_ACCESS`, the one list the default scope is made
from. `check-config` fetches a token and names what its granted scope lacks.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from clinragen_fhir.cli import main
from clinragen_fhir.config import FhirEndpoint, ReportSettings
from clinragen_fhir.fhir.auth import (
    WORKER_ACCESS,
    WORKER_SCOPE,
    ClientCredentialsAuth,
    SmartBackendAuth,
    granted_access,
    missing_scopes,
)
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.worker.tasks import POLLED
from tests.fhir_batch import batching
from tests.observations import a1c

PID = "p-scope-1"
OLD_DEFAULT = "system/*.rs system/DiagnosticReport.c system/Provenance.cu"


class RecordingServer:
    """Answers like a FHIR server and records each interaction as SMART v2 letters by type."""

    def __init__(self) -> None:
        self.access: dict[str, set[str]] = defaultdict(set)

    def _entry(self, request: dict[str, Any]) -> None:
        rtype = str(request["url"]).split("/")[0].split("?")[0]
        if request["method"] == "POST":
            # a conditional create: the server searches for the condition in our name
            self.access[rtype] |= {"c", "s"} if request.get("ifNoneExist") else {"c"}
        elif request["method"] == "PUT":  # by a client id: an update that creates at first
            # conditional (`Type?search`): the server also searches in our name
            self.access[rtype] |= {"c", "u", "s"} if "?" in str(request["url"]) else {"c", "u"}
        else:
            self.access[rtype].add({"GET": "r", "DELETE": "d", "PATCH": "u"}[request["method"]])

    def handler(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.removeprefix("/fhir").strip("/").split("/")
        if request.method == "POST" and parts == [""]:
            bundle = json.loads(request.content)
            out = []
            for i, entry in enumerate(bundle["entry"]):
                self._entry(entry["request"])
                rtype = entry["resource"]["resourceType"]
                out.append({"response": {"status": "201 Created",
                                         "location": f"{rtype}/x{i}/_history/1"}})
            return httpx.Response(200, json={"resourceType": "Bundle",
                                             "type": "transaction-response", "entry": out})
        rtype = parts[0]
        if len(parts) == 1 or parts[1] == "_search":
            self.access[rtype].add("s")
            found = [{**a1c(PID, v, d, f"o{i}"), "meta": {"versionId": "1"}}
                     for i, (v, d) in enumerate(((7.4, 200), (8.1, 20)))] \
                if rtype == "Observation" else []
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                             "entry": [{"resource": r} for r in found]})
        self.access[rtype].add("r")  # read or vread
        return httpx.Response(200, json={"resourceType": rtype, "id": parts[1],
                                         "gender": "female", "birthDate": "1960-01-01"})


def worker_access() -> dict[str, set[str]]:
    """What a report run and the poll task do, as recorded."""
    server = RecordingServer()
    kg = load_graph(None)
    with FhirClient("http://127.0.0.1:9/fhir",
                    transport=httpx.MockTransport(batching(server.handler)),
                    retries=0) as client:
        outcome = diagnose_patient(client, kg, RuleBaseline(kg), PID,
                                   ReportSettings(audit_events=True))
    assert outcome.status == "written"  # read, searched, audited and wrote the report
    for rtype, _ in POLLED:  # the poll task searches these by _lastUpdated
        server.access[rtype].add("s")
    return dict(server.access)


def test_the_default_scope_is_exactly_what_the_worker_does() -> None:
    recorded = worker_access()
    assert recorded == {t: set(p) for t, p in WORKER_ACCESS.items()}  # no more, no less
    assert FhirEndpoint().scope == WORKER_SCOPE
    assert missing_scopes(WORKER_SCOPE) == []
    assert "*" not in WORKER_SCOPE and ".d" not in WORKER_SCOPE  # least privilege
    auth = SmartBackendAuth("https://auth.example/token", "c", SecretStr("k"), kid="k1")
    assert auth.scope == WORKER_SCOPE  # the class default too


def test_the_old_default_missed_the_device_and_audit_writes() -> None:
    """Also the report's update: since the report lifecycle (one current report, a new version
    by conditional update when its content changes) DiagnosticReport needs `u` too."""
    assert missing_scopes(OLD_DEFAULT) == ["system/DiagnosticReport.u", "system/Device.c",
                                           "system/AuditEvent.cu"]


def test_granted_scope_parsing() -> None:
    assert missing_scopes("system/*.cruds") == []
    assert missing_scopes("system/*.read system/*.write") == []  # SMART v1 names
    assert missing_scopes("system/*.read") == ["system/DiagnosticReport.cu", "system/Device.c",
                                               "system/Provenance.cu", "system/AuditEvent.cu"]
    assert granted_access("patient/*.rs user/*.cruds system/Patient.r") == {"Patient": {"r"}}
    # narrowed by a query: whether it covers the worker's searches cannot be told
    assert "system/Observation.s" in missing_scopes(
        WORKER_SCOPE.replace("system/Observation.s", "system/Observation.rs?category=laboratory"))


def token_endpoint(granted: str | None, seen: list[dict[str, list[str]]]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        from urllib.parse import parse_qs

        seen.append(parse_qs(request.content.decode()))
        body: dict[str, Any] = {"access_token": "tok-0123456789abcdef", "expires_in": 300,
                                "token_type": "bearer"}
        if granted is not None:
            body["scope"] = granted
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handler)


def test_the_token_answer_scope_is_kept_or_taken_as_requested() -> None:
    seen: list[dict[str, list[str]]] = []
    auth = ClientCredentialsAuth("https://auth.example/token", "c", SecretStr("s"),
                                 scope=WORKER_SCOPE, transport=token_endpoint(OLD_DEFAULT, seen))
    auth.token()
    assert seen[0]["scope"] == [WORKER_SCOPE] and auth.granted_scope == OLD_DEFAULT
    silent = ClientCredentialsAuth("https://auth.example/token", "c", SecretStr("s"),
                                   scope=WORKER_SCOPE, transport=token_endpoint(None, seen))
    silent.token()
    assert silent.granted_scope == WORKER_SCOPE  # RFC 6749 5.1: left out means as requested


@pytest.fixture
def cc_site(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLINRAGEN_CONFIG", "CLINRAGEN_LOG_ID_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLINRAGEN_FHIR__BASE_URL", "http://127.0.0.1:9/fhir")  # nothing there
    monkeypatch.setenv("CLINRAGEN_FHIR__AUTH", "client-credentials")
    monkeypatch.setenv("CLINRAGEN_FHIR__TOKEN_URL", "https://auth.example/token")
    monkeypatch.setenv("CLINRAGEN_FHIR__CLIENT_ID", "clinragen")
    monkeypatch.setenv("CLINRAGEN_FHIR__CLIENT_SECRET_ENV", "SCOPE_TEST_SECRET")
    monkeypatch.setenv("SCOPE_TEST_SECRET", "a-real-client-secret-0123")
    monkeypatch.setenv("CLINRAGEN_FHIR__RETRIES", "0")
    monkeypatch.setenv("CLINRAGEN_BROKER_URL", "memory://")


def run_check_config(monkeypatch: pytest.MonkeyPatch, granted: str | None) -> str:
    """check-config with the token endpoint answered by a MockTransport granting `granted`."""
    real = FhirEndpoint.http_auth

    def with_mock_token_endpoint(self: FhirEndpoint) -> httpx.Auth | None:
        auth = real(self)
        assert isinstance(auth, ClientCredentialsAuth)
        auth._transport = token_endpoint(granted, [])
        return auth

    monkeypatch.setattr(FhirEndpoint, "http_auth", with_mock_token_endpoint)
    result = CliRunner().invoke(main, ["check-config"])
    assert result.exit_code == 1  # nothing answers at the FHIR base URL
    return result.output


@pytest.mark.usefixtures("cc_site")
def test_check_config_names_the_scopes_a_token_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_check_config(monkeypatch, OLD_DEFAULT)
    assert f"granted: {OLD_DEFAULT}" in out
    missing = [line.strip() for line in out.splitlines() if "MISSING scope" in line]
    assert missing == [  # DiagnosticReport.u: the report lifecycle's conditional update
        "MISSING scope: system/DiagnosticReport.u (the server would refuse the worker's "
        "DiagnosticReport update)",
        "MISSING scope: system/Device.c (the server would refuse the worker's Device create)",
        "MISSING scope: system/AuditEvent.cu (the server would refuse the worker's AuditEvent "
        "create, update)"]
    assert "tok-0123456789abcdef" not in out and "a-real-client-secret" not in out


@pytest.mark.usefixtures("cc_site")
def test_check_config_is_quiet_about_a_full_grant_and_a_short_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_check_config(monkeypatch, WORKER_SCOPE)
    assert "MISSING scope" not in out and f"granted: {WORKER_SCOPE}" in out
    monkeypatch.setenv("CLINRAGEN_FHIR__SCOPE", "system/*.rs")
    out = run_check_config(monkeypatch, "system/*.rs")
    assert "MISSING from the configured scope: system/AuditEvent.cu" in out
    assert "MISSING scope: system/Provenance.cu" in out
