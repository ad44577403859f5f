"""`clinragen-fhir check-config`: each check of what the worker, the webhook and the CLI will
use, trying each service, one block of output lines each (never a secret's value). `check_all`
runs them in order; `cli.check_config` is the command."""

from __future__ import annotations

from pathlib import Path

import click

from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.fhir.capability import capability_gaps
from clinragen_fhir.fhir.errors import FhirError
from clinragen_fhir.identity import model_identity

_LETTERS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def check_scope(endpoint: FhirEndpoint, problem_list: bool = False) -> bool:
    """Token auth: fetch a token and name each scope the worker needs that the grant lacks.

    A scope-enforcing server refuses those requests, so every task would end dead-lettered;
    here it is one line per scope, before the first task runs."""
    from clinragen_fhir.fhir.auth import (
        ClientCredentialsAuth,
        SmartBackendAuth,
        missing_scopes,
        requested_scope,
        worker_access,
    )

    if endpoint.auth not in ("client-credentials", "smart-backend"):
        click.echo(f"scope: not checked (auth: {endpoint.auth}, no token endpoint)")
        return True
    # Condition search too while the problem-list check is on ([report] problem_list)
    needed = worker_access(problem_list)
    scope_sent = requested_scope(endpoint.scope, problem_list)
    click.echo(f"scope requested: {scope_sent or '(none: the server chooses)'}")
    ok = True
    if scope_sent is not None:
        for scope in missing_scopes(scope_sent, needed):
            click.echo(f"  MISSING from the configured scope: {scope}")
            ok = False
    try:
        auth = endpoint.http_auth()
        assert isinstance(auth, ClientCredentialsAuth | SmartBackendAuth)
        auth.token(force=True)
    except FhirError as exc:  # TokenError and FhirConfigError say what, never a secret
        click.echo(f"  NO TOKEN: {exc}")
        return False
    granted = auth.granted_scope or ""
    click.echo(f"  granted: {granted or '(none)'}")
    for scope in missing_scopes(granted, needed):
        rtype, letters = scope.removeprefix("system/").split(".")
        what = ", ".join(_LETTERS[c] for c in letters)
        click.echo(f"  MISSING scope: {scope} (the server would refuse the worker's "
                   f"{rtype} {what})")
        ok = False
    return ok


