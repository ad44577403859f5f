"""5. Bad input: property-based fuzzing (hypothesis) of Observations, DocumentReferences, search
Bundles and webhook notifications through the worker's own code path, then explicit hard
cases (a 5 MB note, a 50,000-point series, non-UTF-8 bytes, wrong units, future dates,
duplicates) with time and memory bounds.

Properties: nothing raises but a FhirError; every input resource is either used or skipped with
a reason; the report Bundle is strict JSON (no NaN/Infinity); search answers come as pages whose
`next` links the client follows (every page read once, every resource on them counted), and
hostile links (another origin, a cycle) end the task; an accepted notification queues exactly
the tasks it says, for the patients it names, or says why none. No server is needed: the FHIR
client runs over an httpx MockTransport that serves the fuzzed resources.

Each run draws a fresh seed and prints it (`fuzz seed N`); `RELIABILITY_FUZZ_SEED=N` replays
that run. A case that breaks a property is counted as a crash, recorded with its input in the
results file (`fuzz.json`), and fails its test with the first failing cases.

Over 400 lines because the fuzzing strategies and the explicit hard cases share their
builders and bounds.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException
from starlette.testclient import TestClient

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.encoding.labs import MAX_READINGS, build_lab_frame
from clinragen_fhir.encoding.notes import MAX_NOTE_CHARS, extract_notes
from clinragen_fhir.encoding.schema import PatientContext, Skip
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError
from clinragen_fhir.fhir.notifications import patients_in
from clinragen_fhir.inference.fallback import build_predictor
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.pipeline import diagnose_patient
from clinragen_fhir.predict.types import Predictor
from clinragen_fhir.report.build import InputRef, build_transaction
from clinragen_fhir.webhook import SECRET_HEADER, WebhookConfig, make_app
from tests.fhir_batch import batching
from tests.reliability.stack import FULL, record

pytestmark = pytest.mark.timeout(3600 if FULL else 600)
# cases per property; the four together: ~1,000 (short) or ~10,500 (full)
N = {"obs": 3000, "doc": 3000, "bundle": 1500, "notify": 3000} if FULL else \
    {"obs": 300, "doc": 300, "bundle": 150, "notify": 300}
CASES: Counter[str] = Counter()
CHAINS: Counter[str] = Counter()  # search answers by kind of paging, and chains followed
OUTCOMES: Counter[str] = Counter()  # notifications: queued, or the reason why not
NOW = datetime(2026, 6, 1, tzinfo=UTC)
# a fresh seed per run (printed, and in fuzz.json); RELIABILITY_FUZZ_SEED=N replays run N
SEED = int(os.environ.get("RELIABILITY_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
FUZZ = settings(deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def _print_seed(request: pytest.FixtureRequest) -> None:
    line = f"fuzz seed {SEED} (replay: RELIABILITY_FUZZ_SEED={SEED})"
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin(
        "capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():  # on the terminal, not in captured output
        reporter.write_line(line)


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


# Search answers are served as pages that link on to each other the way a server pages: the
# `next` link is an absolute URL on the client's own base (HAPI's `?_getpages=` form or a
# `_page=` search), so the client follows it and the property can check that every page was
# read. A few chains are hostile on purpose (a `next` to another origin, a cycle back to the
# first page) and some links are arbitrary JSON: those must end in a FhirError or an outcome,
# never a crash, and a foreign origin is never contacted.
BASE = "http://127.0.0.1:9/fhir"
PAGE_SIZE = 5
MAX_PAGES = 8  # the test client's page limit: a cycle ends in a FhirError after this many


def page_url(rtype: str, k: int, form: str) -> str:
    if form == "getpages":  # HAPI's paging links
        return (f"{BASE}?_getpages={rtype}-{k:04d}&_getpagesoffset={k * PAGE_SIZE}"
                f"&_count={PAGE_SIZE}&_bundletype=searchset")
    return f"{BASE}/{rtype}?patient=p1&_count={PAGE_SIZE}&_page={k}"


@st.composite
def search_answer(draw: st.DrawFn, rtype: str, items: st.SearchStrategy[Any]) -> dict[str, Any]:
    """A search answer as `{"links": kind, "pages": [page 0, page 1, ...]}`; kind is "ok"
    (every `next` usable), "foreign", "cycle", "junk" (arbitrary JSON links) or "broken"
    (the first answer is not a Bundle at all)."""
    if draw(st.integers(0, 9)) == 0:
        return {"links": "broken", "pages": [draw(json_any)]}
    kind = draw(st.sampled_from(["ok"] * 6 + ["foreign", "cycle", "junk"]))
    form = draw(st.sampled_from(["getpages", "page"]))
    n = draw(st.integers(1, 4)) if kind == "ok" else draw(st.integers(2, 4))
    resource = items.map(lambda r: {"resource": r})
    # mostly entries a server would send; sometimes any JSON among them
    entry = resource if draw(st.integers(0, 3)) else st.one_of(resource, json_any)
    pages: list[Any] = []
    for k in range(n):
        page: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                                "entry": draw(st.lists(entry, max_size=PAGE_SIZE)),
                                "link": [{"relation": "self", "url": page_url(rtype, k, form)}]}
        if k + 1 < n:
            page["link"].append({"relation": "next", "url": page_url(rtype, k + 1, form)})
        elif kind == "foreign":
            page["link"].append({"relation": "next", "url": "https://fhir.example.org/fhir/"
                                 f"{rtype}?_page={k + 1}"})
        elif kind == "cycle":
            page["link"].append({"relation": "next", "url": page_url(rtype, 0, form)})
        if k and draw(st.booleans()):
            page["link"].append({"relation": "previous", "url": page_url(rtype, k - 1, form)})
        if kind == "junk" and draw(st.booleans()):
            page["link"] = draw(json_any)
        pages.append(page)
    return {"links": kind, "pages": pages}


# -- properties ----------------------------------------------------------------------------------
# A property that raises (anything but the FhirError a search may end in) or fails an assertion
# on a case is a crash: it is recorded with the case (not shrunk) and the run goes on, so the
# results file counts them; each property test then fails on its own list.
CRASHES: list[dict[str, Any]] = []


def _guard(kind: str, example: Any, check: Callable[[], None]) -> None:
    CASES[kind] += 1
    try:
        check()
    except HypothesisException:
        raise
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        CRASHES.append({"property": kind, "assertion": isinstance(exc, AssertionError),
                        "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                        "at": f"{Path(frame.filename).name}:{frame.lineno}",
                        "example": repr(example)[:600]})


def _no_crashes(kind: str) -> None:
    crashes = [c for c in CRASHES if c["property"] == kind]
    assert not crashes, (f"{len(crashes)} of {CASES[kind]} {kind} cases failed "
                         f"(replay: RELIABILITY_FUZZ_SEED={SEED}); first ones:\n" +
                         "\n".join(json.dumps(c) for c in crashes[:5]))


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


@seed(SEED)
@settings(FUZZ, max_examples=N["obs"])
@given(st.lists(observation(), max_size=6))
def _observations(observations: list[Any]) -> None:
    def check() -> None:
        kg, _ = runtime()
        patient = PatientContext("p1", "male", datetime(1970, 1, 1, tzinfo=UTC), NOW)
        labs, skips = build_lab_frame(observations, kg, patient, NOW)
        _accounted(observations, set(labs["observation_id"]), skips, "Observation")
        assert labs["value"].map(math.isfinite).all()
        assert (labs["time"] <= pd.Timestamp(NOW + timedelta(days=1))).all()
        _report(labs, [], skips)
    _guard("obs", observations, check)


def test_fuzzed_observations() -> None:
    _observations()
    _no_crashes("obs")


@seed(SEED)
@settings(FUZZ, max_examples=N["doc"])
@given(st.lists(document(), max_size=5))
def _documents(documents: list[Any]) -> None:
    def check() -> None:
        notes, skips = extract_notes(documents)
        _accounted(documents, {n.document_id for n in notes}, skips, "DocumentReference")
        assert all(len(n.text) <= MAX_NOTE_CHARS and n.text.strip() for n in notes)
        if notes:
            _report(build_lab_frame([], runtime()[0])[0], notes, skips)
    _guard("doc", documents, check)


def test_fuzzed_documents() -> None:
    _documents()
    _no_crashes("doc")


def _answer(body: Any) -> httpx.Response:
    """JSON as a lax server might send it (Python's json reads NaN/Infinity back)."""
    return httpx.Response(200, content=json.dumps(body).encode(),
                          headers={"Content-Type": "application/fhir+json"})


def _server(patient: Any, answers: dict[str, dict[str, Any]], fetched: Counter[tuple[str, int]],
            hosts: set[str], written: list[dict[str, Any]]
            ) -> Callable[[httpx.Request], httpx.Response]:
    """Serves the patient, each search answer page by page (by its paging link), an empty
    DiagnosticReport search, and a successful transaction response; records what was asked."""
    def handler(request: httpx.Request) -> httpx.Response:
        hosts.add(request.url.host)
        path, q = request.url.path, request.url.params
        if request.method == "POST":
            written.append(json.loads(request.content))
            return httpx.Response(200, json={"resourceType": "Bundle", "type":
                                             "transaction-response", "entry": [
                {"response": {"status": "201", "location":
                              "DiagnosticReport/r1/_history/1"}}]})
        if path.endswith("/Patient/p1"):
            return _answer(patient)
        if "_getpages" in q:
            rtype, k = q["_getpages"].split("-")[0], int(q["_getpagesoffset"]) // PAGE_SIZE
        else:
            rtype, k = path.rsplit("/", 1)[-1], int(q.get("_page", "0"))
        if rtype in answers:
            fetched[(rtype, k)] += 1
            return _answer(answers[rtype]["pages"][k])
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"})
    return handler


def _well_formed(answer: dict[str, Any]) -> bool:
    """Usable links and every page a searchset whose entries are objects."""
    return answer["links"] == "ok" and all(
        isinstance(p.get("entry"), list) and all(isinstance(e, dict) for e in p["entry"])
        for p in answer["pages"])


def _resources(answer: dict[str, Any]) -> int:
    return sum(isinstance(e.get("resource"), dict) for p in answer["pages"] for e in p["entry"])


def _audited_reads(written: list[dict[str, Any]]) -> dict[str, str]:
    """What the read AuditEvent says was read ("Observation read": "7", ...)."""
    for body in written:
        for entry in body.get("entry", []):
            res = entry.get("resource", {})
            if res.get("resourceType") == "AuditEvent":
                return {d["type"]: d["valueString"] for e in res.get("entity", [])
                        for d in e.get("detail", []) if d["type"].endswith(" read")}
    return {}


@seed(SEED)
@settings(FUZZ, max_examples=N["bundle"])
@given(st.sampled_from([True, True, False]).flatmap(
    lambda ok: st.just({"resourceType": "Patient", "id": "p1", "gender": "female"}) if ok
    else json_any), search_answer("Observation", observation()),
       search_answer("DocumentReference", document()))
def _search_bundles(patient: Any, observations: dict[str, Any],
                    documents: dict[str, Any]) -> None:
    def check() -> None:
        kg, predictor = runtime()
        answers = {"Observation": observations, "DocumentReference": documents}
        fetched: Counter[tuple[str, int]] = Counter()
        hosts: set[str] = set()
        written: list[dict[str, Any]] = []
        transport = httpx.MockTransport(batching(_server(patient, answers, fetched, hosts,
                                                         written)))
        outcome = None
        with FhirClient(BASE, transport=transport, retries=0, page_size=PAGE_SIZE,
                        max_pages=MAX_PAGES) as client, suppress(FhirError):
            outcome = diagnose_patient(client, kg, predictor, "p1", ReportSettings(),
                                       now=NOW)
        assert hosts <= {"127.0.0.1"}, hosts  # a foreign `next` is never followed
        for body in written:
            _strict_json(body)
        for r, a in answers.items():
            CHAINS[f"{r} links {a['links']}"] += 1
            assert sum(n for (rt, _), n in fetched.items() if rt == r) <= MAX_PAGES, fetched
        # the searches run in order (Observation, then DocumentReference) once the Patient
        # was read: a hostile chain the client reached must end the task with a FhirError
        hostile = {r for r, a in answers.items() if a["links"] in ("foreign", "cycle")}
        if isinstance(patient, dict) and ("Observation" in hostile or (
                "DocumentReference" in hostile and _well_formed(observations))):
            assert outcome is None, (hostile, outcome)
        if isinstance(patient, dict) and all(_well_formed(a) for a in answers.values()):
            # usable links: every page of both chains read exactly once, every resource on
            # them counted in the read AuditEvent, and an outcome
            assert outcome is not None and outcome.status in ("written", "exists", "skipped")
            expected = {(r, k): 1 for r, a in answers.items() for k in range(len(a["pages"]))}
            assert dict(fetched) == expected, (dict(fetched), expected)
            audited = _audited_reads(written)
            assert audited == {f"{r} read": str(_resources(a)) for r, a in answers.items()}, \
                audited
            CHAINS["followed"] += 1
            if any(len(a["pages"]) > 1 for a in answers.values()):
                CHAINS["multi_page_followed"] += 1
        elif outcome is not None:
            assert outcome.status in ("written", "exists", "skipped")
    _guard("bundle", (patient, observations, documents), check)


def test_fuzzed_search_bundles_through_diagnose_patient() -> None:
    """The worker's whole path (read, search page by page, encode, predict, write) over fuzzed
    answers: it ends with an outcome or a FhirError, nothing else; what it writes is strict
    JSON; usable paging links are all followed, hostile ones end the task."""
    _search_bundles()
    _no_crashes("bundle")
    # the strategy really produced followable chains: multi-page, well-formed, both searches
    assert CHAINS["multi_page_followed"] > 0, CHAINS


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
def _webhook() -> tuple[TestClient, list[str], _Seen]:
    queued: list[str] = []
    seen = _Seen()
    app = make_app(WebhookConfig(secret=SECRET.encode(), debounce_s=0), seen,
                   lambda pid, countdown: queued.append(pid))
    return TestClient(app), queued, seen


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


def _names_p1(payload: Any) -> bool:
    """The oracle, independent of the receiver's parser: the payload is one of the strategy's
    Observations (subject Patient/p1), or a Bundle with one as an entry's resource."""
    def is_obs(r: Any) -> bool:
        return isinstance(r, dict) and r.get("resourceType") == "Observation" and \
            r.get("subject") == {"reference": "Patient/p1"}
    if is_obs(payload):
        return True
    return isinstance(payload, dict) and payload.get("resourceType") == "Bundle" and \
        isinstance(payload.get("entry"), list) and \
        any(isinstance(e, dict) and is_obs(e.get("resource")) for e in payload["entry"])


def _said(answer: httpx.Response) -> dict[str, Any]:
    """What the receiver answered, from its JSON (`/notify`) or the OperationOutcome's
    diagnostics ("accepted: 1, patients: 1") of HAPI's route."""
    body = answer.json()
    if body.get("resourceType") != "OperationOutcome":
        return dict(body)
    text = str(body["issue"][0].get("diagnostics", ""))
    said: dict[str, Any] = dict(part.split(": ", 1) for part in text.split(", ") if ": " in part)
    for key in ("accepted", "patients"):
        if key in said and said[key].isdigit():
            said[key] = int(said[key])
    return said


@seed(SEED)
@settings(FUZZ, max_examples=N["notify"])
@given(notification, st.sampled_from(["/notify", "/notify/Observation/o1"]))
def _notifications(payload: Any, path: str) -> None:
    def check() -> None:
        client, queued, seen = _webhook()
        queued.clear()
        seen.keys.clear()  # each case on a fresh de-duplication store: nothing is a duplicate
        body = json.dumps(payload).encode()
        method = "PUT" if path != "/notify" else "POST"
        answer = client.request(method, path, content=body, headers={SECRET_HEADER: SECRET})
        assert answer.status_code in (200, 202, 400, 413), answer.text
        said = _said(answer)
        if answer.status_code >= 400:  # refused, with the reason, and nothing queued
            assert str(said.get("error", "")).strip(), said
            assert not queued, queued
            return
        # accepted: the answer tells what was queued, and nothing unnamed was queued
        assert said.get("accepted") == len(queued), (said, queued)
        named, _ = patients_in(payload) if isinstance(payload, dict) else (set(), "")
        assert set(queued) <= named and all(isinstance(p, str) and p for p in queued), queued
        if _names_p1(payload):
            assert "p1" in queued, (said, queued)  # its patient's task is queued
        if not queued:  # or the reason why not
            assert str(said.get("reason", "")).strip() or said.get("patients") == 0, said
        OUTCOMES["queued" if queued else f"not queued: {said.get('reason') or 'no patient'}"] \
            += 1
    _guard("notify", (path, payload), check)


def test_fuzzed_notifications() -> None:
    """Authenticated but arbitrary payloads: never a server error; every answer is either
    tasks queued (exactly those it says, for the patients the notification names) or the
    reason nothing was."""
    _notifications()
    _no_crashes("notify")
    assert OUTCOMES["queued"] > 0, OUTCOMES


def test_zz_fuzz_case_counts() -> None:
    """Runs after the properties (file order): records how many cases each one ran, the seed,
    and the crashes counted (with the first failing cases)."""
    total = sum(CASES.values())
    record("fuzz", {"seed": SEED, "replay": f"RELIABILITY_FUZZ_SEED={SEED}",
                    "cases": dict(CASES), "total_cases": total, "crashes": len(CRASHES),
                    "crashes_by_property": dict(Counter(c["property"] for c in CRASHES)),
                    "failing_examples": CRASHES[:20], "paging": dict(CHAINS),
                    "notification_outcomes": dict(OUTCOMES), "target": sum(N.values())})
    assert total >= sum(N.values()) * 0.9, CASES
    assert not CRASHES, f"{len(CRASHES)} crashes (RELIABILITY_FUZZ_SEED={SEED}): {CRASHES[:5]}"


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
        notes, skips = extract_notes([note("big", five_mb)])
    assert len(notes) == 1 and len(notes[0].text) == MAX_NOTE_CHARS and not skips
    with bounded("note_5_MB_html", 30, 200, EXPLICIT):
        notes, skips = extract_notes([note("bightml", b"<p>" + five_mb + b"</p>", "text/html")])
    assert len(notes) == 1 and len(notes[0].text) == MAX_NOTE_CHARS
    with bounded("note_9_MB_skipped", 10, 80, EXPLICIT):
        notes, skips = extract_notes([note("huge", b"x" * (9 * 2**20))])
    assert not notes and "larger than 8 MiB" in skips[0].reason
    with bounded("note_non_utf8", 2, 20, EXPLICIT):
        notes, skips = extract_notes([
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
