"""The report lifecycle on real HAPI (issue 14, item 1).

One current report per patient and method (identifier `current_key`, written by conditional
update `PUT DiagnosticReport?identifier=...`), a new version only when the concluded diagnoses,
their evidence or the model change, older conclusions in `_history`, reports of the scheme
before (identifier = a hash of every input version) adopted rather than duplicated, and HAPI's
own no-op update detection checked (an identical update adds no version).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import Outcome, diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.predict.types import Prediction
from clinragen_fhir.report.build import (
    EXT_BASE,
    FINGERPRINT_EXT,
    MODEL_EXT,
    current_key,
)
from tests.integration.conftest import FHIR_URL
from tests.integration.hospital import new_patient, our_reports  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
NewPatient = Callable[[list[tuple[float, int]]], str]
SETTINGS = ReportSettings()
KG = load_graph()
DIABETES = "44054006"


class Retrained:
    """The rule baseline's conclusions under another model's name and identity: what a
    retrained (re-exported) ONNX model looks like to the report, without needing one."""

    name = "clinragen-onnx"

    def __init__(self, model_id: str) -> None:
        self.inner, self.model_id = RuleBaseline(KG), model_id

    def predict(self, *args: Any) -> Prediction:
        p = self.inner.predict(*args)
        p.method, p.model_id = self.name, self.model_id
        return p


def run(fhir: FhirClient, pid: str, predictor: Any = None, **kw: Any) -> Outcome:
    return diagnose_patient(fhir, KG, predictor or RuleBaseline(KG), pid, SETTINGS, **kw)


def history(fhir: FhirClient, report_id: str) -> list[dict[str, Any]]:
    bundle = fhir.read("DiagnosticReport", f"{report_id}/_history")
    return [e["resource"] for e in bundle.get("entry", [])]


def version(fhir: FhirClient, report_id: str) -> str:
    return str(fhir.read("DiagnosticReport", report_id)["meta"]["versionId"])


def ext(resource: dict[str, Any], url: str) -> str:
    return next(str(e["valueString"]) for e in resource["extension"] if e["url"] == url)


def codes(report: dict[str, Any]) -> list[str]:
    return [c["code"] for cc in report.get("conclusionCode", []) for c in cc["coding"]]


def test_unchanged_inputs_write_nothing(fhir: FhirClient, new_patient: NewPatient) -> None:  # noqa: F811
    """A re-run, and a new input that changes no conclusion and no evidence (a body height),
    write nothing: the current report stays at version 1 (before the lifecycle, the new input
    version gave a second report)."""
    pid = new_patient([(6.0, 700), (6.9, 300), (7.4, 30)])
    first = run(fhir, pid)
    assert first.status == "written" and first.version == "1" and DIABETES in first.diagnoses
    assert first.identifier == current_key(pid, "knowledge-rule-baseline")
    report = fhir.read("DiagnosticReport", first.report_id)
    assert {"system": SETTINGS.identifier_system, "value": first.identifier} in \
        report["identifier"]
    assert ext(report, MODEL_EXT) == "rule-baseline"
    assert ext(report, FINGERPRINT_EXT).startswith("sha256:")

    again = run(fhir, pid)
    assert (again.status, again.report_id, again.version) == ("exists", first.report_id, "1")
    fhir.update({"resourceType": "Observation", "id": f"{pid}-height", "status": "final",
                 "category": [{"coding": [{
                     "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                     "code": "vital-signs"}]}],
                 "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
                 "subject": {"reference": f"Patient/{pid}"},
                 "effectiveDateTime": report["effectiveDateTime"],
                 "valueQuantity": {"value": 168, "unit": "cm",
                                   "system": "http://unitsofmeasure.org", "code": "cm"}})
    after = run(fhir, pid)
    assert (after.status, after.version) == ("exists", "1")
    assert version(fhir, first.report_id) == "1" and len(history(fhir, first.report_id)) == 1
    assert len(our_reports(fhir, pid)) == 1


def test_a_changed_conclusion_is_version_2_with_version_1_in_history(
        fhir: FhirClient, new_patient: NewPatient) -> None:  # noqa: F811
    pid = new_patient([(6.9, 300), (7.4, 30)])
    first = run(fhir, pid)
    assert first.status == "written" and DIABETES in first.diagnoses
    for i in (0, 1):  # both readings corrected to normal: diabetes is no longer concluded
        obs = fhir.read("Observation", f"{pid}-a1c-{i}")
        obs["valueQuantity"]["value"], obs["status"] = 5.2, "corrected"
        fhir.update(obs)
    second = run(fhir, pid)
    assert (second.status, second.report_id, second.version) == ("written", first.report_id, "2")
    assert DIABETES not in second.diagnoses
    versions = {r["meta"]["versionId"]: r for r in history(fhir, first.report_id)}
    assert set(versions) == {"1", "2"}
    assert DIABETES in codes(versions["1"]) and DIABETES not in codes(versions["2"])
    old = fhir.read("DiagnosticReport", f"{first.report_id}/_history/1")  # vread still works
    assert DIABETES in codes(old)
    assert len(our_reports(fhir, pid)) == 1
    # the new version's Provenance links the version it replaces (role revision)
    provs = list(fhir.search("Provenance", {"target": f"DiagnosticReport/{first.report_id}"}))
    assert len(provs) == 2
    revisions = [e["what"]["reference"] for p in provs for e in p["entity"]
                 if e["role"] == "revision"]
    assert revisions == [f"DiagnosticReport/{first.report_id}/_history/1"]


def test_a_retrained_model_gives_a_new_version(fhir: FhirClient,
                                               new_patient: NewPatient) -> None:  # noqa: F811
    """The same inputs and conclusions under a new model identity: a new version (before, the
    report key hashed method_version "1", so every unchanged patient answered "exists")."""
    pid = new_patient([(7.4, 30)])
    first = run(fhir, pid, Retrained("onnx:aaaaaaaaaaaaaaaa"))
    assert (first.status, first.version, first.model) == ("written", "1", "onnx:aaaaaaaaaaaaaaaa")
    same = run(fhir, pid, Retrained("onnx:aaaaaaaaaaaaaaaa"))
    assert (same.status, same.version) == ("exists", "1")
    retrained = run(fhir, pid, Retrained("onnx:bbbbbbbbbbbbbbbb"))
    assert (retrained.status, retrained.report_id, retrained.version) == (
        "written", first.report_id, "2")
    report = fhir.read("DiagnosticReport", first.report_id)
    assert ext(report, MODEL_EXT) == "onnx:bbbbbbbbbbbbbbbb"
    assert ext(history(fhir, first.report_id)[-1], MODEL_EXT) == "onnx:aaaaaaaaaaaaaaaa"
    # another method is another current report: the baseline's does not replace the model's
    baseline = run(fhir, pid)
    assert baseline.status == "written" and baseline.report_id != first.report_id
    assert len(our_reports(fhir, pid)) == 2


class OneAtATime:
    """The rule baseline, one prediction at a time: rdflib's SPARQL parser is not thread-safe
    (a worker runs one task per process; the threads here share one)."""

    name = "knowledge-rule-baseline"
    guard = threading.Lock()

    def predict(self, *args: Any) -> Prediction:
        with self.guard:
            return RuleBaseline(KG).predict(*args)


@contextmanager
def _locks() -> Iterator[Callable[[str], Any]]:
    """The in-process equivalent of the worker's Redis report lock (`tasks.report_lock`)."""
    guards: dict[str, threading.Lock] = {}
    mutex = threading.Lock()

    @contextmanager
    def lock(key: str) -> Iterator[None]:
        with mutex:
            guard = guards.setdefault(key, threading.Lock())
        with guard:
            yield

    yield lock


