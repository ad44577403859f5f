"""The FHIR client against httpx.MockTransport: paging, retries, errors, safety checks."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from clinragen_fhir.fhir.client import FhirClient, parse_retry_after
from clinragen_fhir.fhir.errors import FhirConfigError, FhirError, FhirHTTPError, FhirUnavailable
from clinragen_fhir.fhir.urls import redact_path

BASE = "http://127.0.0.1:8080/fhir"


def client(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> FhirClient:
    return FhirClient(BASE, transport=httpx.MockTransport(handler), backoff=0.001,
                      **kw)  # type: ignore[arg-type]


def page(ids: list[str], next_url: str | None) -> dict[str, object]:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "link": links,
            "entry": [{"resource": {"resourceType": "Observation", "id": i}} for i in ids]}


def test_search_follows_every_next_link() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if "_getpages" not in str(request.url):
            assert request.url.params["patient"] == "p1"
            assert request.url.params["_count"] == "200"
            return httpx.Response(200, json=page(["a", "b"], f"{BASE}?_getpages=x&off=2"))
        if "off=2" in str(request.url):
            return httpx.Response(200, json=page(["c"], f"{BASE}?_getpages=x&off=3"))
        return httpx.Response(200, json=page(["d"], None))

    ids = [r["id"] for r in client(handler).search("Observation", {"patient": "p1"})]
    assert ids == ["a", "b", "c", "d"]
    assert len(seen) == 3


def test_next_link_to_another_origin_is_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=page(["a"], "https://evil.example/fhir?page=2"))

    with pytest.raises(FhirError, match="another origin"):
        list(client(handler).search("Observation", {}))


def test_retries_503_honouring_retry_after_then_succeeds() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] < 3:
            return httpx.Response(503, headers={"Retry-After": "0"}, text="busy")
        return httpx.Response(200, json={"resourceType": "Patient", "id": "p"})

    assert client(handler, retries=3).read("Patient", "p")["id"] == "p"
    assert calls["n"] == 3


def test_retries_are_bounded_and_error_is_clear() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(500, json={"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "exception", "diagnostics": "db down"}]})

    with pytest.raises(FhirHTTPError) as info:
        client(handler, retries=2).read("Patient", "secret-id")
    assert calls["n"] == 3
    assert info.value.status == 500 and info.value.retryable
    assert "db down" in str(info.value)
    assert "secret-id" not in str(info.value)  # ids never reach error text (it is logged)


def test_client_errors_are_not_retried() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(400, text="bad")

    with pytest.raises(FhirHTTPError) as info:
        client(handler).transaction({"resourceType": "Bundle"})
    assert calls["n"] == 1 and not info.value.retryable


def test_write_conflict_is_retried_but_delete_conflict_is_not() -> None:
    """Concurrent conditional creates give HAPI a 409 a retry resolves; a referenced DELETE not."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "POST" and calls.count("POST") == 1:
            return httpx.Response(409, json={"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "conflict", "diagnostics": "unique index"}]})
        if request.method == "DELETE":
            return httpx.Response(409, text="referenced by AuditEvent/1")
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "transaction-response"})

    c = client(handler)
    assert c.transaction({"resourceType": "Bundle"})["type"] == "transaction-response"
    assert calls == ["POST", "POST"]
    with pytest.raises(FhirHTTPError) as info:
        c.delete("DiagnosticReport", "1")
    assert calls.count("DELETE") == 1 and info.value.status == 409 and not info.value.retryable


def test_connection_failure_is_retryable_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(FhirUnavailable) as info:
        client(handler, retries=1).capabilities()
    assert info.value.retryable


def test_timeout_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(FhirUnavailable, match="timed out"):
        client(handler, retries=0).capabilities()


def test_non_json_answer_is_a_fhir_error() -> None:
    with pytest.raises(FhirError, match="not JSON"):
        client(lambda r: httpx.Response(200, text="<html>")).capabilities()


def test_plain_http_to_remote_host_refused_unless_allowed() -> None:
    with pytest.raises(FhirConfigError, match="plain http"):
        FhirClient("http://fhir.hospital.example/fhir")
    FhirClient("http://fhir.hospital.example/fhir", allow_insecure_http=True).close()
    FhirClient("https://fhir.hospital.example/fhir").close()
    FhirClient("http://localhost:8080/fhir").close()
    with pytest.raises(FhirConfigError):
        FhirClient("ftp://x/fhir")


def test_tls_verification_is_on_by_default() -> None:
    c = FhirClient("https://fhir.hospital.example/fhir")
    transport = c._http._transport
    pool = transport._pool  # type: ignore[attr-defined]
    assert pool._ssl_context.verify_mode.name == "CERT_REQUIRED"
    c.close()


def test_retry_after_parses_seconds_and_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None


def test_redact_path_hashes_ids_but_keeps_types() -> None:
    out = redact_path("/fhir/Patient/abc-123/_history/2")
    assert out.startswith("/fhir/Patient/#") and "abc-123" not in out
    assert out.endswith("/_history/2")
    assert redact_path("/fhir/Observation") == "/fhir/Observation"
