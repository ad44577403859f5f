"""5. Bad input: property-based fuzzing (hypothesis) of Observations, DocumentReferences, search
Bundles and webhook notifications through the worker's own code path, then explicit hard
cases (a 5 MB note, a 50,000-point series, non-UTF-8 bytes, wrong units, future dates,
duplicates) with time and memory bounds.

Properties: nothing raises but a FhirError; every input resource is either used or skipped with
a reason; the report Bundle is strict JSON (no NaN/Infinity). No server is needed: the FHIR
client runs over an httpx MockTransport that serves the fuzzed resources.
"""

from __future__ import annotations

import base64
import json
import math
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import httpx
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.encoding.labs import MAX_READINGS, build_lab_frame
from clinragen_fhir.encoding.notes import MAX_NOTE_CHARS, decode_notes
from clinragen_fhir.encoding.schema import PatientContext, Skip
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError
from clinragen_fhir.inference.fallback import build_predictor
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.pipeline import Predictor, diagnose_patient
from clinragen_fhir.report.build import InputRef, build_transaction
from clinragen_fhir.webhook import SECRET_HEADER, WebhookConfig, make_app, patients_in
from tests.reliability.stack import FULL, record

pytestmark = pytest.mark.timeout(3600 if FULL else 600)
# cases per property; the four together: ~1,000 (short) or ~10,500 (full)
N = {"obs": 3000, "doc": 3000, "bundle": 1500, "notify": 3000} if FULL else \
    {"obs": 300, "doc": 300, "bundle": 150, "notify": 300}
CASES: Counter[str] = Counter()
NOW = datetime(2026, 6, 1, tzinfo=UTC)
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@cache
def runtime() -> tuple[KnowledgeGraph, Predictor]:
    kg = load_graph(None)
    return kg, build_predictor(None, kg)


def _loincs() -> list[str]:
    return sorted(runtime()[0].labs())[:40]


# -- strategies ----------------------------------------------------------------------------------
json_leaf = st.none() | st.booleans() | st.integers(-10**20, 10**20) | \
    st.floats(allow_nan=False) | st.text(max_size=20)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) |
                        st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
ids = st.text(st.sampled_from("abcXYZ019-."), min_size=1, max_size=12)
dates = st.one_of(
    st.datetimes(min_value=datetime(1800, 1, 1), max_value=datetime(2200, 1, 1),
                 timezones=st.just(UTC)).map(lambda d: d.isoformat()),
    st.sampled_from(["2024", "2024-02", "2024-02-30", "not a date", "", "2024-13-01T00:00:00Z",
                     "9999-12-31", "0001-01-01", "2024-01-01T25:61:00+14:00"]),
    json_leaf)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-10**30, 10**30), st.sampled_from([0, -1, 1e308, -1e-308, 7.4]),
                    st.text(max_size=5))
units = st.sampled_from(["%", "mg/dL", "mmol/L", "g/L", "kg", "mm[Hg]", "/min", "Cel", "[degF]",
                         "10*3/uL", "", "furlongs", "mmol/mol", "%{HbA1c}"]) | st.text(max_size=6)


def quantity() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"value": numbers}, optional={
        "unit": units, "code": units, "system": st.sampled_from(
            ["http://unitsofmeasure.org", "urn:x"])})


def coding(codes: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"coding": st.lists(st.fixed_dictionaries({
        "system": st.sampled_from(["http://loinc.org", "http://snomed.info/sct", "urn:x"]),
        "code": codes}), max_size=3)}, optional={"text": st.text(max_size=10)})


