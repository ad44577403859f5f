"""`clinragen-fhir check-config` reports everything (issue 15, item 6): the FHIR endpoint, its
auth and granted scope, the retry bound, the broker and the Redis stores, the model hash, the
webhook secret's source, metrics; exit 1 for each problem; and never a secret.

The FHIR server and the token endpoint are httpx.MockTransports, the broker kombu's memory://,
the stores a private redis-server (tests/unit/test_delivery_limit.private_redis).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from clinragen_fhir.cli import main
from clinragen_fhir.config import LEGACY_ENV, LEGACY_WEBHOOK_ENV, FhirEndpoint
from clinragen_fhir.config_checks import masked
from clinragen_fhir.fhir.auth import WORKER_SCOPE
from clinragen_fhir.fhir.capability import REQUIRED_SEARCH
from clinragen_fhir.fhir.keys import generate
from tests.unit.test_delivery_limit import free_port, private_redis

CLIENT_SECRET = "a-real-client-secret-0123456789"
TOKEN = "tok-check-config-0123456789abcdef"
BEARER = "bearer-token-check-config-0123456789"
HOOK_SECRET = "a-real-webhook-secret-check-0123456789"
LOG_KEY = "a-real-site-key-check-config-0123456789"
REDIS_PASSWORD = "redis-password-check-config-0123"
SECRETS = (CLIENT_SECRET, TOKEN, BEARER, HOOK_SECRET, LOG_KEY, REDIS_PASSWORD)


def capabilities(fhir_version: str = "4.0.1", conditional_update: bool = True
                 ) -> dict[str, Any]:
    resources = [{"type": rtype, "searchParam": [{"name": p} for p in params]}
                 for rtype, params in REQUIRED_SEARCH.items()]
    for r in resources:
        if r["type"] == "DiagnosticReport":
            r.update(conditionalCreate=True, conditionalUpdate=conditional_update)
    return {"resourceType": "CapabilityStatement", "fhirVersion": fhir_version,
            "software": {"name": "Mock FHIR", "version": "1.0"},
            "rest": [{"mode": "server", "interaction": [{"code": "transaction"}],
                      "resource": resources}]}


def token_endpoint(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"access_token": TOKEN, "expires_in": 300,
                                     "token_type": "bearer", "scope": WORKER_SCOPE})


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


@pytest.fixture()
def site(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> dict[str, Any]:
    """A site on loopback: client-credentials auth, every service reachable, every secret set.
    `site["capabilities"]` is what the FHIR server answers."""
    for name in ("CLINRAGEN_CONFIG", "CLINRAGEN_WEBHOOK_SECRET", "CLINRAGEN_CDS_LINK_SECRET",
                 *LEGACY_ENV):
        monkeypatch.delenv(name, raising=False)
    env = {"CLINRAGEN_FHIR__BASE_URL": "http://127.0.0.1:8080/fhir",
           "CLINRAGEN_FHIR__AUTH": "client-credentials",
           "CLINRAGEN_FHIR__TOKEN_URL": "https://auth.example/token",
           "CLINRAGEN_FHIR__CLIENT_ID": "clinragen", "CLINRAGEN_FHIR__RETRIES": "0",
           "CLINRAGEN_FHIR__CLIENT_SECRET_ENV": "CHECK_CLIENT_SECRET",
           "CHECK_CLIENT_SECRET": CLIENT_SECRET, "CLINRAGEN_BROKER_URL": "memory://",
           "CLINRAGEN_RESULT_BACKEND": redis_url.replace("/0", "/1"),
           "CLINRAGEN_STATE_URL": redis_url.replace("/0", "/4"),
           "CLINRAGEN_WEBHOOK_SECRET": HOOK_SECRET, "CLINRAGEN_LOG_ID_KEY": LOG_KEY,
           "CLINRAGEN_WORKER__METRICS_PORT": "9808", "CLINRAGEN_WORKER__METRICS_HOST": "0.0.0.0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    state: dict[str, Any] = {"capabilities": capabilities(), "requests": []}

    def fhir(request: httpx.Request) -> httpx.Response:
        state["requests"].append(request)
        return httpx.Response(200, json=state["capabilities"])

    client = FhirEndpoint.client
    monkeypatch.setattr(FhirEndpoint, "client", lambda self, transport=None, observer=None:
                        client(self, transport=httpx.MockTransport(fhir), observer=observer))
    http_auth = FhirEndpoint.http_auth

    def with_mock_token_endpoint(self: FhirEndpoint) -> httpx.Auth | None:
        auth = http_auth(self)
        if auth is not None and hasattr(auth, "_transport"):
            auth._transport = httpx.MockTransport(token_endpoint)
        return auth

    monkeypatch.setattr(FhirEndpoint, "http_auth", with_mock_token_endpoint)
    return state


def check() -> Result:
    result = CliRunner().invoke(main, ["check-config"])
    for secret in SECRETS:
        assert secret not in result.output, secret
    return result


def test_everything_is_reported_and_no_secret_printed(site: dict[str, Any]) -> None:
    result = check()
    out = result.output
    assert result.exit_code == 0, out
    expected = [
        "FHIR endpoint http://127.0.0.1:8080/fhir (auth: client-credentials",
        "  client_id: clinragen; token endpoint: https://auth.example/token",
        "  client secret: environment variable CHECK_CLIENT_SECRET (set)",
        "  reachable: Mock FHIR 1.0, FHIR 4.0.1",
        f"  granted: {WORKER_SCOPE}",
        "retries: 1 tries per request (fhir.retries 0) x 6 runs per patient (worker.max_retries"
        " 5) = at most 6 requests per failing call; a final error is sent once",
        "broker memory://",
        "result backend redis://127.0.0.1:", "state store redis://127.0.0.1:",
        "model: rule-baseline (model_dir unset",
        "webhook secret: environment variable CLINRAGEN_WEBHOOK_SECRET",
        "  header secret or HMAC; debounce 30 s; at most 100 patients per notification",
        "metrics: worker /metrics on 0.0.0.0:9808",
        "tracing: off (tracing.enabled = false)",
        "problem list: off (report.problem_list = false)",
        "cds hooks: not configured",
        "log ids: hashed with CLINRAGEN_LOG_ID_KEY: a site key (set)",
    ]
    for line in expected:
        assert line in out, (line, out)
    assert out.count("  reachable\n") == 3  # broker, result backend, state store
    assert out.rstrip().endswith("OK")
    assert site["requests"][0].headers["authorization"] == f"Bearer {TOKEN}"  # a real token


def test_each_problem_exits_1(site: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                              tmp_path: Path) -> None:
    site["capabilities"] = capabilities(fhir_version="5.0.0", conditional_update=False)
    result = check()
    assert result.exit_code == 1 and "MISSING: FHIR R4 (4.0.x)" in result.output
    assert "MISSING: DiagnosticReport conditional update" in result.output
    assert result.output.rstrip().endswith("problems found")
    site["capabilities"] = capabilities()
    assert check().exit_code == 0

    monkeypatch.setenv("CLINRAGEN_MODEL_DIR", str(tmp_path))  # no export in it
    result = check()
    assert result.exit_code == 1
    assert f"model {tmp_path}: unreadable:{tmp_path.resolve()}" in result.output
    assert "UNUSABLE" in result.output and "rule-baseline reports" in result.output
    monkeypatch.delenv("CLINRAGEN_MODEL_DIR")

    monkeypatch.setenv("CLINRAGEN_WEBHOOK_SECRET", "change-me-to-a-long-random-secret")
    result = check()
    assert result.exit_code == 1 and "  REFUSED: the webhook secret" in result.output
    monkeypatch.setenv("CLINRAGEN_WEBHOOK_SECRET", "short")
    result = check()
    assert result.exit_code == 1 and ">= 16 characters" in result.output
    monkeypatch.delenv("CLINRAGEN_WEBHOOK_SECRET")
    result = check()  # unset: said, not a problem (the worker does not need it)
    assert result.exit_code == 0 and "webhook secret: not set" in result.output

    nobody = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/4"
    monkeypatch.setenv("CLINRAGEN_STATE_URL", nobody)
    result = check()  # the password never printed (check() asserts it)
    assert result.exit_code == 1
    assert "state store redis://:****@127.0.0.1:" in result.output
    assert "  UNREACHABLE: ConnectionError" in result.output


def test_smart_backend_key_and_bearer_token_are_named_not_shown(
        site: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key, _ = generate("ES384", tmp_path / "keys")
    monkeypatch.setenv("CLINRAGEN_FHIR__AUTH", "smart-backend")
    monkeypatch.setenv("CLINRAGEN_FHIR__PRIVATE_KEY_DIR", str(tmp_path / "keys"))
    result = check()
    assert result.exit_code == 0, result.output
    assert f"  signing key: newest of {tmp_path / 'keys'}: kid {key.kid}, ES384" in result.output
    assert "PRIVATE KEY" not in result.output
    assert key.pem.get_secret_value().splitlines()[1] not in result.output
    monkeypatch.setenv("CLINRAGEN_FHIR__AUTH", "bearer")
    monkeypatch.setenv("CLINRAGEN_FHIR__TOKEN_ENV", "CHECK_BEARER")
    monkeypatch.setenv("CHECK_BEARER", BEARER)
    result = check()
    assert result.exit_code == 0, result.output
    assert "  token: environment variable CHECK_BEARER (set)" in result.output
    assert "scope: not checked (auth: bearer" in result.output
    monkeypatch.delenv("CHECK_BEARER")
    result = check()
    assert result.exit_code == 1
    assert "  token: environment variable CHECK_BEARER (NOT SET)" in result.output


def test_a_model_directory_is_named_by_its_manifest_hash(
        site: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    manifest = tmp_path / "onnx" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text('{"format": "something else"}')
    monkeypatch.setenv("CLINRAGEN_MODEL_DIR", str(tmp_path))
    result = check()
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    assert f"model {tmp_path}: onnx:{digest}" in result.output
    assert result.exit_code == 1 and "UNUSABLE" in result.output  # not an export this reads


def test_masked_hides_passwords_and_queries() -> None:
    assert masked("redis://:pw@h:6379/0") == "redis://:****@h:6379/0"
    assert masked("amqp://user:pw@h/vh") == "amqp://user:****@h/vh"
    assert masked("https://h/fhir?token=abc") == "https://h/fhir?****"
    assert masked("https://h/fhir") == "https://h/fhir"


def test_tracing_is_reported_endpoint_masked(site: dict[str, Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing: on or off; on, the collector (masked: a query can carry a token), where its URL
    comes from, the sampling and service names, the collector headers set or not (never their
    value); a plain http collector off loopback, which the exporter refuses, is a problem."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
        monkeypatch.delenv(name, raising=False)
    assert "tracing: off (tracing.enabled = false)" in check().output
    monkeypatch.setenv("CLINRAGEN_TRACING__ENABLED", "true")
    monkeypatch.setenv("CLINRAGEN_TRACING__SAMPLE_RATIO", "0.25")
    monkeypatch.setenv("CLINRAGEN_TRACING__OTLP_ENDPOINT",
                       "https://otel:pw-0123456789@collector.example:4318/v1/traces?key=k-42")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"authorization=Bearer {TOKEN}")
    result = check()
    out = result.output
    assert result.exit_code == 0, out
    assert ("tracing: on, OTLP/HTTP to https://otel:****@collector.example:4318/v1/traces?**** "
            "(from tracing.otlp_endpoint)") in out
    assert "  sampling 25% of root traces" in out and "clinragen-fhir-worker, -webhook" in out
    assert "  collector headers: OTEL_EXPORTER_OTLP_HEADERS (set, not shown)" in out
    assert "pw-0123456789" not in out and "k-42" not in out
    monkeypatch.delenv("CLINRAGEN_TRACING__OTLP_ENDPOINT")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.example:4318")
    result = check()
    assert result.exit_code == 1, result.output
    assert ("tracing: on, OTLP/HTTP to http://collector.example:4318/v1/traces (from "
            "OTEL_EXPORTER_OTLP_ENDPOINT)") in result.output
    assert "  REFUSED: " in result.output
    monkeypatch.setenv("CLINRAGEN_TRACING__ALLOW_INSECURE_HTTP", "true")
    assert check().exit_code == 0


def test_problem_list_cds_hooks_and_every_metrics_address(
        site: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = check().output
    assert "problem list: off (report.problem_list = false)" in out
    assert "cds hooks: not configured" in out
    assert "  webhook /metrics off (webhook.metrics_port = 0" in out
    assert "  cds-hooks /metrics off (cds_hooks.metrics_port = 0" in out
    monkeypatch.setenv("CLINRAGEN_REPORT__PROBLEM_LIST", "on")
    monkeypatch.setenv("CLINRAGEN_WEBHOOK__METRICS_PORT", "9809")
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__METRICS_PORT", "9810")
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__METRICS_HOST", "10.0.0.7")
    result = check()
    out = result.output
    # on: Condition search is asked of the server (the mock lacks it) and of the token
    assert result.exit_code == 1 and "problem list: on (report.problem_list)" in out
    assert "  MISSING: resource Condition" in out
    assert "  MISSING scope: system/Condition.s" in out
    assert "  webhook /metrics on 0.0.0.0:9809" in out  # the worker's host
    assert "  cds-hooks /metrics on 10.0.0.7:9810" in out
    monkeypatch.delenv("CLINRAGEN_REPORT__PROBLEM_LIST")

    ehr = tmp_path / "ehr.pem"
    ehr.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__JWT_ISSUER", "https://ehr.example")
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__JWT_KEYS_FILE", str(ehr))
    result = check()  # no audience: the service would refuse to start
    assert result.exit_code == 1 and "  REFUSED: CDS JWT auth needs cds_hooks.base_url" in \
        result.output
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__BASE_URL", "https://cds.example")
    monkeypatch.setenv("CLINRAGEN_CDS_LINK_SECRET", HOOK_SECRET[::-1])
    result = check()
    out = result.output
    assert result.exit_code == 0, out
    assert (f"cds hooks: JWT auth, issuer https://ehr.example, keys {ehr}, audience "
            "https://cds.example") in out
    assert ("  report links: the service's /reports/{id}; link secret: environment variable "
            "CLINRAGEN_CDS_LINK_SECRET; CORS origins: none") in out
    assert "  1 verification key loaded" in out and HOOK_SECRET[::-1] not in out
    monkeypatch.setenv("CLINRAGEN_CDS_LINK_SECRET", "change-me-cds-link-secret")
    result = check()
    assert result.exit_code == 1 and "  REFUSED: the CDS link secret" in result.output
    monkeypatch.setenv("CLINRAGEN_CDS_HOOKS__AUTH", "none")
    monkeypatch.delenv("CLINRAGEN_CDS_LINK_SECRET")
    result = check()
    assert result.exit_code == 0 and "cds hooks: auth none (test only" in result.output


@pytest.mark.parametrize("old", sorted(set(LEGACY_ENV) - set(LEGACY_WEBHOOK_ENV)))
def test_the_old_problem_list_and_cds_variables_are_refused(
        site: dict[str, Any], monkeypatch: pytest.MonkeyPatch, old: str) -> None:
    monkeypatch.setenv(old, "on")
    result = check()
    assert result.exit_code == 1
    assert f"configuration REFUSED: no longer read: {old} (now {LEGACY_ENV[old]}" in \
        result.output