def test_a_concurrent_rerun_gives_no_duplicate(fhir: FhirClient,
                                               new_patient: NewPatient) -> None:  # noqa: F811
    """Two runs for one patient at once, holding the report lock as the worker and the CLI do
    (keyed by the current key, so runs with different inputs serialise too): one writes, the
    other finds the same content and writes nothing."""
    pid = new_patient([(6.9, 300), (7.4, 30)])
    results: list[Outcome | BaseException] = []
    start = threading.Barrier(2, timeout=30)

    with _locks() as lock:
        def one() -> None:
            start.wait()
            try:
                results.append(run(fhir, pid, OneAtATime(), lock=lock))
            except BaseException as exc:  # reported by the assertion below
                results.append(exc)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    outcomes = [r for r in results if isinstance(r, Outcome)]
    assert len(outcomes) == 2, results
    assert sorted(o.status for o in outcomes) == ["exists", "written"]
    assert len({o.report_id for o in outcomes}) == 1
    assert len(our_reports(fhir, pid)) == 1
    assert version(fhir, outcomes[0].report_id) == "1"


def test_concurrent_runs_without_the_lock_give_no_duplicate_on_hapi(
        fhir: FhirClient, new_patient: NewPatient) -> None:  # noqa: F811
    """The state store down, runs write unlocked. HAPI then refuses the second of two
    concurrent conditional updates that would both create (409, its unique index on the
    conditional URL); the client retries it, the condition now matches the first run's report,
    and the retry is at most a redundant version of it: one report, never two."""
    pid = new_patient([(6.9, 300), (7.4, 30)])
    results: list[Outcome | BaseException] = []
    start = threading.Barrier(2, timeout=30)

    def one() -> None:
        start.wait()
        try:
            with FhirClient(FHIR_URL, timeout=120, retries=3, backoff=0.2) as client:
                results.append(run(client, pid, OneAtATime()))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    outcomes = [r for r in results if isinstance(r, Outcome)]
    assert len(outcomes) == 2, results
    assert len({o.report_id for o in outcomes}) == 1
    assert len(our_reports(fhir, pid)) == 1


