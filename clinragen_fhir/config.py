"""Configuration: one TOML file plus environment variables (pydantic-settings).

Precedence: explicit arguments > environment (CLINRAGEN_*, nested with "__") > TOML file >
defaults. The TOML file is found through CLINRAGEN_CONFIG. Secrets never live in the TOML: it
names an environment variable or a file that holds them. An unknown key is an error: a typo such
as `auht = "smart-backend"` would otherwise leave auth off without a word.

Over 400 lines because every setting lives here with its reason, one pydantic model per
TOML table composed by `Settings`: one place for an integration engineer to read them all.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, overload
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from clinragen_fhir.fhir.auth import (
    WORKER_SCOPE,
    BearerAuth,
    ClientCredentialsAuth,
    SmartBackendAuth,
    header_safe,
)
from clinragen_fhir.fhir.bodies import MAX_RESPONSE_BYTES, MAX_WIRE_BYTES
from clinragen_fhir.fhir.client import MAX_PAGES, MAX_SEARCH_BYTES, FhirClient
from clinragen_fhir.fhir.errors import FhirConfigError
from clinragen_fhir.fhir.urls import is_loopback
from clinragen_fhir.logs import KEY_ENV as LOG_ID_KEY_ENV
from clinragen_fhir.site_secrets import is_placeholder

MIN_SITE_KEY_CHARS = 16


def _secret(env_name: str | None, file: Path | None, what: str) -> SecretStr | None:
    """A secret from the named environment variable, else from a file; None if neither.

    Stripped (a file's or `$(cat ...)`'s trailing newline), and refused when it is a placeholder
    from the example configs; errors name `what`, never the value."""
    value = os.environ.get(env_name, "") if env_name else ""
    if not value.strip() and file:
        value = file.read_text()
    if not value.strip():
        return None
    if is_placeholder(value):
        raise FhirConfigError(f"{what} holds the example configs' placeholder: set the real one")
    return SecretStr(value.strip())


def _secret_source(env_name: str, file: Path | None) -> str:
    """Where a named secret is read from, for check-config (never the value)."""
    if os.environ.get(env_name, "").strip():
        return f"environment variable {env_name}"
    return f"file {file}" if file else "not set"


@overload
def _named_secret(name: str, env_name: str, file: Path | None, min_chars: int, *,
                  required: Literal[True]) -> SecretStr: ...
@overload
def _named_secret(name: str, env_name: str, file: Path | None, min_chars: int, *,
                  required: Literal[False]) -> SecretStr | None: ...
def _named_secret(name: str, env_name: str, file: Path | None, min_chars: int, *,
                  required: bool) -> SecretStr | None:
    """A secret a service needs (`_secret`), read now. FhirConfigError, naming where and never
    the value, when it is unreadable, shorter than `min_chars`, a placeholder, or unset while
    `required`; None when unset and not required."""
    where = f"{name} ({env_name}" + (f" or {file})" if file else ")")
    try:
        value = _secret(env_name, file, where)
    except OSError as exc:
        raise FhirConfigError(f"{where}: unreadable ({type(exc).__name__})") from None
    if value is None and not required:
        return None
    if value is None or len(value.get_secret_value()) < min_chars:
        raise FhirConfigError(f"set {where} to a secret of >= {min_chars} characters "
                              "(e.g. `openssl rand -hex 24`)")
    return value


class FhirEndpoint(BaseModel):
    """One FHIR server and how to reach it."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = "http://127.0.0.1:8080/fhir"
    auth: Literal["none", "bearer", "client-credentials", "smart-backend"] = "none"
    token_env: str | None = None  # bearer: name of the env var holding the token
    token_file: Path | None = None  # or a file holding it
    # client-credentials and smart-backend; smart-backend without it: the token_endpoint of
    # [base_url]/.well-known/smart-configuration (TLS rules as for base_url)
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None  # client-credentials
    client_secret_file: Path | None = None
    private_key_file: Path | None = None  # smart-backend: PEM private key (RSA or EC P-384)
    private_key_env: str | None = None
    jwt_alg: Literal["RS384", "ES384"] = "RS384"
    jwt_kid: str | None = None  # required with private_key_file/env: `keys generate` prints it
    # or a `clinragen-fhir keys generate` directory instead of the three above: its newest key
    # signs (kid and alg from the key); several keys there are the rotation (fhir/keys.py)
    private_key_dir: Path | None = None
    # least privilege: exactly what the worker reads and writes (fhir.auth.WORKER_ACCESS)
    scope: str | None = WORKER_SCOPE
    verify_tls: bool = True
    ca_file: Path | None = None
    client_cert: Path | None = None  # mutual TLS: certificate (PEM)
    client_key: Path | None = None
    allow_insecure_http: bool = False  # plain http to a non-loopback host
    timeout_s: float = 30.0
    # The client's layer of the retry policy (clinragen_fhir/retry.py; docs/integration.md
    # section 4): retries + 1 tries of one request, waits from retry_backoff_s doubling, at most
    # retry_backoff_max_s; a Retry-After over that goes to the task's retry instead.
    retries: int = Field(3, ge=0)
    retry_backoff_s: float = Field(0.5, ge=0)
    retry_backoff_max_s: float = Field(30.0, ge=0)
    page_size: int = 200
    # Bounds on what one server answer may cost, each a final error when passed (a retry gets
    # the same answer). A page of 200 resources is well under 1 MiB; 64 MiB still takes a page
    # of several 8 MiB notes, and stops a gzip bomb (0.3 MiB that inflates to 300 MiB) early.
    max_response_bytes: int = Field(MAX_RESPONSE_BYTES, gt=0)  # one answer, decoded
    max_wire_bytes: int = Field(MAX_WIRE_BYTES, gt=0)  # one answer as sent (compressed)
    # What one search may hold in all: the patient's whole history of one type is read before
    # it is encoded, so this, not the page limit, bounds a worker's memory per search.
    max_search_bytes: int = Field(MAX_SEARCH_BYTES, gt=0)
    # Pages per search: 1,000 pages of 200 are 200,000 resources, ten times the readings a lab
    # frame keeps; a server that pages forever (or in a cycle) stops here, not at 10,000.
    max_pages: int = Field(MAX_PAGES, gt=0)
    rate_limit_per_s: float = 0.0  # requests/s per worker process to this endpoint; 0: none
    rate_limit_burst: int = 0  # requests allowed at once; 0: max(1, rate)

    def token(self) -> SecretStr | None:
        """The bearer token, read at use time from env or file (never from the TOML); one that
        cannot go in a header is refused here, before httpx quotes it in an error."""
        token = _secret(self.token_env, self.token_file, "the bearer token (token_env/file)")
        if token is None:
            return None
        try:
            return header_safe(token)
        except ValueError as exc:
            raise FhirConfigError(f"the bearer token (token_env/file) is unusable: {exc}"
                                  ) from None

    def _need(self, value: Any, what: str) -> Any:
        if not value:
            raise FhirConfigError(f"auth = {self.auth!r} needs {what}")
        return value

    def http_auth(self) -> httpx.Auth | None:
        """The httpx.Auth flow for this endpoint's auth mode (mutual TLS is set on the client)."""
        verify = self.verify()
        if self.auth == "bearer":
            return BearerAuth(self._need(self.token(), "token_env or token_file"))
        if self.auth == "client-credentials":
            return ClientCredentialsAuth(
                self._need(self.token_url, "token_url"), self._need(self.client_id, "client_id"),
                self._need(_secret(self.client_secret_env, self.client_secret_file,
                                   "the client secret"),
                           "client_secret_env or client_secret_file"),
                scope=self.scope, verify=verify, timeout=self.timeout_s,
                allow_insecure_http=self.allow_insecure_http,
                problem_list=problem_list_enabled())
        if self.auth == "smart-backend":
            return self._smart_backend(verify)
        return None

    def _smart_backend(self, verify: ssl.SSLContext | bool) -> SmartBackendAuth:
        client_id = self._need(self.client_id, "client_id")
        common: dict[str, Any] = {
            "scope": self.scope, "verify": verify, "timeout": self.timeout_s,
            "allow_insecure_http": self.allow_insecure_http, "discovery_base": self.base_url,
            "problem_list": problem_list_enabled()}
        if self.private_key_dir is not None:
            if self.private_key_file or self.private_key_env or self.jwt_kid:
                raise FhirConfigError(
                    "private_key_dir names the key and its kid: leave private_key_file, "
                    "private_key_env and jwt_kid unset")
            return SmartBackendAuth(self.token_url, client_id, key_dir=self.private_key_dir,
                                    **common)
        key = self._need(_secret(self.private_key_env, self.private_key_file, "the private key"),
                         "private_key_file, private_key_env or private_key_dir")
        kid = self._need(self.jwt_kid, "jwt_kid, the key's id in the JWKS registered for the "
                         "client (`clinragen-fhir keys generate` prints it), or private_key_dir")
        if is_placeholder(kid):
            raise FhirConfigError("jwt_kid holds the example configs' placeholder: set the kid "
                                  "`clinragen-fhir keys generate` printed")
        return SmartBackendAuth(self.token_url, client_id, key, algorithm=self.jwt_alg,
                                kid=kid, **common)

    def verify(self) -> ssl.SSLContext | bool:
        """TLS settings: system CAs (or ca_file), client certificate for mutual TLS."""
        if not self.verify_tls and not self.client_cert:
            return False
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if not self.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert:
            ctx.load_cert_chain(str(self.client_cert),
                                str(self.client_key) if self.client_key else None)
        return ctx

    def client(self, transport: httpx.BaseTransport | None = None,
               observer: Callable[[str, int | None], None] | None = None) -> FhirClient:
        return FhirClient(self.base_url, auth=self.http_auth(), timeout=self.timeout_s,
                          verify=self.verify(), retries=self.retries,
                          backoff=self.retry_backoff_s, max_backoff=self.retry_backoff_max_s,
                          page_size=self.page_size, max_pages=self.max_pages,
                          max_response_bytes=self.max_response_bytes,
                          max_wire_bytes=self.max_wire_bytes,
                          max_search_bytes=self.max_search_bytes,
                          allow_insecure_http=self.allow_insecure_http,
                          transport=transport, observer=observer,
                          rate_limit=self.rate_limit_per_s, rate_burst=self.rate_limit_burst)


