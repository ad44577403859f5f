"""Known vs suspected (issue 14, item 4): concluded disorders against the patient's problem list.

The model never takes Conditions; at report time the worker reads the active ones (when the site
turns the check on) and each concluded disorder is known (the code or a SNOMED CT descendant on
the list), suspected, or not checked (off, refused, failing: said so, never "suspected"). A fake
FHIR server on httpx.MockTransport answers a real `diagnose_patient` run.

Over 400 lines because the status of a disorder is tested end to end here, from the search to
the report, the card and the scope, on one fake server.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from clinragen_fhir.cds.card import build_card
from clinragen_fhir.config import FhirEndpoint, ReportSettings, Settings, problem_list_enabled
from clinragen_fhir.fhir.auth import (
    PROBLEM_LIST_ACCESS,
    WORKER_ACCESS,
    WORKER_SCOPE,
    SmartBackendAuth,
    missing_scopes,
    requested_scope,
    worker_access,
)
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.conditions import (
    ENV,
    ListedCondition,
    ProblemList,
    listed_condition,
    read_problem_list,
)
from clinragen_fhir.fhir.errors import FhirConfigError, FhirUnavailable
from clinragen_fhir.fhir.resources import SNOMED
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import Outcome, diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.predict.types import Diagnosis, Prediction
from clinragen_fhir.report.build import content_fingerprint
from clinragen_fhir.report.figures import report_figures
from clinragen_fhir.report.html import decode_presented_form
from clinragen_fhir.report.problem_list import PROBLEM_LIST_EXT, compare, match, read_extension
from tests.fhir_batch import batching
from tests.observations import a1c

PID = "p-problems-1"
KG = load_graph(None)
DM, T2DM = "73211009", "44054006"  # Diabetes mellitus, and its descendant type 2
SETTINGS = ReportSettings(audit_events=True)


def condition(cid: str, code: str, *, system: str = SNOMED, onset: str | None = "2015-06-01",
              clinical: str = "active", verification: str = "confirmed",
              display: str = "") -> dict[str, Any]:
    c: dict[str, Any] = {
        "resourceType": "Condition", "id": cid, "meta": {"versionId": "2"},
        "clinicalStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": clinical}]},
        "verificationStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
            "code": verification}]},
        "code": {"coding": [{"system": system, "code": code, "display": display or code}]},
        "subject": {"reference": f"Patient/{PID}"}, "recordedDate": "2016-01-02"}
    if onset:
        c["onsetDateTime"] = onset
    return c


class Server:
    """Answers like a FHIR server: one patient with two high HbA1c readings, `conditions` on
    the Condition search (or `condition_status` as an error), and records what it was asked."""

    def __init__(self, conditions: list[dict[str, Any]] | None = None,
                 condition_status: int = 200) -> None:
        self.conditions = conditions or []
        self.condition_status = condition_status
        self.posted: list[dict[str, Any]] = []
        self.searched: dict[str, list[httpx.QueryParams]] = defaultdict(list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir").strip("/")
        if request.method == "POST" and path == "":
            bundle = json.loads(request.content)
            self.posted.append(bundle)
            return httpx.Response(200, json={"resourceType": "Bundle",
                                             "type": "transaction-response", "entry": [
                {"response": {"status": "201 Created",
                              "location": f"{e['resource']['resourceType']}/x{i}/_history/1"}}
                for i, e in enumerate(bundle["entry"])]})
        if path == f"Patient/{PID}":
            return httpx.Response(200, json={"resourceType": "Patient", "id": PID,
                                             "gender": "female", "birthDate": "1960-01-01"})
        self.searched[path].append(request.url.params)
        if path == "Condition" and self.condition_status != 200:
            return httpx.Response(self.condition_status, json={
                "resourceType": "OperationOutcome", "issue": [{"severity": "error",
                                                               "code": "forbidden"}]})
        found = {"Observation": [{**a1c(PID, v, d, f"o{i}"), "meta": {"versionId": "1"}}
                                 for i, (v, d) in enumerate(((7.4, 200), (8.1, 20)))],
                 "Condition": self.conditions}.get(path, [])
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": r} for r in found]})

    def written(self, rtype: str) -> list[dict[str, Any]]:
        return [e["resource"] for b in self.posted for e in b["entry"]
                if e["resource"]["resourceType"] == rtype]


def run(server: Server, monkeypatch: pytest.MonkeyPatch, on: bool = True) -> Outcome:
    if on:
        monkeypatch.setenv(ENV, "on")
    else:
        monkeypatch.delenv(ENV, raising=False)
    with FhirClient("http://127.0.0.1:9/fhir",
                    transport=httpx.MockTransport(batching(server.handler)),
                    retries=0) as client:
        return diagnose_patient(client, KG, RuleBaseline(KG), PID, SETTINGS)


def statuses(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {cc["coding"][0]["code"]: read_extension(cc) for cc in report["conclusionCode"]}


def page(report: dict[str, Any]) -> str:
    html = decode_presented_form(report)
    assert html is not None
    return html.replace("&#x27;", "'")


def diagnosis(code: str) -> Diagnosis:
    concept = KG.disorder(code)
    return Diagnosis(code, concept.term if concept else code, 0.9)


def listed(*conditions: dict[str, Any]) -> ProblemList:
    found = [listed_condition(c) for c in conditions]
    return ProblemList(True, tuple(c for c in found if c is not None))


# -- matching ---------------------------------------------------------------------------------
def test_the_concluded_code_itself_or_a_descendant_on_the_list_is_known() -> None:
    same = match(diagnosis(T2DM), listed(condition("c1", T2DM)), KG)
    assert (same.status, same.code, same.since) == ("known", T2DM, "2015-06-01")
    assert same.condition == "Condition/c1/_history/2"
    # the list names a more specific disorder (type 2) than the one concluded (diabetes)
    child = match(diagnosis(DM), listed(condition("c2", T2DM, display="Type 2 DM")), KG)
    assert (child.status, child.code, child.display) == ("known", T2DM, "Type 2 DM")
    # a more general code on the list does not make the specific conclusion known
    parent = match(diagnosis(T2DM), listed(condition("c3", DM)), KG)
    assert parent.status == "suspected"
    assert match(diagnosis(T2DM), listed(), KG).status == "suspected"


def test_icd10cm_codings_are_mapped_and_the_earliest_onset_is_the_date() -> None:
    icd = condition("c4", "E11.9", system="http://hl7.org/fhir/sid/icd-10-cm", onset=None)
    late = condition("c5", T2DM, onset="2020-03-04")
    m = match(diagnosis(T2DM), listed(icd, late), KG)
    # the ICD-10-CM one has no onset: its recorded date, 2016-01-02, is the earlier
    assert (m.status, m.condition, m.since) == ("known", "Condition/c4/_history/2", "2016-01-02")


@pytest.mark.parametrize("kw", [{"clinical": "resolved"}, {"clinical": "inactive"},
                                {"verification": "refuted"},
                                {"verification": "entered-in-error"}])
def test_resolved_refuted_or_erroneous_conditions_are_not_on_the_list(kw: dict[str, str]
                                                                       ) -> None:
    assert listed_condition(condition("c6", T2DM, **kw)) is None
    assert listed_condition(condition("c7", T2DM, clinical="recurrence")) is not None


def test_not_checked_never_reads_as_suspected() -> None:
    m = match(diagnosis(T2DM), ProblemList(False, reason="off here"), KG)
    assert (m.status, m.reason) == ("not-checked", "off here")


def test_the_fingerprint_is_unchanged_when_the_list_was_not_read() -> None:
    """Reports written with the check off keep their fingerprint (no new version for every
    patient); known vs suspected, once read, is content."""
    p = Prediction("m", "1", "k", [diagnosis(T2DM)], "r")
    assert content_fingerprint(compare(p, ProblemList(False, reason="off"), KG)) == \
        content_fingerprint(p)
    known = content_fingerprint(compare(p, listed(condition("c1", T2DM)), KG))
    suspected = content_fingerprint(compare(p, listed(), KG))
    assert len({content_fingerprint(p), known, suspected}) == 3
    edited = condition("c1", T2DM)
    edited["meta"]["versionId"] = "3"  # an edit that keeps it on the list changes nothing
    assert content_fingerprint(compare(p, listed(edited), KG)) == known


# -- the setting, the read and the scope ------------------------------------------------------
def test_the_setting_is_off_by_default_and_a_typo_is_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`[report] problem_list` (CLINRAGEN_REPORT__PROBLEM_LIST by environment): off unless set,
    an explicit value wins, a value that is no boolean is refused rather than read as off."""
    monkeypatch.delenv(ENV, raising=False)
    assert problem_list_enabled() is False and Settings().report.problem_list is False
    assert problem_list_enabled(True) is True
    monkeypatch.setenv(ENV, "on")
    assert problem_list_enabled() is True and problem_list_enabled(False) is False
    monkeypatch.setenv(ENV, "off")
    assert problem_list_enabled() is False
    monkeypatch.setenv(ENV, "yse")
    with pytest.raises(ValueError, match="problem_list"):
        problem_list_enabled()


