"""Plain http to a non-loopback host is refused everywhere a secret travels, not only for the
FHIR base URL (issue 13, item 4): the token endpoint (client secret or signed assertion), the
teacher LLM's base URL (API key, patients' notes) and `subscribe --endpoint` (the webhook secret
rides on every notification). Each has the same `allow_insecure_http` escape."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from clinragen_fhir.cli import main
from clinragen_fhir.config import FhirEndpoint
from clinragen_fhir.fhir.auth import ClientCredentialsAuth, SmartBackendAuth
from clinragen_fhir.fhir.errors import FhirConfigError
from training.llm import LLMClient, LLMConfig, LLMError


def endpoint(token_url: str, **kw: Any) -> FhirEndpoint:
    return FhirEndpoint(base_url="https://fhir.hospital.example/r4", auth="client-credentials",
                        token_url=token_url, client_id="c", client_secret_env="CC_SECRET", **kw)


def test_plain_http_token_url_is_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC_SECRET", "cc-secret-value")
    with pytest.raises(FhirConfigError, match=r"plain http .*token_url"):
        endpoint("http://auth.hospital.example/token").client()
    endpoint("http://auth.hospital.example/token", allow_insecure_http=True).client().close()
    endpoint("https://auth.hospital.example/token").client().close()
    endpoint("http://127.0.0.1:9999/token").client().close()
    with pytest.raises(FhirConfigError, match="token_url"):
        ClientCredentialsAuth("http://auth.hospital.example/token", "c", SecretStr("s"))
    with pytest.raises(FhirConfigError, match="token_url"):
        SmartBackendAuth("http://auth.hospital.example/token", "c", SecretStr("k"))


def test_plain_http_teacher_base_url_is_refused_unless_allowed() -> None:
    with pytest.raises(LLMError, match=r"plain http .*teacher base_url"):
        LLMClient(LLMConfig(base_url="http://teacher.example/v1", model="m"))
    LLMClient(LLMConfig(base_url="http://teacher.example/v1", model="m",
                        allow_insecure_http=True)).close()
    LLMClient(LLMConfig(base_url="https://teacher.example/v1", model="m")).close()
    LLMClient(LLMConfig(base_url="http://127.0.0.1:8000/v1", model="m")).close()


def test_plain_http_subscribe_endpoint_is_refused_unless_allowed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINRAGEN_WEBHOOK_SECRET", "a-real-webhook-secret-0123456789")
    puts: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        puts.append(json.loads(request.content))
        return httpx.Response(200, json=puts[-1])

    client = FhirEndpoint.client
    monkeypatch.setattr(FhirEndpoint, "client", lambda self, transport=None, observer=None:
                        client(self, transport=httpx.MockTransport(handler)))
    runner = CliRunner()
    refused = runner.invoke(main, ["subscribe", "--endpoint", "http://receiver.example/notify",
                                   "--criteria", "Observation?category=laboratory"])
    assert refused.exit_code == 2 and "--allow-insecure-http" in refused.output
    assert puts == []  # refused before any Subscription carried the secret
    for argv in (["--endpoint", "http://receiver.example/notify", "--allow-insecure-http"],
                 ["--endpoint", "https://receiver.example/notify"],
                 ["--endpoint", "http://127.0.0.1:8090/notify"]):
        result = runner.invoke(main, ["subscribe", *argv,
                                      "--criteria", "Observation?category=laboratory"])
        assert result.exit_code == 0, result.output
    assert [p["channel"]["endpoint"] for p in puts] == [
        "http://receiver.example/notify", "https://receiver.example/notify",
        "http://127.0.0.1:8090/notify"]