def masked(url: str) -> str:
    """A URL with its password (and any query, which can carry a token) replaced by ****."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:****@{netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, "****" if parts.query else "", ""))


def _secret_state(env: str | None, file: Path | None) -> str:
    """Where a secret is read from and whether it is there; never the value."""
    import os

    if env and os.environ.get(env, "").strip():
        return f"environment variable {env} (set)"
    if file is not None:
        return f"file {file}" + ("" if file.is_file() else " (MISSING)")
    return f"environment variable {env} (NOT SET)" if env else "NOT SET"


def credential_lines(endpoint: FhirEndpoint) -> list[str]:
    """How this endpoint authenticates: which client, which secret from where (never a secret
    itself), which key id; mutual TLS and the CA."""
    lines: list[str] = []
    if endpoint.auth == "bearer":
        lines.append(f"token: {_secret_state(endpoint.token_env, endpoint.token_file)}")
    elif endpoint.auth in ("client-credentials", "smart-backend"):
        token_url = masked(endpoint.token_url) if endpoint.token_url else \
            f"discovered from {masked(endpoint.base_url)}/.well-known/smart-configuration"
        lines.append(f"client_id: {endpoint.client_id or '(NOT SET)'}; token endpoint: "
                     f"{token_url}")
    if endpoint.auth == "client-credentials":
        lines.append("client secret: "
                     + _secret_state(endpoint.client_secret_env, endpoint.client_secret_file))
    if endpoint.auth == "smart-backend":
        if endpoint.private_key_dir is not None:
            from clinragen_fhir.fhir.keys import newest

            try:
                key = newest(endpoint.private_key_dir)
                lines.append(f"signing key: newest of {endpoint.private_key_dir}: kid {key.kid}, "
                             f"{key.alg}, created {key.created:%Y-%m-%d}")
            except (FhirError, OSError, ValueError) as exc:
                lines.append(f"signing key: {endpoint.private_key_dir}: UNUSABLE: "
                             f"{type(exc).__name__}: {exc}")
        else:
            held = _secret_state(endpoint.private_key_env, endpoint.private_key_file)
            lines.append(f"signing key: {held}, {endpoint.jwt_alg}, kid "
                         f"{endpoint.jwt_kid or '(NOT SET)'}")
    if endpoint.client_cert:
        lines.append(f"mutual TLS: certificate {endpoint.client_cert}"
                     + (f", key {endpoint.client_key}" if endpoint.client_key else ""))
    if endpoint.base_url.startswith("https:"):
        lines.append(f"TLS: verify {endpoint.verify_tls}, CA "
                     f"{endpoint.ca_file or 'the system store'}")
    return lines


def _check_fhir(settings: Settings) -> bool:
    endpoint = settings.fhir
    ok = True
    click.echo(f"FHIR endpoint {masked(endpoint.base_url)} (auth: {endpoint.auth}, "
               f"TLS verify: {endpoint.verify_tls})")
    for line in credential_lines(endpoint):
        click.echo(f"  {line}")
    try:
        with endpoint.client() as client:
            cap = client.capabilities()
        software = cap.get("software", {})
        click.echo(f"  reachable: {software.get('name', '?')} {software.get('version', '')}, "
                   f"FHIR {cap.get('fhirVersion')}")
        if not str(cap.get("fhirVersion", "")).startswith("4.0"):
            click.echo("  MISSING: FHIR R4 (4.0.x)")
            ok = False
        for gap in capability_gaps(cap, settings.report.problem_list):
            click.echo(f"  MISSING: {gap}")
            ok = False
    except FhirError as exc:
        click.echo(f"  UNREACHABLE: {exc}")
        ok = False
    return ok


def _check_retries(settings: Settings) -> bool:
    from clinragen_fhir.worker.tasks import retry_policy

    client = settings.fhir.retries + 1
    runs = retry_policy(settings.worker).attempts
    click.echo(f"retries: {client} tries per request (fhir.retries {settings.fhir.retries}) x "
               f"{runs} runs per patient (worker.max_retries {settings.worker.max_retries}) = "
               f"at most {client * runs} requests per failing call; a final error is sent once")
    return True


def _check_broker(settings: Settings) -> bool:
    from kombu.connection import Connection

    from clinragen_fhir.worker.app import broker_tls

    click.echo(f"broker {Connection(settings.broker_url).as_uri(mask='****')}")
    try:  # with the worker's TLS checks: a broker the worker would refuse is not "reachable"
        with Connection(settings.broker_url, connect_timeout=5,
                        ssl=broker_tls(settings.broker_url, settings.broker_ca_file) or False
                        ) as conn:
            conn.ensure_connection(max_retries=1)
        click.echo("  reachable")
        return True
    except Exception as exc:  # kombu raises transport-specific errors
        click.echo(f"  UNREACHABLE: {type(exc).__name__}")
        return False


def _check_redis(what: str, url: str, settings: Settings) -> bool:
    """A Redis URL answering PING (with the worker's TLS checks); others are not checked."""
    import redis

    from clinragen_fhir.worker.app import broker_tls

    click.echo(f"{what} {masked(url)}")
    if not url.startswith(("redis://", "rediss://")):
        click.echo("  not checked (not Redis)")
        return True
    try:
        tls = broker_tls(url, settings.broker_ca_file) or {}
        with redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                  **tls) as conn:
            conn.ping()
        click.echo("  reachable")
        return True
    except Exception as exc:  # never the text: it can name the host and port
        click.echo(f"  UNREACHABLE: {type(exc).__name__}")
        return False


def _check_model(settings: Settings) -> bool:
    from clinragen_fhir.inference.errors import ModelUnavailable
    from clinragen_fhir.inference.manifest import read_manifest

    identity = model_identity(settings.model_dir)
    if settings.model_dir is None:
        click.echo(f"model: {identity} (model_dir unset: reports say rule-baseline)")
        return True
    click.echo(f"model {settings.model_dir}: {identity}")
    try:
        read_manifest(settings.model_dir, verify_hashes=settings.inference.verify_hashes,
                      variant=settings.inference.precision)
    except (ModelUnavailable, OSError) as exc:
        click.echo(f"  UNUSABLE: {exc} (the worker would write rule-baseline reports)")
        return False
    click.echo("  manifest and files match" + (" (sha256 of every file)"
                                                 if settings.inference.verify_hashes else
                                                 " (sizes; verify_hashes is off)"))
    return True


def _check_webhook(settings: Settings) -> bool:
    hook = settings.webhook
    source = hook.secret_source()
    click.echo(f"webhook secret: {source}")
    if source == "not set":
        click.echo(f"  `clinragen-fhir webhook` and `subscribe` refuse to start without it "
                   f"({hook.secret_env} or webhook.secret_file); the worker does not need it")
        ok = True
    else:
        try:
            hook.secret()
            ok = True
        except FhirError as exc:  # names where, never the value
            click.echo(f"  REFUSED: {exc}")
            ok = False
    click.echo(f"  {'HMAC signatures required' if hook.require_hmac else 'header secret or HMAC'}"
               f"; debounce {hook.debounce_s} s; at most {hook.max_patients} patients per "
               f"notification; replay window {hook.dedupe_ttl_s} s")
    return ok


def _check_metrics(settings: Settings) -> bool:
    """Where each process serves /metrics (the webhook's and the CDS Hooks service's: their
    settings, `--metrics-port/--metrics-host` override them)."""
    port, host = settings.metrics_bind("worker")
    click.echo("metrics: worker /metrics " + (f"on {host}:{port}" if port > 0 else
                                              "off (worker.metrics_port = 0)"))
    for process in ("webhook", "cds_hooks"):
        port, host = settings.metrics_bind(process)
        click.echo(f"  {process.replace('_', '-')} /metrics " + (
            f"on {host}:{port}" if port > 0 else
            f"off ({process}.metrics_port = 0, unless its --metrics-port is given)"))
    return True