def test_the_setting_comes_from_the_toml_too(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    toml = tmp_path / "site.toml"
    toml.write_text("[report]\nproblem_list = true\n")
    monkeypatch.setenv("CLINRAGEN_CONFIG", str(toml))
    assert problem_list_enabled() is True


def test_the_old_variable_is_refused_with_its_new_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLINRAGEN_PROBLEM_LIST=on left as it was would otherwise turn the check off unseen."""
    monkeypatch.setenv("CLINRAGEN_PROBLEM_LIST", "on")
    with pytest.raises(FhirConfigError, match=re.escape(
            "CLINRAGEN_PROBLEM_LIST (now CLINRAGEN_REPORT__PROBLEM_LIST, or [report] "
            "problem_list in the TOML)")):
        Settings()
    with pytest.raises(FhirConfigError, match="CLINRAGEN_PROBLEM_LIST"):
        problem_list_enabled()


def test_least_privilege_the_condition_scope_only_while_on() -> None:
    assert worker_access(False) == WORKER_ACCESS
    assert worker_access(True) == {**WORKER_ACCESS, **PROBLEM_LIST_ACCESS}
    assert requested_scope(WORKER_SCOPE, False) == WORKER_SCOPE
    assert requested_scope(WORKER_SCOPE, True) == WORKER_SCOPE + " system/Condition.s"
    custom = "system/*.rs system/DiagnosticReport.cus"
    assert requested_scope(custom, True) == custom  # a configured scope is sent as configured
    assert requested_scope(None, True) is None
    assert missing_scopes(WORKER_SCOPE, worker_access(True)) == ["system/Condition.s"]


def test_the_token_request_asks_for_conditions_only_while_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the setting is read where the endpoint's auth is made (config.problem_list_enabled)
    monkeypatch.setenv("TEST_SMART_KEY", "k")
    endpoint = FhirEndpoint(auth="smart-backend", token_url="https://auth.example/token",
                            client_id="c", private_key_env="TEST_SMART_KEY", jwt_kid="k1")
    monkeypatch.delenv(ENV, raising=False)
    off = endpoint.http_auth()
    monkeypatch.setenv(ENV, "on")
    on = endpoint.http_auth()
    assert isinstance(off, SmartBackendAuth) and isinstance(on, SmartBackendAuth)
    assert off.scope == WORKER_SCOPE and on.scope == WORKER_SCOPE + " system/Condition.s"


def test_what_a_run_does_with_the_check_on_is_exactly_worker_access(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit import test_scopes

    monkeypatch.setenv(ENV, "on")
    recorded = test_scopes.worker_access()
    assert recorded == {t: set(p) for t, p in worker_access(True).items()}
    monkeypatch.delenv(ENV)
    assert "Condition" not in test_scopes.worker_access()  # off: never asked


def test_a_transient_failure_is_raised_a_final_one_is_not_checked() -> None:
    def failing(status: int) -> FhirClient:
        return FhirClient("http://127.0.0.1:9/fhir", retries=0, transport=httpx.MockTransport(
            lambda r: httpx.Response(status, json={"resourceType": "OperationOutcome"})))

    with failing(503) as c, pytest.raises(Exception) as exc:
        read_problem_list(c, PID, enabled=True)
    assert getattr(exc.value, "retryable", False)
    with failing(400) as c:
        got = read_problem_list(c, PID, enabled=True)
    assert not got.checked and "HTTP 400" in got.reason
    queries: list[tuple[str, dict[str, Any]]] = []
    n_read: dict[str, int] = {}

    def down(r: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down")

    with FhirClient("http://127.0.0.1:9/fhir", retries=0,
                    transport=httpx.MockTransport(down)) as c, \
            pytest.raises(FhirUnavailable):
        read_problem_list(c, PID, queries, n_read, enabled=True)
    assert queries == [("Condition", {"patient": PID,
                                      "clinical-status": "active,recurrence,relapse"})]


# -- a whole run ------------------------------------------------------------------------------
def test_a_run_marks_the_listed_disorder_known(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server([condition("c1", T2DM, display="Diabetes mellitus type 2"),
                     condition("old", T2DM, clinical="resolved")])
    outcome = run(server, monkeypatch)
    assert outcome.status == "written" and T2DM in outcome.diagnoses, outcome
    (params,) = server.searched["Condition"]
    assert params["patient"] == PID and params["clinical-status"] == "active,recurrence,relapse"
    (report,) = server.written("DiagnosticReport")
    got = statuses(report)
    assert got[T2DM] == {"status": "known", "condition": "Condition/c1/_history/2",
                         "code": T2DM, "since": "2015-06-01"}
    others = {c: s["status"] for c, s in got.items() if c != T2DM}
    assert set(others.values()) <= {"suspected"}
    assert outcome.problem_list == {"known": 1, **({"suspected": len(others)} if others else {})}
    html = page(report)
    assert "Known (on the problem list)" in html and "since 2015-06-01" in html
    assert "problem list not checked" not in html.lower()
    if others:  # suspected ones come first
        assert html.index("Suspected, not on the problem list") < \
            html.index("Known (on the problem list)")
    assert "Known (on the problem list)" in report["text"]["div"]
    # the Condition that made it known is an input of the report; the read event names the search
    (provenance,) = server.written("Provenance")
    assert {"role": "source", "what": {"reference": "Condition/c1/_history/2"}} in \
        provenance["entity"]
    read = next(e for e in server.written("AuditEvent") if e["action"] == "R")
    queries = [base64.b64decode(x["query"]).decode() for x in read["entity"] if "query" in x]
    assert [q.split("?")[0] for q in queries] == ["Observation", "DocumentReference",
                                                  "Condition"]
    assert all(PID not in q for q in queries)


def test_a_run_with_an_empty_list_calls_them_suspected(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server([])
    outcome = run(server, monkeypatch)
    (report,) = server.written("DiagnosticReport")
    assert {s["status"] for s in statuses(report).values()} == {"suspected"}
    assert outcome.problem_list == {"suspected": len(outcome.diagnoses)}
    html = page(report)
    assert "Suspected, not on the problem list" in html and "Known (on" not in html


@pytest.mark.parametrize("status, words", [(403, "refused the Condition search (HTTP 403)"),
                                           (401, "HTTP 401"), (404, "no Condition search")])
def test_a_refused_search_says_not_checked(monkeypatch: pytest.MonkeyPatch, status: int,
                                           words: str) -> None:
    server = Server([condition("c1", T2DM)], condition_status=status)
    outcome = run(server, monkeypatch)
    assert outcome.status == "written"  # the report is still written
    assert outcome.problem_list == {"not-checked": len(outcome.diagnoses)}
    (report,) = server.written("DiagnosticReport")
    for s in statuses(report).values():
        assert s["status"] == "not-checked" and words in s["reason"]
    html = page(report)
    assert "Problem list not checked" in html and words in html
    assert "Suspected, not on the problem list" not in html and "Known (on" not in html


def test_off_reads_no_condition_and_says_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server([condition("c1", T2DM)])
    outcome = run(server, monkeypatch, on=False)
    assert "Condition" not in server.searched  # never asked: least privilege
    (report,) = server.written("DiagnosticReport")
    assert {s["status"] for s in statuses(report).values()} == {"not-checked"}
    assert outcome.problem_list == {"not-checked": len(outcome.diagnoses)}
    assert "the problem list is not read at this site" in page(report)
    assert "Suspected, not on the problem list" not in page(report)


def test_putting_a_disorder_on_the_list_is_a_new_version(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The stored fingerprint: the same list writes nothing, a listed disorder writes."""
    empty, listed_ = Server([]), Server([condition("c1", T2DM)])
    run(empty, monkeypatch)
    run(listed_, monkeypatch)
    (a,), (b,) = empty.written("DiagnosticReport"), listed_.written("DiagnosticReport")
    fp = "https://clinragen-fhir.org/StructureDefinition/content-fingerprint"
    fa, fb = ({e["url"]: e.get("valueString") for e in r["extension"]}[fp] for r in (a, b))
    assert fa != fb


# -- what reads the report --------------------------------------------------------------------
def cc(code: str, display: str, status: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": [{"system": SNOMED, "code": code, "display": display}]}
    if status:
        out["extension"] = [{"url": PROBLEM_LIST_EXT,
                             "extension": [{"url": "status", "valueCode": status}]}]
    return out


def test_the_cds_card_leads_with_the_suspected_ones() -> None:
    report = {"resourceType": "DiagnosticReport", "id": "r", "status": "preliminary",
              "issued": "2026-01-02T00:00:00+00:00",
              "conclusionCode": [cc("1", "Known one", "known"), cc("2", "Suspected one",
                                                                   "suspected"),
                                 cc("3", "Second suspected", "suspected")]}
    card = build_card(report, "https://x.example/r", str(uuid.uuid4()))
    assert card["summary"] == ("ClinRaGen (preliminary): Suspected one, Second suspected, "
                               "Known one (known)")
    detail = card["detail"]
    assert detail.index("**Suspected, not on the problem list:** Suspected one; Second "
                        "suspected") < detail.index("**Known (on the problem list):** Known one")
    legacy = {**report, "conclusionCode": [cc("1", "A", None), cc("2", "B", None)]}
    card = build_card(legacy, "https://x.example/r", str(uuid.uuid4()))
    assert card["detail"].startswith("**Suspected:** A; B")  # as before the check
    unchecked = {**report, "conclusionCode": [cc("1", "A", "not-checked")]}
    card = build_card(unchecked, "https://x.example/r", str(uuid.uuid4()))
    assert "**Concluded (problem list not checked):** A" in card["detail"]


def test_the_summary_counts_suspected_separately() -> None:
    rows = dict(report_figures([
        {"status": "written", "diagnoses": ["a", "b"], "problem_list": {"suspected": 1,
                                                                         "known": 1}},
        {"status": "exists", "diagnoses": ["c"], "problem_list": {"suspected": 1}},
        {"status": "skipped"}]))
    assert rows["concluded disorders suspected, not on the problem list"] == "2"
    assert rows["concluded disorders known (on the problem list)"] == "1"
    assert rows["concluded disorders, problem list not checked"] == "0"
    assert not any("problem list" in k for k in dict(report_figures(
        [{"status": "written", "diagnoses": ["a"]}])))


def test_listed_condition_keeps_every_coding() -> None:
    got = listed_condition({**condition("c9", T2DM), "meta": {}})
    assert got == ListedCondition("Condition/c9", ((SNOMED, T2DM, T2DM),), "2015-06-01")


def test_check_config_asks_for_the_condition_search_only_while_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from clinragen_fhir.fhir.capability import capability_gaps

    def resource(rtype: str, *params: str) -> dict[str, Any]:
        return {"type": rtype, "searchParam": [{"name": p} for p in params],
                "conditionalCreate": True, "conditionalUpdate": True}

    cap = {"rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": [
        resource("Observation", "patient", "category", "code", "date"),
        resource("DocumentReference", "patient"),
        resource("DiagnosticReport", "subject", "identifier"), resource("Patient")]}]}
    monkeypatch.delenv(ENV, raising=False)
    assert capability_gaps(cap) == []
    monkeypatch.setenv(ENV, "on")
    assert capability_gaps(cap) == ["resource Condition"]
    cap["rest"][0]["resource"].append(resource("Condition", "patient"))
    assert capability_gaps(cap) == ["Condition search parameter 'clinical-status'"]