def test_hapi_adds_no_version_for_an_identical_update(fhir: FhirClient,
                                                      new_patient: NewPatient) -> None:  # noqa: F811
    """HAPI's no-op detection: an update whose content equals the current version is answered
    without a new version. The pipeline's fingerprint check does not rely on it (every write
    has a new `issued` and rendering time, so it is never identical), but a transaction that
    HAPI committed and whose answer was lost, sent again verbatim, adds no version."""
    pid = new_patient([(7.4, 30)])
    first = run(fhir, pid)
    report = fhir.read("DiagnosticReport", first.report_id)
    meta = {k: v for k, v in report["meta"].items() if k not in ("versionId", "lastUpdated")}
    same = {**report, "meta": meta}  # as read, less what the server sets on each version
    assert fhir.update(same)["meta"]["versionId"] == "1"
    url = f"DiagnosticReport?identifier={SETTINGS.identifier_system}|{first.identifier}"
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": same, "request": {"method": "PUT", "url": url}}]}
    for _ in range(2):
        fhir.transaction(bundle)
    assert version(fhir, first.report_id) == "1"
    changed = {**same, "conclusion": same["conclusion"] + " (edited)"}
    assert fhir.update(changed)["meta"]["versionId"] == "2"  # a real change is a version


def test_reports_of_the_old_scheme_are_adopted_not_duplicated(
        fhir: FhirClient, new_patient: NewPatient) -> None:  # noqa: F811
    """Two reports written before the lifecycle (identifier = a hash of the input versions):
    the newest becomes the current report (a new version of it, its old identifier kept), the
    older stays as written and is linked from the new version's Provenance (role revision)."""
    pid = new_patient([(7.4, 30)])
    legacy = []
    for n in range(2):
        created = httpx.post(f"{FHIR_URL}/DiagnosticReport", json={
            "resourceType": "DiagnosticReport", "status": "preliminary",
            "identifier": [{"system": SETTINGS.identifier_system, "value": f"{n:064x}"}],
            "code": {"coding": [{"system": SETTINGS.code_system, "code": SETTINGS.code}]},
            "subject": {"reference": f"Patient/{pid}"},
            "extension": [{"url": f"{EXT_BASE}/method",
                           "valueString": "knowledge-rule-baseline@1"}]}, timeout=30)
        created.raise_for_status()
        legacy.append(created.json()["id"])
    outcome = run(fhir, pid)
    assert (outcome.status, outcome.report_id, outcome.version, outcome.superseded) == (
        "written", legacy[1], "2", 2)
    reports = our_reports(fhir, pid)
    assert sorted(r["id"] for r in reports) == sorted(legacy)  # no third report
    adopted = fhir.read("DiagnosticReport", legacy[1])
    values = [i["value"] for i in adopted["identifier"]]
    assert values == [outcome.identifier, f"{1:064x}"]
    assert fhir.read("DiagnosticReport", legacy[0])["meta"]["versionId"] == "1"  # untouched
    prov = next(iter(fhir.search("Provenance", {"target": f"DiagnosticReport/{legacy[1]}"})))
    assert sorted(e["what"]["reference"] for e in prov["entity"] if e["role"] == "revision") \
        == sorted(f"DiagnosticReport/{rid}/_history/1" for rid in legacy)
    assert run(fhir, pid).status == "exists"  # found by the current identifier from now on