class ReportSettings(BaseModel):
    """How reports are coded and identified."""

    model_config = ConfigDict(extra="forbid")

    identifier_system: str = "urn:clinragen-fhir:report"
    code_system: str = "http://loinc.org"
    code: str = "51848-0"
    code_display: str = "Evaluation note"
    lookback_days: int = 3 * 365  # inputs older than this are not read
    # An AuditEvent per read batch and per report write (agent: our application Device).
    audit_events: bool = True
    # The site's Organization: DiagnosticReport.performer, Provenance agent.onBehalfOf and the
    # AuditEvents' organization agent. A literal reference on this server ("Organization/<id>")
    # or an identifier ("system|value"), or both; neither: an identifier-only reference
    # `urn:clinragen-fhir:site|unconfigured` (report.build.site_organization), refused nowhere.
    organization_reference: str | None = Field(None, pattern=r"^Organization/[A-Za-z0-9\-.]{1,64}$")
    organization_identifier: str | None = Field(None, pattern=r"^[^|\s]+\|[^|]+$")
    organization_name: str = ""
    # Known vs suspected: at report time (never as a model input) the worker searches the
    # patient's active Conditions and splits what it concluded into known (on the problem list)
    # and suspected; the default scope then asks for system/Condition.s too (fhir.conditions).
    # Off: no Condition is read or asked for, and reports say "problem list not checked".
    # Read where it is used through problem_list_enabled() (end of this module), which takes the
    # process's settings (TOML and environment) unless a caller passes the value.
    problem_list: bool = False


