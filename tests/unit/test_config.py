"""Configuration: TOML + environment, secrets never from the TOML, safe defaults."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.errors import FhirConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config.example.toml"


def test_example_config_loads_and_env_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINRAGEN_CONFIG", str(EXAMPLE))
    s = Settings()
    assert s.fhir.base_url == "http://127.0.0.1:8080/fhir" and s.fhir.verify_tls
    assert s.worker.visibility_timeout_s > s.worker.time_limit_s
    monkeypatch.setenv("CLINRAGEN_FHIR__BASE_URL", "https://fhir.example/r4")
    monkeypatch.setenv("CLINRAGEN_WORKER__CONCURRENCY", "4")
    s = Settings()
    assert s.fhir.base_url == "https://fhir.example/r4" and s.worker.concurrency == 4


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINRAGEN_CONFIG", "/nonexistent/site.toml")
    with pytest.raises(FhirConfigError, match="missing file"):
        Settings()


def test_bearer_token_comes_from_env_and_is_required(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    s = Settings(fhir={"base_url": "https://fhir.example/r4", "auth": "bearer",
                       "token_env": "SITE_TOKEN"})
    with pytest.raises(FhirConfigError, match="token"):
        s.fhir.client()
    monkeypatch.setenv("SITE_TOKEN", "s3cret")
    client = s.fhir.client()
    request = httpx.Request("GET", "https://fhir.example/r4/metadata")
    flow = client._http.auth.sync_auth_flow(request)  # type: ignore[union-attr]
    assert next(flow).headers["Authorization"] == "Bearer s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in repr(client._http.auth)
    client.close()
    token_file = tmp_path / "tok"
    token_file.write_text("from-file\n")
    s2 = Settings(fhir={"base_url": "https://fhir.example/r4", "auth": "bearer",
                        "token_file": str(token_file)})
    assert s2.fhir.token() is not None
    assert s2.fhir.token().get_secret_value() == "from-file"  # type: ignore[union-attr]
