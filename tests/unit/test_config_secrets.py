"""Secrets and settings that failed open (issue 13, item 11).

* The log-id hash key defaulted to a public constant: anyone could hash candidate patient ids
  and join them to log lines. Off loopback, no start without a site key.
* The placeholders in the example configs (deploy/compose/site.env; a PEM whose body is
  `REPLACE`, as the docs' examples write one) were taken as real secrets.
* Unknown config keys were ignored: `auht = "smart-backend"` left auth off without a word.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from clinragen_fhir.cli import main
from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.fhir.errors import FhirConfigError
from clinragen_fhir.site_secrets import is_placeholder
from clinragen_fhir.webhook import WebhookConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SITE_KEY = "a-real-site-key-0123456789abcdef"


def shipped_placeholders() -> dict[str, str]:
    """Every secret value in the example configs, by where it is used."""
    env = dict(line.split("=", 1) for line in (DEPLOY / "compose" / "site.env").read_text()
               .splitlines() if line.strip() and not line.startswith("#"))
    return {"compose log key": env["CLINRAGEN_LOG_ID_KEY"],
            "compose webhook secret": env["CLINRAGEN_WEBHOOK_SECRET"]}


@pytest.fixture(autouse=True)
def no_site_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLINRAGEN_LOG_ID_KEY", "CLINRAGEN_CONFIG", "CLINRAGEN_WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)


def test_off_loopback_the_log_id_key_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    Settings().check_site_secrets()  # everything on loopback: the default key is fine
    remote = [Settings(fhir={"base_url": "https://fhir.hospital.example/r4"}),
              Settings(broker_url="redis://redis:6379/0")]
    for settings in remote:
        with pytest.raises(FhirConfigError, match="CLINRAGEN_LOG_ID_KEY"):
            settings.check_site_secrets()
    monkeypatch.setenv("CLINRAGEN_LOG_ID_KEY", "short")
    with pytest.raises(FhirConfigError, match=">= 16"):
        remote[0].check_site_secrets()
    monkeypatch.setenv("CLINRAGEN_LOG_ID_KEY", SITE_KEY)
    for settings in remote:
        settings.check_site_secrets()


def test_the_cli_and_the_worker_refuse_to_start_without_a_site_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINRAGEN_FHIR__BASE_URL", "https://fhir.hospital.example/r4")
    result = CliRunner().invoke(main, ["check-config"])  # says so and exits 1
    assert result.exit_code == 1 and "configuration REFUSED" in result.output
    assert "CLINRAGEN_LOG_ID_KEY" in result.output
    result = CliRunner().invoke(main, ["dlq", "list"])  # any other command: the error itself
    assert isinstance(result.exception, FhirConfigError)
    assert "CLINRAGEN_LOG_ID_KEY" in str(result.exception)
    from clinragen_fhir.worker import tasks

    tasks.load_runtime.cache_clear()
    try:
        with pytest.raises(FhirConfigError, match="CLINRAGEN_LOG_ID_KEY"):
            tasks.load_runtime()
    finally:
        tasks.load_runtime.cache_clear()


def test_every_placeholder_in_the_example_configs_is_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    placeholders = shipped_placeholders()
    assert all(is_placeholder(v) for v in placeholders.values()), placeholders
    assert not is_placeholder(SITE_KEY) and not is_placeholder("tok-0123456789abcdef")
    for where in ("compose log key",):
        monkeypatch.setenv("CLINRAGEN_LOG_ID_KEY", placeholders[where])
        with pytest.raises(FhirConfigError, match="placeholder"):
            Settings().check_site_secrets()  # refused even on loopback
    for where in ("compose webhook secret",):
        monkeypatch.setenv("CLINRAGEN_WEBHOOK_SECRET", placeholders[where])
        with pytest.raises(FhirConfigError, match="placeholder"):
            WebhookConfig.from_settings(Settings().webhook)
    key = tmp_path / "smart-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nREPLACE\n-----END PRIVATE KEY-----\n")
    with pytest.raises(FhirConfigError, match="private key holds the example configs'"):
        FhirEndpoint(auth="smart-backend", token_url="https://auth.example/token",
                     client_id="c", private_key_file=key).http_auth()
    monkeypatch.setenv("SITE_TOKEN", placeholders["compose webhook secret"])
    with pytest.raises(FhirConfigError, match="placeholder"):
        FhirEndpoint(auth="bearer", token_env="SITE_TOKEN").http_auth()


def test_unknown_config_keys_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('brokr_url = "redis://x"\n[fhir]\nbase_url = "https://f.example/r4"\n'
                    'auht = "smart-backend-s3cret"\n')
    monkeypatch.setenv("CLINRAGEN_CONFIG", str(site))
    with pytest.raises(FhirConfigError, match=r"unknown config keys: .*fhir\.auht") as info:
        Settings()
    assert "brokr_url" in str(info.value) and "s3cret" not in str(info.value)
    monkeypatch.delenv("CLINRAGEN_CONFIG")
    monkeypatch.setenv("CLINRAGEN_WORKER__CONCURENCY", "4")
    with pytest.raises(FhirConfigError, match=r"unknown config key: worker\.concurency"):
        Settings()
    monkeypatch.delenv("CLINRAGEN_WORKER__CONCURENCY")
    with pytest.raises(FhirConfigError, match=r"report\.lookback"):
        Settings(report={"lookback": 3})


def test_the_shipped_configs_have_only_known_keys(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    for path in (DEPLOY / "config.example.toml",):  # the chart's: test_deploy_static
        monkeypatch.setenv("CLINRAGEN_CONFIG", str(path))
        assert re.match(r"https?://", Settings().fhir.base_url)