class WorkerSettings(BaseModel):
    """Celery behaviour; the broker URLs live at the top level to be set by env easily."""

    model_config = ConfigDict(extra="forbid")

    # The task's layer of the retry policy (worker.tasks.retry_policy): max_retries + 1 runs of
    # one patient, countdowns from retry_backoff_s doubling, at most retry_backoff_max_s.
    max_retries: int = Field(5, ge=0)
    retry_backoff_s: float = Field(5.0, ge=0)
    retry_backoff_max_s: float = Field(300.0, ge=0)
    # soft: SoftTimeLimitExceeded is raised in the task (logged, dead-lettered); hard: the pool
    # child is killed, the task fails and is dead-lettered. soft < hard < visibility timeout.
    soft_time_limit_s: int = 300
    time_limit_s: int = 360
    visibility_timeout_s: int = 3600
    # A task started this many times without finishing (its worker died each time: out of
    # memory, SIGKILL) is dead-lettered at the next delivery instead of run again, forever.
    # 5, not 1: a task that only shared a worker with the one that died survives four losses.
    max_deliveries: int = Field(5, ge=1)
    concurrency: int = 2
    metrics_port: int = 0  # > 0: Prometheus /metrics on <metrics_host>:<port> from the worker
    # a container's scraper reaches only a non-loopback address (0.0.0.0); loopback by default
    metrics_host: str = "127.0.0.1"
    poll_interval_s: int = 0  # > 0: Celery beat polls the server by _lastUpdated this often

    @model_validator(mode="after")
    def _limits_in_order(self) -> WorkerSettings:
        """A soft limit past the hard one never fires; a hard limit past Redis's visibility
        timeout lets a second worker start the same task while the first still runs."""
        if not 0 < self.soft_time_limit_s < self.time_limit_s < self.visibility_timeout_s:
            raise ValueError(
                "worker time limits must satisfy 0 < soft_time_limit_s < time_limit_s < "
                f"visibility_timeout_s (got {self.soft_time_limit_s}, {self.time_limit_s}, "
                f"{self.visibility_timeout_s})")
        return self


