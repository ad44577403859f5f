"""The webhook's settings are pydantic settings like the rest (issue 15, item 6): `[webhook]` in
the TOML, CLINRAGEN_WEBHOOK__* by environment, the secret from the variable `secret_env` names or
`secret_file`; the old single-underscore variables are refused, not silently ignored; `subscribe`
sends the receiver's own secret.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from clinragen_fhir import webhook
from clinragen_fhir.cli import main
from clinragen_fhir.config import LEGACY_WEBHOOK_ENV, WEBHOOK_MAX_SKEW_S, FhirEndpoint, Settings
from clinragen_fhir.fhir.errors import FhirConfigError
from clinragen_fhir.webhook import WebhookConfig

SECRET = "a-real-webhook-secret-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLINRAGEN_CONFIG", "CLINRAGEN_LOG_ID_KEY", "CLINRAGEN_WEBHOOK_SECRET",
                 *LEGACY_WEBHOOK_ENV):
        monkeypatch.delenv(name, raising=False)


def test_defaults_match_the_receiver_and_the_toml_and_env_set_them(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hook = Settings().webhook
    plain = WebhookConfig(secret=b"x" * 16)
    assert (hook.debounce_s, hook.max_patients, hook.dedupe_ttl_s, hook.max_body_bytes,
            hook.require_hmac) == (plain.debounce_s, plain.max_patients, plain.dedupe_ttl_s,
                                   plain.max_body_bytes, plain.require_hmac)
    assert WEBHOOK_MAX_SKEW_S == webhook.MAX_SKEW_S  # the replay window the TTL must cover
    site = tmp_path / "site.toml"
    site.write_text('[webhook]\nrequire_hmac = true\nmax_patients = 7\nsecret_env = "HOOK"\n')
    monkeypatch.setenv("CLINRAGEN_CONFIG", str(site))
    monkeypatch.setenv("CLINRAGEN_WEBHOOK__DEBOUNCE_S", "3")  # env wins over the file
    monkeypatch.setenv("CLINRAGEN_WEBHOOK__MAX_PATIENTS", "9")
    monkeypatch.setenv("HOOK", SECRET)
    config = WebhookConfig.from_settings(Settings().webhook)
    assert (config.require_hmac, config.max_patients, config.debounce_s) == (True, 9, 3)
    assert config.secret == SECRET.encode()


def test_a_misspelt_key_and_a_short_replay_window_are_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("[webhook]\nrequire_hmca = true\n")
    monkeypatch.setenv("CLINRAGEN_CONFIG", str(site))
    with pytest.raises(FhirConfigError, match=r"webhook\.require_hmca"):
        Settings()
    monkeypatch.delenv("CLINRAGEN_CONFIG")
    with pytest.raises(ValueError, match="dedupe_ttl_s"):
        Settings(webhook={"dedupe_ttl_s": WEBHOOK_MAX_SKEW_S})


@pytest.mark.parametrize("old", sorted(LEGACY_WEBHOOK_ENV))
def test_the_old_variables_are_refused_with_their_new_names(
        monkeypatch: pytest.MonkeyPatch, old: str) -> None:
    """Ignored, CLINRAGEN_WEBHOOK_REQUIRE_HMAC=1 would let the header secret in again unseen."""
    monkeypatch.setenv(old, "1")
    with pytest.raises(FhirConfigError) as info:
        Settings()
    assert old in str(info.value) and LEGACY_WEBHOOK_ENV[old] in str(info.value)
    result = CliRunner().invoke(main, ["check-config"])
    assert result.exit_code == 1 and f"configuration REFUSED: no longer read: {old}" in \
        result.output


def test_the_secret_from_the_variable_or_the_file_and_its_checks(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hook = Settings().webhook
    assert hook.secret_source() == "not set"
    with pytest.raises(FhirConfigError, match=r"CLINRAGEN_WEBHOOK_SECRET\) to a secret of >= 16"):
        hook.secret()
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET + "\n")  # a file's newline is not part of it
    hook = Settings(webhook={"secret_file": secret_file}).webhook
    assert hook.secret().get_secret_value() == SECRET
    assert hook.secret_source() == f"file {secret_file}"
    monkeypatch.setenv("CLINRAGEN_WEBHOOK_SECRET", "from-the-environment-0123")  # wins
    assert hook.secret().get_secret_value() == "from-the-environment-0123"
    assert hook.secret_source() == "environment variable CLINRAGEN_WEBHOOK_SECRET"
    for bad, why in (("short", ">= 16"), ("change-me-to-a-long-random-secret", "placeholder")):
        monkeypatch.setenv("CLINRAGEN_WEBHOOK_SECRET", bad)
        with pytest.raises(FhirConfigError, match=why) as info:
            WebhookConfig.from_settings(hook)
        assert bad not in str(info.value)  # named by where it comes from, never shown
    monkeypatch.delenv("CLINRAGEN_WEBHOOK_SECRET")
    missing = Settings(webhook={"secret_file": tmp_path / "nope"}).webhook
    with pytest.raises(FhirConfigError, match="unreadable"):
        missing.secret()


def test_subscribe_sends_the_receivers_secret_from_its_file(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET)
    puts: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        puts.append(json.loads(request.content))
        return httpx.Response(200, json=puts[-1])

    client = FhirEndpoint.client
    monkeypatch.setattr(FhirEndpoint, "client", lambda self, transport=None, observer=None:
                        client(self, transport=httpx.MockTransport(handler)))
    argv = ["subscribe", "--endpoint", "https://receiver.example/notify",
            "--criteria", "Observation?category=laboratory"]
    refused = CliRunner().invoke(main, argv)
    assert refused.exit_code == 2 and "webhook secret" in refused.output and puts == []
    monkeypatch.setenv("CLINRAGEN_WEBHOOK__SECRET_FILE", str(secret_file))
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert puts[0]["channel"]["header"] == [f"X-Clinragen-Secret: {SECRET}"]
    assert SECRET not in result.output