@st.composite
def observation(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:  # anything at all, sometimes claiming to be one
        junk = draw(json_any)
        if isinstance(junk, dict) and draw(st.booleans()):
            junk["resourceType"] = "Observation"
        return junk
    loinc = st.sampled_from(_loincs()) | st.text(max_size=8)
    obs: dict[str, Any] = {
        "resourceType": "Observation", "id": draw(ids),
        "status": draw(st.sampled_from(["final", "amended", "preliminary", "cancelled",
                                        "entered-in-error", "bogus"])),
        "code": draw(coding(loinc)),
        "category": [draw(coding(st.sampled_from(["laboratory", "vital-signs", "survey",
                                                  "exam"])))],
        "subject": {"reference": "Patient/p1"},
    }
    key = draw(st.sampled_from(["effectiveDateTime", "issued", "effectiveInstant", "none"]))
    if key != "none":
        obs[key] = draw(dates)
    kind = draw(st.sampled_from(["quantity", "components", "string", "none"]))
    if kind == "quantity":
        obs["valueQuantity"] = draw(quantity())
    elif kind == "components":
        obs["component"] = draw(st.lists(st.fixed_dictionaries(
            {"code": coding(loinc), "valueQuantity": quantity()}), max_size=3))
    elif kind == "string":
        obs["valueString"] = draw(st.text(max_size=10))
    if draw(st.booleans()):
        obs["referenceRange"] = [{"low": draw(quantity()), "high": draw(quantity())}]
    if draw(st.booleans()):
        obs["meta"] = {"versionId": draw(st.text(max_size=4) | st.integers())}
    return obs


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@st.composite
def document(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_any)
    ctype = draw(st.sampled_from(["text/plain", "text/html", "text/plain; charset=latin-1",
                                  "text/plain; charset=bogus-8", "application/pdf", "",
                                  "TEXT/HTML; charset=utf-16"]))
    data = draw(st.one_of(st.binary(max_size=300).map(b64),
                          st.text(max_size=300).map(lambda t: b64(t.encode())),
                          st.just("%%%not base64%%%"), st.text(max_size=20)))
    att: dict[str, Any] = {"contentType": ctype}
    if draw(st.integers(0, 5)):
        att["data"] = data
    else:
        att["url"] = "http://example.org/x"
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference", "id": draw(ids),
        "status": draw(st.sampled_from(["current", "superseded", "entered-in-error", "x"])),
        "content": draw(st.lists(st.just({"attachment": att}), max_size=2)),
        "subject": {"reference": "Patient/p1"}}
    if draw(st.booleans()):
        doc["date"] = draw(dates)
    return doc