def _otlp_source(settings: Settings) -> str:
    import os

    if settings.tracing.otlp_endpoint:
        return "tracing.otlp_endpoint"
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if os.environ.get(name, "").strip():
            return name
    return "the OTLP/HTTP default"


def _check_tracing(settings: Settings) -> bool:
    """Tracing: on or off; on, the collector (masked), where that URL comes from, the
    sampling, the service names, whether collector headers are set (never their value), and
    an endpoint the exporter would refuse (plain http off loopback) is a problem."""
    import os

    from clinragen_fhir.fhir.urls import check_url
    from clinragen_fhir.tracing import otlp_endpoint

    t = settings.tracing
    if not t.enabled:
        click.echo("tracing: off (tracing.enabled = false)")
        return True
    endpoint = otlp_endpoint(t)
    click.echo(f"tracing: on, OTLP/HTTP to {masked(endpoint)} (from {_otlp_source(settings)})")
    click.echo(f"  sampling {t.sample_ratio:.0%} of root traces (children follow their "
               f"parent); services {t.service_name}-worker, -webhook, -cds-hooks; export "
               f"timeout {t.timeout_s:g} s")
    headers = [n for n in ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
               if os.environ.get(n, "").strip()]
    click.echo("  collector headers: " + (f"{headers[0]} (set, not shown)" if headers else
                                          "none (OTEL_EXPORTER_OTLP_HEADERS unset)"))
    try:
        check_url(endpoint, "tracing.otlp_endpoint", t.allow_insecure_http)
    except FhirError as exc:
        click.echo(f"  REFUSED: {exc}")
        return False
    return True


def _check_problem_list(settings: Settings) -> bool:
    if settings.report.problem_list:
        click.echo("problem list: on (report.problem_list): at report time the worker searches "
                   "the patient's active Conditions (never a model input), known vs suspected; "
                   "the default scope asks for system/Condition.s")
    else:
        click.echo("problem list: off (report.problem_list = false): no Condition is read; "
                   "reports say \"problem list not checked\"")
    return True


def _check_cds_hooks(settings: Settings) -> bool:
    """The CDS Hooks service's settings, loaded as `clinragen-fhir cds-hooks` would: unset is
    said (the worker does not need them), set but refused is a problem."""
    from clinragen_fhir.cds.config import CdsConfig

    cds = settings.cds_hooks
    link = cds.link_secret_source()
    if cds.auth == "none":
        click.echo("cds hooks: auth none (test only: `clinragen-fhir cds-hooks` refuses any "
                   "address but loopback)")
    elif not (cds.jwt_issuer or cds.jwt_keys_file or cds.base_url):
        click.echo("cds hooks: not configured (`clinragen-fhir cds-hooks` refuses to start "
                   "without cds_hooks.jwt_issuer, jwt_keys_file and base_url); the worker does "
                   "not need it")
        return True
    else:
        click.echo(f"cds hooks: JWT auth, issuer {cds.jwt_issuer or '(NOT SET)'}, keys "
                   f"{cds.jwt_keys_file or '(NOT SET)'}, audience "
                   f"{masked(cds.base_url) if cds.base_url else '(NOT SET)'}")
    click.echo("  report links: " + (masked(cds.report_url) if cds.report_url else
                                     "the service's /reports/{id}") + "; link secret: "
               + (link if link != "not set" else
                  "not set (a random key per process: links die with a restart)")
               + "; CORS origins: " + (", ".join(cds.origins()) or "none"))
    try:
        config = CdsConfig.from_settings(cds)
    except (ValueError, OSError, FhirError) as exc:  # names the setting, never a secret
        click.echo(f"  REFUSED: {type(exc).__name__}: {exc}" if isinstance(exc, OSError)
                   else f"  REFUSED: {exc}")
        return False
    if config.auth is not None:
        click.echo(f"  {len(config.auth.keys)} verification key"
                   f"{'s' if len(config.auth.keys) != 1 else ''} loaded")
    return True


def _check_log_key(settings: Settings) -> bool:
    import os

    from clinragen_fhir.logs import KEY_ENV

    state = "a site key (set)" if os.environ.get(KEY_ENV, "").strip() else \
        "the public default key (every service is on loopback)"
    click.echo(f"log ids: hashed with {KEY_ENV}: {state}")
    return True


def check_all(settings: Settings) -> bool:
    """Every check, in the order `check-config` prints them; True when none found a problem."""
    results = [_check_fhir(settings), check_scope(settings.fhir, settings.report.problem_list),
               _check_retries(settings),
               _check_broker(settings),
               _check_redis("result backend", settings.result_backend, settings),
               _check_redis("state store", settings.state_url, settings),
               _check_model(settings), _check_problem_list(settings),
               _check_webhook(settings), _check_cds_hooks(settings), _check_metrics(settings),
               _check_tracing(settings), _check_log_key(settings)]
    return all(results)
