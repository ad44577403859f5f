"""CDS Hooks patient-view service: discovery, the card from a stored report, validation, JWT
auth, the signed report link, and feedback recorded as an AuditEvent and a metric.

Over 400 lines because every endpoint is tested through one app and one key set built here.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.testclient import TestClient

from clinragen_fhir.cds.auth import JwtAuth, load_keys
from clinragen_fhir.cds.card import build_card
from clinragen_fhir.cds.config import CdsConfig
from clinragen_fhir.cds.requests import Feedback
from clinragen_fhir.cds.store import MemoryStore
from clinragen_fhir.cds_hooks import SERVICE_ID, count_feedback, make_app
from clinragen_fhir.config import LEGACY_ENV, ReportSettings, Settings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirConfigError
from clinragen_fhir.metrics import CDS_FEEDBACK
from clinragen_fhir.predict.types import Diagnosis, Evidence, Prediction
from clinragen_fhir.report.build import EXT_BASE, InputRef, build_transaction

PID = "pat-4711"
SYSTEM = ReportSettings().identifier_system
BASE = "https://cds.example.org"
ISSUER = "https://ehr.example.org"
CDS_ENV = [f"CLINRAGEN_CDS_HOOKS__{k.upper()}" for k in (
    "auth", "jwt_issuer", "jwt_keys_file", "base_url", "report_url", "cors_origins",
    "link_secret_env", "link_secret_file", "metrics_port", "metrics_host")]
HOOK_URL = f"/cds-services/{SERVICE_ID}"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def stored_report() -> dict[str, Any]:
    """A report as the worker writes it (build_transaction), as HAPI hands it back."""
    from clinragen_fhir.knowledge import load_graph
    from clinragen_fhir.report.faithfulness import check_report_rationale
    from tests.unit.train_examples import frame

    t = datetime(2024, 3, 2, tzinfo=UTC)
    labs = frame([("4548-4", 7.1, t), ("2345-7", 150.0, t)])
    ev = Evidence("Observation/o1", "2", "4548-4", "HbA1c", 7.1, "%",
                  "2024-03-02T00:00:00+00:00", "HbA1c 7.1 % on 2024-03-02")
    names = [("44054006", "Diabetes mellitus type 2"), ("38341003", "Hypertensive disorder"),
             ("55822004", "Hyperlipidemia"), ("709044004", "Chronic kidney disease")]
    p = Prediction("knowledge-rule-baseline", "1", "kg-abc",
                   [Diagnosis(c, n, 0.9 - i / 10, (ev,)) for i, (c, n) in enumerate(names)],
                   "HbA1c 7.1 % on 2024-03-02, high. Glucose (serum/plasma) 90 mg/dL on "
                   "2024-03-02, low.")
    claims = check_report_rationale(p.rationale, labs, load_graph())
    bundle, _ = build_transaction(PID, p, [InputRef("Observation/o1", "2")], [],
                                  ReportSettings(), now=NOW, labs=labs, claims=claims)
    report = dict(bundle["entry"][1]["resource"])
    report.update(id="dr-1", meta={"versionId": "3", "lastUpdated": "2025-01-02T03:04:06Z"})
    return report


class Fhir:
    """A MockTransport FHIR server: searches answer `reports`, transactions are kept."""

    def __init__(self, reports: list[dict[str, Any]] | None = None, down: bool = False) -> None:
        self.reports = reports or []
        self.down = down
        self.requests: list[httpx.Request] = []
        self.transactions: list[dict[str, Any]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down:
            return httpx.Response(503, json={"resourceType": "OperationOutcome"})
        path = request.url.path.removeprefix("/fhir")
        if request.method == "POST" and path in ("", "/"):
            bundle = json.loads(request.content)
            self.transactions.append(bundle)
            return httpx.Response(200, json={"resourceType": "Bundle",
                                             "type": "transaction-response", "entry": [
                                                 {"response": {"status": "201"}}
                                                 for _ in bundle["entry"]]})
        if path == "/DiagnosticReport":
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                             "entry": [{"resource": r} for r in self.reports]})
        for r in self.reports:
            if path in (f"/DiagnosticReport/{r['id']}",
                        f"/DiagnosticReport/{r['id']}/_history/{r['meta']['versionId']}"):
                return httpx.Response(200, json=r)
        return httpx.Response(404, json={"resourceType": "OperationOutcome"})

    def client(self) -> FhirClient:
        return FhirClient("http://127.0.0.1:9/fhir", transport=httpx.MockTransport(self.handler),
                          retries=0)


def app(fhir: Fhir, auth: JwtAuth | None = None, store: MemoryStore | None = None,
        seen: list[Feedback] | None = None) -> TestClient:
    config = CdsConfig(auth=auth, base_url=BASE, link_secret=b"k" * 32)
    return TestClient(make_app(config, fhir.client, SYSTEM, store or MemoryStore(),
                               (seen.append if seen is not None else None)))


def hook_request(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                            "fhirServer": "https://elsewhere.example/fhir",
                            "context": {"patientId": PID, "userId": "Practitioner/dr-1"}}
    body.update(overrides)
    return body


def test_discovery_lists_the_patient_view_service() -> None:
    answer = app(Fhir()).get("/cds-services")
    assert answer.status_code == 200
    (service,) = answer.json()["services"]
    assert service["hook"] == "patient-view" and service["id"] == SERVICE_ID
    assert service["title"] and service["description"]
    assert service["prefetch"] == {"patient": "Patient/{{context.patientId}}"}


def test_card_from_the_latest_stored_report_and_its_link(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    fhir = Fhir([stored_report()])
    client = app(fhir)
    with caplog.at_level(logging.INFO):
        answer = client.post(HOOK_URL, json=hook_request())
    assert answer.status_code == 200, answer.text
    (card,) = answer.json()["cards"]
    uuid.UUID(card["uuid"])
    assert card["summary"] == ("ClinRaGen (preliminary): Diabetes mellitus type 2, "
                               "Hypertensive disorder, Hyperlipidemia, +1 more")
    assert len(card["summary"]) <= 140
    assert "Chronic kidney disease" not in card["detail"]
    assert "1 of 2 lab claims checked" in card["detail"]
    assert card["indicator"] == "info"
    assert card["source"]["label"].startswith("ClinRaGen-FHIR")
    assert {r["code"] for r in card["overrideReasons"]} >= {"disagree"}
    (link,) = card["links"]
    assert link["type"] == "absolute"
    assert link["url"].startswith(f"{BASE}/reports/dr-1/_history/3?exp=")
    # one search on our server only (fhirServer in the request is ignored), newest first
    (search,) = fhir.requests
    assert search.url.host == "127.0.0.1" and search.url.path == "/fhir/DiagnosticReport"
    params = dict(search.url.params)
    assert params["subject"] == f"Patient/{PID}" and params["identifier"] == f"{SYSTEM}|"
    assert params["_sort"] == "-_lastUpdated"
    ours = [f"{r.getMessage()} {json.dumps(getattr(r, 'fields', {}))}" for r in caplog.records
            if r.name.startswith("clinragen_fhir")]
    assert ours and not any(PID in line for line in ours)  # hashed ids only

    page = client.get(link["url"].removeprefix(BASE))
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "Diabetes mellitus type 2" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"].startswith("no-store")
    tampered = link["url"].removeprefix(BASE).replace("/_history/3", "/_history/2")
    assert client.get(tampered).status_code == 403
    expired = link["url"].removeprefix(BASE).split("?")[0] + "?exp=1&sig=" + "0" * 64
    assert client.get(expired).status_code == 403


def test_markdown_in_server_text_is_escaped() -> None:
    report = stored_report()
    report["conclusionCode"] = [{"coding": [{"system": "http://snomed.info/sct", "code": "1",
                                             "display": "[click](https://evil.example)"}]}]
    card = build_card(report, "https://x.example/r", str(uuid.uuid4()))
    assert "[click](" not in card["detail"] and "\\[click\\]\\(" in card["detail"]


def test_the_card_names_the_codes_the_cap_left_out_escaped() -> None:
    report = stored_report()
    assert "not concluded" not in build_card(report, "https://x.example/r", "u")["detail"]
    report["extension"] = [*report.get("extension", []), *(
        {"url": f"{EXT_BASE}/withheld", "valueCodeableConcept": {"coding": [
            {"system": "http://snomed.info/sct", "code": code, "display": name}]}}
        for code, name in (("59621000", "Essential hypertension"), ("1", "[x](https://e.x)")))]
    report["extension"].append({"url": f"{EXT_BASE}/withheld", "valueString": "malformed"})
    detail = build_card(report, "https://x.example/r", "u")["detail"]
    assert ("**Also above its threshold, not concluded:** Essential hypertension; "
            "\\[x\\]\\(https://e.x\\)") in detail
    assert "Essential hypertension" not in build_card(report, "https://x.example/r",
                                                      "u")["summary"]


def test_no_report_or_no_disorder_gives_no_card() -> None:
    assert app(Fhir()).post(HOOK_URL, json=hook_request()).json() == {"cards": []}
    silent = stored_report()
    silent["conclusionCode"] = []
    assert app(Fhir([silent])).post(HOOK_URL, json=hook_request()).json() == {"cards": []}
    withdrawn = stored_report()
    withdrawn["status"] = "entered-in-error"
    assert app(Fhir([withdrawn])).post(HOOK_URL, json=hook_request()).json() == {"cards": []}


@pytest.mark.parametrize(("body", "needle"), [
    (hook_request(hook="order-select"), "hook must be"),
    (hook_request(hookInstance="not-a-uuid"), "hookInstance"),
    (hook_request(hookInstance=None), "hookInstance"),
    (hook_request(context={"patientId": "../Patient/x"}), "patientId"),
    (hook_request(context={"patientId": "a b"}), "patientId"),
    (hook_request(context={"patientId": 12}), "patientId"),
    (hook_request(context="p"), "context"),
    (hook_request(context={"patientId": PID, "userId": "http://x/?q"}), "userId"),
    (hook_request(prefetch={"patient": {"resourceType": "Patient", "id": "other"}}),
     "prefetch.patient"),
    ([1, 2], "object"),
])
def test_bad_hook_requests_are_refused_with_400(body: Any, needle: str) -> None:
    fhir = Fhir([stored_report()])
    answer = app(fhir).post(HOOK_URL, json=body)
    assert answer.status_code == 400 and needle in answer.json()["error"]
    assert not fhir.requests


def test_wrong_service_content_type_and_method() -> None:
    client = app(Fhir())
    assert client.post("/cds-services/other", json=hook_request()).status_code == 404
    assert client.post(HOOK_URL, content=b"{", headers={
        "content-type": "application/json"}).status_code == 400
    assert client.post(HOOK_URL, content=json.dumps(hook_request()),
                       headers={"content-type": "text/plain"}).status_code == 400
    assert client.get(HOOK_URL).status_code == 405


def test_fhir_server_down_is_a_503_not_a_crash() -> None:
    answer = app(Fhir(down=True)).post(HOOK_URL, json=hook_request())
    assert answer.status_code == 503 and answer.headers["retry-after"]


def test_feedback_records_an_audit_event_and_a_metric() -> None:
    fhir, seen = Fhir([stored_report()]), list[Feedback]()
    client = app(fhir, seen=seen)
    card = client.post(HOOK_URL, json=hook_request()).json()["cards"][0]
    before = CDS_FEEDBACK.labels("overridden", "disagree")._value.get()
    item = {"card": card["uuid"], "outcome": "overridden",
            "overrideReason": {"reason": {"system": card["overrideReasons"][0]["system"],
                                          "code": "disagree"},
                               "userComment": "seen by nephrology"},
            "outcomeTimestamp": "2025-01-02T03:05:00Z"}
    answer = client.post(f"{HOOK_URL}/feedback", json={"feedback": [item]})
    assert answer.status_code == 200, answer.text
    (bundle,) = fhir.transactions
    events = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "AuditEvent"]
    (entry,) = events
    event = entry["resource"]
    assert entry["request"]["method"] == "PUT"  # by an id of this feedback: a retry is no dup
    assert event["action"] == "E" and event["outcome"] == "0"
    assert event["subtype"][0]["code"] == "overridden"
    patient = event["entity"][0]
    assert patient["what"] == {"reference": f"Patient/{PID}"}
    details = {d["type"]: d["valueString"] for d in patient["detail"]}
    assert details["cds card"] == card["uuid"] and details["override reason"] == "disagree"
    assert details["report"] == "DiagnosticReport/dr-1/_history/3"
    assert "seen by nephrology" not in json.dumps(bundle)  # free text may name people
    assert event["entity"][1]["what"]["identifier"]["system"] == SYSTEM
    assert event["agent"][1]["who"]["display"] == "Practitioner/dr-1"
    assert [(f.card, f.outcome, f.reason) for f in seen] == [
        (card["uuid"], "overridden", "disagree")]
    count_feedback(seen[0])
    assert CDS_FEEDBACK.labels("overridden", "disagree")._value.get() == before + 1

    again = client.post(f"{HOOK_URL}/feedback", json={"feedback": [item]})
    assert again.status_code == 200
    assert fhir.transactions[1]["entry"][1]["request"] == entry["request"]  # same id


@pytest.mark.parametrize(("item", "status"), [
    ({"card": "c", "outcome": "accepted", "outcomeTimestamp": "2025-01-02T03:05:00Z"}, 400),
    ({"card": str(uuid.uuid4()), "outcome": "maybe",
      "outcomeTimestamp": "2025-01-02T03:05:00Z"}, 400),
    ({"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": "yesterday"}, 400),
    ({"card": str(uuid.uuid4()), "outcome": "accepted",
      "overrideReason": {"reason": {"code": "disagree"}},
      "outcomeTimestamp": "2025-01-02T03:05:00Z"}, 400),
    ({"card": str(uuid.uuid4()), "outcome": "accepted",
      "outcomeTimestamp": "2025-01-02T03:05:00Z"}, 404),  # a card never shown
])
def test_bad_feedback_is_refused_and_writes_nothing(item: dict[str, Any], status: int) -> None:
    fhir = Fhir()
    answer = app(fhir).post(f"{HOOK_URL}/feedback", json={"feedback": [item]})
    assert answer.status_code == status, answer.text
    assert not fhir.transactions
    assert app(fhir).post(f"{HOOK_URL}/feedback", json={"feedback": []}).status_code == 400


# -- JWT ------------------------------------------------------------------------------------
def pem_public(key: Any) -> str:
    return str(key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo
                                         ).decode())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: Any, alg: str = "RS384", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": "ehr-client", "aud": f"{BASE}{HOOK_URL}", "iat": now,
            "exp": now + 240, "jti": str(uuid.uuid4()), **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg,
                      headers={"kid": "ehr-1"})


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_a_signed_ehr_token_is_required(alg: str, rsa_key: rsa.RSAPrivateKey) -> None:
    key: Any = rsa_key if alg == "RS384" else ec.generate_private_key(ec.SECP384R1())
    algorithm: Any = jwt.algorithms.RSAAlgorithm if alg == "RS384" else \
        jwt.algorithms.ECAlgorithm
    jwk = json.loads(algorithm.to_jwk(key.public_key()))
    jwk.update(kid="ehr-1", alg=alg, use="sig")
    auth = JwtAuth(ISSUER, load_keys(json.dumps({"keys": [jwk]})))
    fhir = Fhir([stored_report()])
    client = app(fhir, auth=auth)

    def post(tok: str | None, body: dict[str, Any] | None = None) -> int:
        headers = {"authorization": f"Bearer {tok}"} if tok else {}
        return int(client.post(HOOK_URL, json=body or hook_request(),
                               headers=headers).status_code)

    good = token(key, alg)
    assert post(good) == 200
    assert post(good) == 401  # the same jti again: a replay
    assert post(None) == 401
    assert post(token(key, alg, aud="https://other.example/cds-services/x")) == 401
    assert post(token(key, alg, iss="https://evil.example")) == 401
    assert post(token(key, alg, exp=int(time.time()) - 120)) == 401
    assert post(token(key, alg, exp=int(time.time()) + 3600)) == 401  # > 5 minutes
    assert post(token(key, alg, jti=None)) == 401
    other: Any = ec.generate_private_key(ec.SECP384R1()) if alg == "ES384" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert post(token(other, alg)) == 401  # signed by someone else
    assert post(jwt.encode({"iss": ISSUER, "aud": f"{BASE}{HOOK_URL}", "jti": "x",
                            "exp": int(time.time()) + 60}, "k" * 32, algorithm="HS256")) == 401
    assert post(token(key, alg, aud=f"{BASE}/cds-services")) == 200  # the discovery URL
    assert client.get("/cds-services").status_code == 200  # discovery holds no patient data
    feedback = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "accepted",
                              "outcomeTimestamp": "2025-01-02T03:05:00Z"}]}
    assert client.post(f"{HOOK_URL}/feedback", json=feedback).status_code == 401
    assert client.post(f"{HOOK_URL}/feedback", json=feedback, headers={
        "authorization": f"Bearer {token(key, alg, aud=f'{BASE}{HOOK_URL}/feedback')}"}
    ).status_code == 404  # authenticated, but a card never shown


def test_config_never_fails_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 rsa_key: rsa.RSAPrivateKey) -> None:
    """`[cds_hooks]` (CLINRAGEN_CDS_HOOKS__* by environment), checked at start."""
    for name in ("CLINRAGEN_CONFIG", "CLINRAGEN_CDS_LINK_SECRET", *CDS_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="jwt_issuer"):
        CdsConfig.from_env()
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__AUTH", "none")
    open_config = CdsConfig.from_env()
    open_config.check_bind("127.0.0.1")
    with pytest.raises(ValueError, match="without JWT auth"):
        open_config.check_bind("0.0.0.0")
    keyfile = tmp_path / "ehr.pem"
    keyfile.write_text(pem_public(rsa_key))
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__AUTH", "jwt")
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__JWT_ISSUER", ISSUER)
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__JWT_KEYS_FILE", str(keyfile))
    with pytest.raises(ValueError, match="base_url"):
        CdsConfig.from_env()
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__BASE_URL", BASE + "/")
    config = CdsConfig.from_env()
    config.check_bind("0.0.0.0")
    assert config.auth is not None and config.base_url == BASE
    private = rsa_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    keyfile.write_text(private)
    with pytest.raises(ValueError, match="private key"):
        CdsConfig.from_env()
    keyfile.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0"}]}))
    with pytest.raises(ValueError):
        CdsConfig.from_env()
    keyfile.write_text(pem_public(rsa_key))
    monkeypatch.setenv("CLINRAGEN_CDS_LINK_SECRET", "short")
    with pytest.raises(FhirConfigError, match="CLINRAGEN_CDS_LINK_SECRET"):
        CdsConfig.from_env()
    monkeypatch.setenv("CLINRAGEN_CDS_LINK_SECRET", "change-me-cds-link-secret")
    with pytest.raises(FhirConfigError, match="placeholder"):
        CdsConfig.from_env()
    monkeypatch.delenv("CLINRAGEN_CDS_LINK_SECRET")
    link = tmp_path / "link-secret"
    link.write_text("a-real-link-secret-0123456789\n")
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__LINK_SECRET_FILE", str(link))
    assert CdsConfig.from_env().link_secret == b"a-real-link-secret-0123456789"
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__CORS_ORIGINS", "https://ehr.example, https://b.example")
    assert CdsConfig.from_env().cors_origins == ["https://ehr.example", "https://b.example"]
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__REPORT_URL", "https://ehr.example/report")
    with pytest.raises(ValueError, match="report_url"):
        CdsConfig.from_env()


def test_the_settings_come_from_the_toml_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             rsa_key: rsa.RSAPrivateKey) -> None:
    for name in ("CLINRAGEN_CDS_LINK_SECRET", *CDS_ENV):
        monkeypatch.delenv(name, raising=False)
    keyfile = tmp_path / "ehr.pem"
    keyfile.write_text(pem_public(rsa_key))
    toml = tmp_path / "site.toml"
    toml.write_text(f'[cds_hooks]\njwt_issuer = "{ISSUER}"\njwt_keys_file = "{keyfile}"\n'
                    f'base_url = "{BASE}"\ncors_origins = ["https://ehr.example"]\n'
                    'metrics_port = 9810\n')
    monkeypatch.setenv("CLINRAGEN_CONFIG", str(toml))
    config = CdsConfig.from_env()
    assert config.auth is not None and config.auth.issuer == ISSUER
    assert config.cors_origins == ["https://ehr.example"]
    assert Settings().metrics_bind("cds_hooks") == (9810, "127.0.0.1")


@pytest.mark.parametrize("old", sorted(n for n in LEGACY_ENV if n.startswith("CLINRAGEN_CDS_")))
def test_the_old_variables_are_refused_with_their_new_names(
        monkeypatch: pytest.MonkeyPatch, old: str) -> None:
    """Left as they were, CLINRAGEN_CDS_AUTH=none or an issuer would be ignored unseen."""
    monkeypatch.setenv(old, "x")
    with pytest.raises(FhirConfigError) as info:
        Settings()
    assert old in str(info.value) and LEGACY_ENV[old] in str(info.value)
    assert "[cds_hooks] " in str(info.value)


def test_a_lone_pem_key_verifies_tokens_without_kid(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = JwtAuth(ISSUER, load_keys(pem_public(rsa_key)))
    client = app(Fhir(), auth=auth)
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": f"{BASE}{HOOK_URL}", "exp": now + 60, "iat": now}

    def post(tok: str) -> int:
        return int(client.post(HOOK_URL, json=hook_request(), headers={
            "authorization": f"Bearer {tok}"}).status_code)

    assert post(jwt.encode({**claims, "jti": "j-1"}, rsa_key, algorithm="RS384")) == 200
    assert post(jwt.encode({**claims, "jti": "j-2"}, rsa_key, algorithm="RS384",
                           headers={"kid": "any"})) == 200
    assert post(jwt.encode({k: v for k, v in claims.items() if k != "iat"} | {"jti": "j-3"},
                           rsa_key, algorithm="RS384")) == 401  # CDS Hooks requires iat


def test_cli_refuses_an_open_service_off_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from clinragen_fhir import cli

    monkeypatch.setattr("clinragen_fhir.logs.configure", lambda *a, **k: None)
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__AUTH", "none")
    done = CliRunner().invoke(cli.main, ["cds-hooks", "--host", "0.0.0.0"])
    assert done.exit_code != 0 and "without JWT auth" in done.output

