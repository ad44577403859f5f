"""Token endpoint blips are retried, refusals are not (issue 13, item 7).

Every TokenError was final, so one token endpoint restart dead-lettered every task that needed a
token meanwhile. The retry decision is on the error (clinragen_fhir/fhir/errors.py): no answer,
a timeout, 408, 429 and 5xx are retryable; the FHIR client retries them like its own blips, and
the task's retry sees `retryable`.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr

from clinragen_fhir.fhir.auth import ClientCredentialsAuth, TokenError
from clinragen_fhir.fhir.client import FhirClient

TOKEN_URL = "http://127.0.0.1:9/token"
Answer = Callable[[httpx.Request], httpx.Response]


def auth(answer: Answer) -> ClientCredentialsAuth:
    return ClientCredentialsAuth(TOKEN_URL, "cc-client", SecretStr("cc-secret-value"),
                                 transport=httpx.MockTransport(answer))


def fails(exc: type[httpx.TransportError]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc("cc-secret-value", request=request)
    return answer


def status(code: int, **headers: str) -> Answer:
    return lambda request: httpx.Response(code, headers=headers,
                                          json={"error": "temporarily_unavailable"})


@pytest.mark.parametrize("answer", [
    fails(httpx.ConnectError), fails(httpx.ReadTimeout), fails(httpx.ConnectTimeout),
    status(429, **{"Retry-After": "7"}), status(500), status(502), status(503), status(504)],
    ids=["connect", "read-timeout", "connect-timeout", "429", "500", "502", "503", "504"])
def test_blips_are_retryable(answer: Answer) -> None:
    with pytest.raises(TokenError) as info:
        auth(answer).token()
    assert info.value.retryable
    assert "cc-secret-value" not in str(info.value)
    if info.value.status == 429:
        assert info.value.retry_after == 7.0


@pytest.mark.parametrize("answer", [
    status(400), status(401), status(403),
    lambda request: httpx.Response(200, json={"token_type": "bearer"}),
    lambda request: httpx.Response(200, json={"access_token": "has a space"}),
    lambda request: httpx.Response(200, json=["not", "an", "object"])],
    ids=["400", "401", "403", "no-token", "bad-token", "not-an-object"])
def test_refusals_and_bad_answers_are_final(answer: Answer) -> None:
    with pytest.raises(TokenError) as info:
        auth(answer).token()
    assert not info.value.retryable
    assert "has a space" not in str(info.value)


def test_the_fhir_client_retries_a_token_blip_then_succeeds() -> None:
    answers = iter([503, 503, 200])
    fetched: list[int] = []

    def token_endpoint(request: httpx.Request) -> httpx.Response:
        code = next(answers)
        fetched.append(code)
        return httpx.Response(code, json={"access_token": "tok-1\n", "expires_in": 3600}
                              if code == 200 else {"error": "busy"})

    def fhir(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer tok-1"  # stripped
        return httpx.Response(200, json={"resourceType": "CapabilityStatement"})

    with FhirClient("http://127.0.0.1:9/fhir", auth=auth(token_endpoint), backoff=0.001,
                    transport=httpx.MockTransport(fhir)) as client:
        assert client.capabilities()["resourceType"] == "CapabilityStatement"
    assert fetched == [503, 503, 200]


def test_a_token_outage_longer_than_the_client_retries_is_left_to_the_task() -> None:
    def fhir(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no FHIR request without a token")

    with FhirClient("http://127.0.0.1:9/fhir", auth=auth(fails(httpx.ConnectError)),
                    retries=2, backoff=0.001, transport=httpx.MockTransport(fhir)) as client, \
            pytest.raises(TokenError) as info:
        client.capabilities()
    assert info.value.retryable  # the task retries it with backoff instead of dead-lettering