# The webhook's environment variables before they were settings: refused, not ignored (a site
# that set CLINRAGEN_WEBHOOK_REQUIRE_HMAC=1 would otherwise take the header secret again unseen)
LEGACY_WEBHOOK_ENV = {
    "CLINRAGEN_WEBHOOK_SECRET_FILE": "CLINRAGEN_WEBHOOK__SECRET_FILE",
    "CLINRAGEN_WEBHOOK_REQUIRE_HMAC": "CLINRAGEN_WEBHOOK__REQUIRE_HMAC",
    "CLINRAGEN_WEBHOOK_MAX_PATIENTS": "CLINRAGEN_WEBHOOK__MAX_PATIENTS",
    "CLINRAGEN_WEBHOOK_DEBOUNCE_S": "CLINRAGEN_WEBHOOK__DEBOUNCE_S",
}
MIN_WEBHOOK_SECRET_CHARS = 16
WEBHOOK_MAX_SKEW_S = 300  # webhook.MAX_SKEW_S: a signed request's window either side of now


class WebhookSettings(BaseModel):
    """The Subscription rest-hook receiver (`clinragen-fhir webhook`, clinragen_fhir/webhook.py)
    and what `subscribe` registers. The shared secret is never here: `secret_env` names the
    environment variable that holds it, or `secret_file` a file."""

    model_config = ConfigDict(extra="forbid")

    secret_env: str = "CLINRAGEN_WEBHOOK_SECRET"  # the variable holding the shared secret ...
    secret_file: Path | None = None  # ... or a file holding it (when the variable is unset)
    # refuse the plain header secret: only signed, timestamped requests (X-Clinragen-Signature);
    # whoever can read the server's Subscriptions can read that header
    require_hmac: bool = False
    debounce_s: int = Field(30, ge=0)  # one task per patient per this many seconds
    # a notification naming more patients is refused (413): one request cannot queue a backfill
    max_patients: int = Field(100, ge=1)
    # a body (or event) seen within this is a duplicate or a replay; it must outlive the
    # signature window on both sides of now, or a replay after the key expired is accepted
    dedupe_ttl_s: int = Field(24 * 3600, ge=2 * WEBHOOK_MAX_SKEW_S)
    max_body_bytes: int = Field(1024 * 1024, gt=0)
    # > 0: the receiver's Prometheus /metrics on <metrics_host>:<port> (`clinragen-fhir webhook
    # --metrics-port/--metrics-host` override both); host None: worker.metrics_host (loopback
    # unless a site sets it)
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str | None = None

    def secret_source(self) -> str:
        """Where the secret is read from, for check-config (never the value)."""
        return _secret_source(self.secret_env, self.secret_file)

    def secret(self) -> SecretStr:
        """The shared secret, read now; FhirConfigError (naming where, never the value) if it
        is unset, unreadable, shorter than 16 characters or the example configs' placeholder."""
        return _named_secret("the webhook secret", self.secret_env, self.secret_file,
                             MIN_WEBHOOK_SECRET_CHARS, required=True)


