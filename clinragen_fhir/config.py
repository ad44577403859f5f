"""Configuration: one TOML file plus environment variables (pydantic-settings).

Precedence: explicit arguments > environment (CLINRAGEN_*, nested with "__") > TOML file >
defaults. The TOML file is found through CLINRAGEN_CONFIG. Secrets never live in the TOML: it
names an environment variable or a file that holds them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirConfigError


class FhirEndpoint(BaseModel):
    """One FHIR server and how to reach it."""

    base_url: str = "http://127.0.0.1:8080/fhir"
    auth: Literal["none", "bearer"] = "none"
    token_env: str | None = None  # name of the env var holding the bearer token
    token_file: Path | None = None  # or a file holding it
    verify_tls: bool = True
    ca_file: Path | None = None
    client_cert: Path | None = None  # mutual TLS: certificate (PEM)
    client_key: Path | None = None
    allow_insecure_http: bool = False  # plain http to a non-loopback host
    timeout_s: float = 30.0
    retries: int = 3
    page_size: int = 200

    def token(self) -> SecretStr | None:
        """The bearer token, read at use time from env or file (never from the TOML)."""
        if self.token_env and os.environ.get(self.token_env):
            return SecretStr(os.environ[self.token_env])
        if self.token_file:
            return SecretStr(self.token_file.read_text().strip())
        return None

    def client(self, transport: httpx.BaseTransport | None = None) -> FhirClient:
        headers: dict[str, str] = {}
        if self.auth == "bearer":
            token = self.token()
            if token is None:
                raise FhirConfigError("auth = 'bearer' but neither token_env nor token_file "
                                      "gives a token")
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        verify: bool | str = str(self.ca_file) if self.ca_file else self.verify_tls
        cert = ((str(self.client_cert), str(self.client_key))
                if self.client_cert and self.client_key else None)
        return FhirClient(self.base_url, headers=headers, timeout=self.timeout_s, verify=verify,
                          cert=cert, retries=self.retries, page_size=self.page_size,
                          allow_insecure_http=self.allow_insecure_http, transport=transport)


class ReportSettings(BaseModel):
    """How reports are coded and identified."""

    identifier_system: str = "urn:clinragen-fhir:report"
    code_system: str = "http://loinc.org"
    code: str = "51848-0"
    code_display: str = "Evaluation note"
    lookback_days: int = 3 * 365  # inputs older than this are not read


class WorkerSettings(BaseModel):
    """Celery behaviour; the broker URLs live at the top level to be set by env easily."""

    max_retries: int = 5
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 300.0
    soft_time_limit_s: int = 300
    time_limit_s: int = 360
    visibility_timeout_s: int = 3600
    concurrency: int = 2


class Settings(BaseSettings):
    """Everything the CLI and the worker read."""

    model_config = SettingsConfigDict(env_prefix="CLINRAGEN_", env_nested_delimiter="__",
                                      extra="ignore")

    fhir: FhirEndpoint = Field(default_factory=FhirEndpoint)
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    model_dir: Path | None = None  # a trained ONNX model directory; None = rule baseline
    knowledge_path: Path | None = None  # None = the graph shipped with the package
    report: ReportSettings = Field(default_factory=ReportSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("CLINRAGEN_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path:
            if not Path(toml_path).is_file():
                raise FhirConfigError(f"CLINRAGEN_CONFIG names a missing file: {toml_path}")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)