def bundle_of(items: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    entry = st.one_of(items.map(lambda r: {"resource": r}), json_any)
    return st.one_of(
        st.fixed_dictionaries({"resourceType": st.just("Bundle"), "type": st.just("searchset"),
                               "entry": st.lists(entry, max_size=8)},
                              optional={"link": json_any}),
        json_any)


# -- properties ----------------------------------------------------------------------------------
def _accounted(inputs: list[Any], used_refs: set[str], skips: list[Skip], kind: str) -> None:
    """Every input resource is used or skipped, and every skip names its reason."""
    assert all(isinstance(s.reason, str) and s.reason.strip() for s in skips)
    skipped = {s.reference for s in skips}
    for raw in inputs:
        ref = f"{kind}/{raw.get('id', '?')}" if isinstance(raw, dict) else f"{kind}/?"
        assert ref in used_refs or ref in skipped, ref


def _strict_json(bundle: dict[str, Any]) -> None:
    json.dumps(bundle, allow_nan=False)  # the server would refuse NaN/Infinity


def _report(labs: pd.DataFrame, notes: list[Any], skips: list[Skip]) -> None:
    predictor = runtime()[1]
    patient = PatientContext("p1", "female", datetime(1960, 1, 1, tzinfo=UTC), NOW)
    prediction = predictor.predict(labs, notes, patient)
    used = [InputRef(r, v) for r, v in
            labs[["observation_id", "version_id"]].drop_duplicates().itertuples(index=False)]
    bundle, _ = build_transaction("p1", prediction, used, skips, ReportSettings(), now=NOW,
                                  labs=labs)
    _strict_json(bundle)


@settings(FUZZ, max_examples=N["obs"])
@given(st.lists(observation(), max_size=6))
def test_fuzzed_observations(observations: list[Any]) -> None:
    CASES["obs"] += 1
    kg, _ = runtime()
    patient = PatientContext("p1", "male", datetime(1970, 1, 1, tzinfo=UTC), NOW)
    labs, skips = build_lab_frame(observations, kg, patient, NOW)
    _accounted(observations, set(labs["observation_id"]), skips, "Observation")
    assert labs["value"].map(math.isfinite).all()
    assert (labs["time"] <= pd.Timestamp(NOW + timedelta(days=1))).all()
    _report(labs, [], skips)


@settings(FUZZ, max_examples=N["doc"])
@given(st.lists(document(), max_size=5))
def test_fuzzed_documents(documents: list[Any]) -> None:
    CASES["doc"] += 1
    notes, skips = decode_notes(documents)
    _accounted(documents, {n.document_id for n in notes}, skips, "DocumentReference")
    assert all(len(n.text) <= MAX_NOTE_CHARS and n.text.strip() for n in notes)
    if notes:
        _report(build_lab_frame([], runtime()[0])[0], notes, skips)


def _answer(body: Any) -> httpx.Response:
    """JSON as a lax server might send it (Python's json reads NaN/Infinity back)."""
    return httpx.Response(200, content=json.dumps(body).encode(),
                          headers={"Content-Type": "application/fhir+json"})


def _server(patient: Any, observations: Any, documents: Any,
            seen: list[dict[str, Any]]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST":
            body = json.loads(request.content)
            seen.append(body)
            return httpx.Response(200, json={"resourceType": "Bundle", "type":
                                             "transaction-response", "entry": [
                {"response": {"status": "201", "location":
                              "DiagnosticReport/r1/_history/1"}}]})
        if path.endswith("/Patient/p1"):
            return _answer(patient)
        if path.endswith("/Observation"):
            return _answer(observations)
        if path.endswith("/DocumentReference"):
            return _answer(documents)
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"})
    return handler


@settings(FUZZ, max_examples=N["bundle"])
@given(st.one_of(st.just({"resourceType": "Patient", "id": "p1", "gender": "female"}),
                 json_any), bundle_of(observation()), bundle_of(document()))
def test_fuzzed_search_bundles_through_diagnose_patient(patient: Any, observations: Any,
                                                        documents: Any) -> None:
    """The worker's whole path (read, search, encode, predict, write) over fuzzed answers:
    it ends with an outcome or a FhirError, nothing else; what it writes is strict JSON."""
    CASES["bundle"] += 1
    kg, predictor = runtime()
    written: list[dict[str, Any]] = []
    transport = httpx.MockTransport(_server(patient, observations, documents, written))
    with FhirClient("http://127.0.0.1:9/fhir", transport=transport, retries=0) as client:
        try:
            outcome = diagnose_patient(client, kg, predictor, "p1", ReportSettings(), now=NOW)
        except FhirError:
            return
    assert outcome.status in ("written", "exists", "skipped")
    for body in written:
        _strict_json(body)


SECRET = "fuzz-secret-0123456789"


class _Seen:
    def __init__(self) -> None:
        self.keys: set[str] = set()

    def add(self, key: str, ttl_s: int) -> bool:
        if key in self.keys:
            return False
        self.keys.add(key)
        return True


@cache
def _webhook() -> tuple[TestClient, list[str]]:
    queued: list[str] = []
    app = make_app(WebhookConfig(secret=SECRET.encode(), debounce_s=0), _Seen(),
                   lambda pid, countdown: queued.append(pid))
    return TestClient(app), queued


notification = st.one_of(
    json_any,
    st.fixed_dictionaries({"resourceType": st.just("Bundle"), "type": st.just("history"),
                           "entry": st.lists(st.one_of(json_any, st.fixed_dictionaries({
                               "resource": st.one_of(observation(), json_any,
                                                     st.fixed_dictionaries({
                                                         "resourceType": st.sampled_from(
                                                             ["Parameters",
                                                              "SubscriptionStatus"]),
                                                         "parameter": json_any,
                                                         "notificationEvent": json_any,
                                                         "subscription": json_any}))})),
                               max_size=4)}),
    observation())


@settings(FUZZ, max_examples=N["notify"])
@given(notification, st.sampled_from(["/notify", "/notify/Observation/o1"]))
def test_fuzzed_notifications(payload: Any, path: str) -> None:
    """Authenticated but arbitrary payloads: a 2xx/4xx answer, never a server error."""
    CASES["notify"] += 1
    client, _ = _webhook()
    body = json.dumps(payload).encode()
    method = "PUT" if path != "/notify" else "POST"
    answer = client.request(method, path, content=body, headers={SECRET_HEADER: SECRET})
    assert answer.status_code in (200, 202, 400, 413), answer.text
    if isinstance(payload, dict):
        patients, _ = patients_in(payload)
        assert all(isinstance(p, str) and p for p in patients)


def test_zz_fuzz_case_counts() -> None:
    """Runs after the properties (file order): records how many cases each one ran."""
    total = sum(CASES.values())
    record("fuzz", {"cases": dict(CASES), "total_cases": total, "crashes": 0,
                    "target": sum(N.values())})
    assert total >= sum(N.values()) * 0.9, CASES


# -- explicit hard cases -------------------------------------------------------------------------
@contextmanager
def bounded(name: str, seconds: float, mib: float, figures: dict[str, Any]) -> Iterator[None]:
    """Wall time and peak Python allocation (tracemalloc) of the block, asserted."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    figures[name] = {"seconds": round(elapsed, 2), "peak_mib": round(peak, 1),
                     "bound_seconds": seconds, "bound_mib": mib}
    assert elapsed < seconds, (name, elapsed)
    assert peak < mib, (name, peak)


def a1c(oid: str, value: Any, when: datetime, unit: str = "%") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "meta": {"versionId": "1"},
            "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "effectiveDateTime": when.isoformat(),
            "valueQuantity": {"value": value, "unit": unit, "code": unit}}


def note(nid: str, data: bytes, ctype: str = "text/plain") -> dict[str, Any]:
    return {"resourceType": "DocumentReference", "id": nid, "status": "current",
            "date": "2026-01-02T03:04:05Z",
            "content": [{"attachment": {"contentType": ctype, "data": b64(data)}}]}


EXPLICIT: dict[str, Any] = {}
SERIES = 50_000 if FULL else 25_000  # both past MAX_READINGS (20,000)


def test_explicit_hard_inputs_in_bounded_time_and_memory() -> None:
    kg, _ = runtime()
    patient = PatientContext("p1", "female", datetime(1960, 1, 1, tzinfo=UTC), NOW)
    five_mb = (b"HbA1c 8.1 % on 2026-01-02. Polyuria and polydipsia. " * 100_000)[:5 * 2**20]
    with bounded("note_5_MB_plain", 10, 80, EXPLICIT):
        notes, skips = decode_notes([note("big", five_mb)])
    assert len(notes) == 1 and len(notes[0].text) == MAX_NOTE_CHARS and not skips
    with bounded("note_5_MB_html", 30, 200, EXPLICIT):
        notes, skips = decode_notes([note("bightml", b"<p>" + five_mb + b"</p>", "text/html")])
    assert len(notes) == 1 and len(notes[0].text) == MAX_NOTE_CHARS
    with bounded("note_9_MB_skipped", 10, 80, EXPLICIT):
        notes, skips = decode_notes([note("huge", b"x" * (9 * 2**20))])
    assert not notes and "larger than 8 MiB" in skips[0].reason
    with bounded("note_non_utf8", 2, 20, EXPLICIT):
        notes, skips = decode_notes([
            note("latin", "Hämoglobin A1c erhöht".encode("latin-1")),
            note("bytes", bytes(range(256)) * 4),
            note("charset", "Glukose".encode("utf-16"), "text/plain; charset=bogus")])
    assert len(notes) == 3 and "\ufffd" in notes[0].text

    start = NOW - timedelta(days=3 * 365)
    series = [a1c(f"s{i}", 5.0 + (i % 40) / 10, start + timedelta(minutes=30 * i))
              for i in range(SERIES)]
    with bounded(f"series_{SERIES}_points", 120, 300, EXPLICIT):
        labs, skips = build_lab_frame(series, kg, patient, NOW)
    assert len(labs) == MAX_READINGS
    assert len(skips) == SERIES - MAX_READINGS  # the older readings are skipped with a reason
    assert all("newest" in s.reason for s in skips)
    with bounded(f"series_{SERIES}_predict_and_report", 60, 300, EXPLICIT):
        _report(labs, [], skips)

    now_plus = NOW + timedelta(days=30)
    odd = [a1c("wrong-unit", 7.5, NOW - timedelta(days=3), "mg/dL"),
           a1c("furlongs", 7.5, NOW - timedelta(days=3), "furlongs"),
           a1c("future", 7.5, now_plus),
           a1c("dup", 7.5, NOW - timedelta(days=2)), a1c("dup", 7.9, NOW - timedelta(days=1)),
           a1c("nan", float("nan"), NOW - timedelta(days=1)),
           a1c("ok", 7.5, NOW - timedelta(days=1))]
    with bounded("wrong_units_future_duplicates", 5, 50, EXPLICIT):
        labs, skips = build_lab_frame(odd, kg, patient, NOW)
    reasons = {s.reference.split("/")[1]: s.reason for s in skips}
    assert set(labs["observation_id"]) == {"Observation/ok", "Observation/dup"}
    assert "future" in reasons["future"] and "duplicate" in reasons["dup"]
    assert "wrong-unit" in reasons and "furlongs" in reasons and "nan" in reasons
    record("bad_input_explicit", {"cases": EXPLICIT, "reasons": reasons})