# The CDS Hooks service's and the problem list's environment variables before they were
# settings: refused with their new names, like the webhook's (`Settings.__init__`)
LEGACY_ENV = {
    **LEGACY_WEBHOOK_ENV,
    "CLINRAGEN_PROBLEM_LIST": "CLINRAGEN_REPORT__PROBLEM_LIST",
    "CLINRAGEN_CDS_AUTH": "CLINRAGEN_CDS_HOOKS__AUTH",
    "CLINRAGEN_CDS_JWT_ISSUER": "CLINRAGEN_CDS_HOOKS__JWT_ISSUER",
    "CLINRAGEN_CDS_JWT_KEYS_FILE": "CLINRAGEN_CDS_HOOKS__JWT_KEYS_FILE",
    "CLINRAGEN_CDS_BASE_URL": "CLINRAGEN_CDS_HOOKS__BASE_URL",
    "CLINRAGEN_CDS_REPORT_URL": "CLINRAGEN_CDS_HOOKS__REPORT_URL",
    "CLINRAGEN_CDS_CORS_ORIGINS": "CLINRAGEN_CDS_HOOKS__CORS_ORIGINS",
    "CLINRAGEN_CDS_LINK_SECRET_FILE": "CLINRAGEN_CDS_HOOKS__LINK_SECRET_FILE",
}
MIN_CDS_LINK_SECRET_CHARS = 16


class CdsHooksSettings(BaseModel):
    """The CDS Hooks patient-view service (`clinragen-fhir cds-hooks`, clinragen_fhir/cds_hooks.py;
    `CdsConfig.from_settings` checks them at start). The EHR's public keys are a file it names;
    the report-link key is never here: `link_secret_env` names the variable holding it, or
    `link_secret_file` a file."""

    model_config = ConfigDict(extra="forbid")

    # jwt: every request carries the EHR's signed JWT; none: no auth, refused off loopback
    auth: Literal["jwt", "none"] = "jwt"
    jwt_issuer: str | None = None  # the EHR's `iss`
    jwt_keys_file: Path | None = None  # the EHR's public key (PEM) or JWKS (JSON)
    base_url: str = ""  # the public URL the EHR calls: the JWT audience (needed with jwt)
    report_url: str = ""  # a link template with {id} (and {version}); "": our /reports/{id}
    # browser-based EHR origins allowed by CORS, comma-separated (in the TOML a list as well)
    cors_origins: str = ""
    link_secret_env: str = "CLINRAGEN_CDS_LINK_SECRET"  # signs report links (>= 16 chars) ...
    link_secret_file: Path | None = None  # ... or a file; neither: a random key per process
    metrics_port: int = Field(0, ge=0, le=65535)  # > 0: /metrics (`--metrics-port` overrides)
    metrics_host: str | None = None  # None: worker.metrics_host; `--metrics-host` overrides

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _a_list_is_joined(cls, value: Any) -> Any:
        return ",".join(str(v) for v in value) if isinstance(value, list) else value

    def origins(self) -> list[str]:
        """`cors_origins` as a list."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def link_secret_source(self) -> str:
        """Where the link key is read from, for check-config (never the value)."""
        return _secret_source(self.link_secret_env, self.link_secret_file)

    def link_secret(self) -> SecretStr | None:
        """The report-link key, read now; None when neither is set (a random key per process:
        links die with a restart). FhirConfigError, naming where and never the value, when it
        is unreadable, short or the example configs' placeholder."""
        return _named_secret("the CDS link secret", self.link_secret_env,
                             self.link_secret_file, MIN_CDS_LINK_SECRET_CHARS, required=False)


class TracingSettings(BaseModel):
    """OpenTelemetry tracing (clinragen_fhir/tracing.py): off unless `enabled`. Spans go by
    OTLP/HTTP to a collector, every URL, span name and message scrubbed of ids first."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # the collector's traces URL (".../v1/traces"); None: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    # else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces, else http://localhost:4318/v1/traces.
    # Headers (a collector's token) and CA: the exporter's own OTEL_EXPORTER_OTLP_* variables.
    otlp_endpoint: str | None = None
    allow_insecure_http: bool = False  # plain http to a non-loopback collector
    service_name: str = "clinragen-fhir"  # the process kind is appended: -worker, -webhook
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)  # of root traces; children follow
    timeout_s: float = Field(10.0, gt=0)  # one export request


class InferenceSettings(BaseModel):
    """The ONNX model runtime (used when `model_dir` is set)."""

    model_config = ConfigDict(extra="forbid")

    # int8: the decoder dynamically quantised, the head's prefix graph fp32 (so no conclusion
    # moves; 2.1x faster, docs/performance.md); "fp32" for an export made without --int8
    precision: Literal["fp32", "int8"] = "int8"
    provider: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA when present, else CPU
    threads: int = 0  # intra-op threads per session; 0 = onnxruntime's default (all cores)
    batch_size: int = 4  # patients per decoder batch (predict_batch)
    # the old diagnosis-line constraint; off: the head concludes, the text only explains
    constrained: bool = False
    max_new_tokens: int | None = None  # None: the model config's
    verify_hashes: bool = True  # sha256 of every graph at load (a few seconds, once)


def _toml_key(env_name: str) -> str:
    """CLINRAGEN_CDS_HOOKS__JWT_ISSUER -> `[cds_hooks] jwt_issuer`."""
    section, _, key = env_name.removeprefix("CLINRAGEN_").lower().partition("__")
    return f"[{section}] {key}"


class Settings(BaseSettings):
    """Everything the CLI and the worker read."""

    # forbid: an unknown key in the TOML (or CLINRAGEN_FHIR__<unknown>) is an error; other
    # CLINRAGEN_* variables (CLINRAGEN_CONFIG, the secrets) are not settings and stay ignored
    model_config = SettingsConfigDict(env_prefix="CLINRAGEN_", env_nested_delimiter="__",
                                      extra="forbid")

    fhir: FhirEndpoint = Field(default_factory=FhirEndpoint)
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    state_url: str = "redis://127.0.0.1:6379/4"  # webhook de-duplication, polling cursors
    # CA bundle (PEM) that signs the rediss:// / amqps:// broker's and backend's certificate;
    # None: the system CAs. The host name is checked either way (worker.app.broker_tls).
    broker_ca_file: Path | None = None
    model_dir: Path | None = None  # a trained ONNX model directory; None = rule baseline
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    knowledge_path: Path | None = None  # None = the graph shipped with the package
    report: ReportSettings = Field(default_factory=ReportSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    cds_hooks: CdsHooksSettings = Field(default_factory=CdsHooksSettings)
    log_level: str = "INFO"

    def __init__(self, **values: Any) -> None:
        """As BaseSettings, with unknown keys named in a FhirConfigError (pydantic's own error
        would also print each value given, and a value can be a secret). A variable of the
        names before these were settings (the webhook's, CLINRAGEN_PROBLEM_LIST, the CDS Hooks
        service's) is refused with its new one (`LEGACY_ENV`), never ignored."""
        legacy = sorted(name for name in LEGACY_ENV if name in os.environ)
        if legacy:
            raise FhirConfigError("no longer read: " + ", ".join(
                f"{n} (now {LEGACY_ENV[n]}, or {_toml_key(LEGACY_ENV[n])} in the TOML)"
                for n in legacy))
        try:
            super().__init__(**values)
        except ValidationError as exc:
            unknown = [".".join(str(p) for p in e["loc"]) for e in exc.errors()
                       if e["type"] == "extra_forbidden"]
            if not unknown:
                raise
            raise FhirConfigError(
                f"unknown config key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
                "(misspelt? the keys are in deploy/config.example.toml)") from None

    def metrics_bind(self, process: Literal["worker", "webhook", "cds_hooks"]
                     ) -> tuple[int, str]:
        """(port, host) of a process's /metrics (port 0: off); the webhook's and the CDS Hooks
        service's host falls back to the worker's."""
        w = self.worker
        if process == "worker":
            return w.metrics_port, w.metrics_host
        own = self.webhook if process == "webhook" else self.cds_hooks
        return own.metrics_port, own.metrics_host or w.metrics_host

    def check_site_secrets(self) -> None:
        """Refuse to start with a secret that fails open: the log-id hash key a placeholder, or,
        with any service off loopback, unset or short (the public default key lets anyone
        recover a logged patient hash by hashing candidate ids); or a broker, result backend or
        state URL whose password is the example configs' placeholder (deploy/compose/.env)."""
        for name in ("broker_url", "result_backend", "state_url"):
            password = urlsplit(getattr(self, name)).password
            if password and is_placeholder(unquote(password)):
                raise FhirConfigError(f"the password in {name} is the example configs' "
                                      "placeholder: set the real one")
        key = os.environ.get(LOG_ID_KEY_ENV, "").strip()
        if key and is_placeholder(key):
            raise FhirConfigError(f"{LOG_ID_KEY_ENV} is the example configs' placeholder: set "
                                  "a site key (e.g. `openssl rand -hex 32`)")
        remote = [h for h in (urlsplit(u).hostname for u in (
            self.fhir.base_url, self.broker_url, self.result_backend, self.state_url))
            if h and not is_loopback(h)]
        if remote and len(key) < MIN_SITE_KEY_CHARS:
            raise FhirConfigError(
                f"{LOG_ID_KEY_ENV} must be a site key of >= {MIN_SITE_KEY_CHARS} characters "
                f"when a service is off loopback ({remote[0]}): log lines hash patient ids "
                "with it")

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


def problem_list_enabled(setting: bool | None = None) -> bool:
    """Whether the worker reads the problem list: `setting` when given, else `[report]
    problem_list` as configured now (the TOML and CLINRAGEN_REPORT__PROBLEM_LIST, default off;
    read at each call, as the worker's other settings are read per process). A value that is
    not a boolean is an error, as any misspelt setting is, never silently off; so is the old
    CLINRAGEN_PROBLEM_LIST (config.LEGACY_ENV names the new one)."""
    if setting is not None:
        return setting
    return Settings().report.problem_list
