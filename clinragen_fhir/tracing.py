"""OpenTelemetry tracing for the worker (Celery, httpx) and the webhook receiver (ASGI).

Off by default (`[tracing] enabled = false`). On, each process exports its spans by OTLP/HTTP to
a collector: the Celery task (`run/clinragen.diagnose`) is the root of a diagnose run's trace,
each FHIR request (and token fetch) a child span, and the W3C `traceparent` header carries the
trace to the FHIR server and through the broker (a webhook's publish and the task it queued are
one trace). The trace id goes on every AuditEvent written in the trace (report/audit.py), so an
audit record leads to its trace and back.

No patient id reaches a span. Every span is scrubbed before it is handed to the exporter
(`ScrubbingSpanProcessor`), whatever instrumentation made it:

* a URL or path (`url.full`, `http.url`, `http.target`, `url.path`, span names such as
  `PUT /notify/Observation/123`) keeps its scheme, host, port and the path's fixed words, and
  loses every id segment (`Patient/{id}`) and every query value (`?patient=*&date=*`);
* a FHIR reference in any other text (`Patient/123`) becomes `Patient/{id}`;
* exception messages and stack traces are dropped (a library's message can quote the request),
  the exception type stays; a span's error status keeps the type only;
* request and response headers are never captured (the instrumentations' default).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import Link, Status

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter
    from starlette.types import ASGIApp

    from clinragen_fhir.config import TracingSettings

log = logging.getLogger(__name__)

ID = "{id}"
# a path segment that names a FHIR resource type (or another fixed, capitalised word)
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
# fixed words of our own and the FHIR server's paths: lower-case letters, '-', '.', no digit
_WORD = re.compile(r"\.?[a-z][a-z\-.]{0,63}")
# segments after which the next one is an id whatever it looks like
_ID_FOLLOWS = frozenset({"_history", "reports"})
# `Type/id` in free text (a reference, an error text): the id goes
_REFERENCE = re.compile(r"\b([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})")
_URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.\-]*://[^\s'\"<>]+", re.IGNORECASE)
# attributes whose whole value is a URL, a path, a query or a route
_URL_KEYS = frozenset({"http.url", "url.full", "http.target", "url.path", "url.query",
                       "http.route"})
_DROPPED_EVENT_KEYS = frozenset({"exception.message", "exception.stacktrace"})


# -- scrubbing ------------------------------------------------------------------------------
def scrub_path(path: str) -> str:
    """A URL path without ids: FHIR type names, `_`/`$` words (`_history`, `$export`) and
    digit-free lower-case words stay; any other segment, and the one after a type name,
    `_history` or `reports`, is `{id}`."""
    out: list[str] = []
    after_type = False
    for segment in path.split("/"):
        if not segment:
            out.append(segment)
            continue
        if after_type:
            out.append(ID)
            after_type = False
            continue
        if _TYPE.fullmatch(segment) or segment in _ID_FOLLOWS:
            out.append(segment)
            after_type = True
        elif _WORD.fullmatch(segment.removeprefix("_").removeprefix("$")):
            out.append(segment)
        else:
            out.append(ID)
    return "/".join(out)


def scrub_query(query: str) -> str:
    """Parameter names kept, in order, every value `*`."""
    names = [k for k, _ in parse_qsl(query, keep_blank_values=True)]
    return "&".join(f"{scrub_path(k) if '/' in k else k}=*" for k in names)


def scrub_url(url: str) -> str:
    """A URL (or a bare path, or `path?query`) with its path scrubbed and query values starred;
    user info and fragment dropped."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if ":" in (parts.hostname or "") and parts.hostname:  # IPv6
        host = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port is not None else "")
    query = scrub_query(parts.query) if parts.query else ""
    return urlunsplit((parts.scheme, host, scrub_path(parts.path), query, ""))


def scrub_text(text: str) -> str:
    """Free text: every URL in it scrubbed, every `Type/id` reference's id replaced, and a
    leading path (a span name's `PUT /notify/Patient/1`) scrubbed."""
    text = _URL_IN_TEXT.sub(lambda m: scrub_url(m.group(0)), text)
    words = text.split(" ")
    words = [scrub_url(w) if w.startswith("/") else w for w in words]
    return _REFERENCE.sub(lambda m: f"{m.group(1)}/{ID}" if m.group(2) != ID else m.group(0),
                          " ".join(words))


def scrub_value(key: str, value: Any) -> Any:
    """One attribute value, scrubbed by what its key says it holds."""
    if isinstance(value, str):
        return scrub_url(value) if key in _URL_KEYS else scrub_text(value)
    if isinstance(value, tuple | list):
        return tuple(scrub_value(key, v) for v in value)
    return value


def scrub_attributes(attributes: Mapping[str, Any] | None,
                     dropped: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {k: scrub_value(k, v) for k, v in (attributes or {}).items() if k not in dropped}


def scrubbed(span: ReadableSpan) -> ReadableSpan:
    """A copy of a finished span with its name, attributes, events, links and status
    description scrubbed."""
    events = [Event(e.name, scrub_attributes(e.attributes, _DROPPED_EVENT_KEYS), e.timestamp)
              for e in span.events]
    links = [Link(link.context, scrub_attributes(link.attributes)) for link in span.links]
    status = span.status
    if status.description:  # "ValueError: <message>": the type only
        status = Status(status.status_code, status.description.split(":", 1)[0][:200])
    return ReadableSpan(
        name=scrub_text(span.name), context=span.context, parent=span.parent,
        resource=span.resource, attributes=scrub_attributes(span.attributes), events=events,
        links=links, kind=span.kind, status=status, start_time=span.start_time,
        end_time=span.end_time, instrumentation_scope=span.instrumentation_scope)


class ScrubbingSpanProcessor(SpanProcessor):
    """Hands `inner` (the exporting processor) a scrubbed copy of every finished span."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        self.inner.on_end(scrubbed(span))

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))


# -- set-up ---------------------------------------------------------------------------------
def otlp_endpoint(settings: TracingSettings) -> str:
    """The traces URL the exporter will use: the setting, else the OTEL_* variables, else the
    OTLP/HTTP default."""
    if settings.otlp_endpoint:
        return settings.otlp_endpoint
    if url := os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return url
    if url := os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return url.rstrip("/") + "/v1/traces"
    return "http://localhost:4318/v1/traces"


def provider_for(settings: TracingSettings, kind: str,
                 exporter: SpanExporter | None = None) -> TracerProvider:
    """A TracerProvider whose spans are scrubbed, then exported: by `exporter` at once (tests:
    an InMemorySpanExporter), else in batches by OTLP/HTTP to `otlp_endpoint(settings)`, plain
    http refused off loopback unless `allow_insecure_http`."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from clinragen_fhir import __version__

    resource = Resource.create({"service.name": f"{settings.service_name}-{kind}",
                                "service.version": __version__})
    provider = TracerProvider(resource=resource,
                              sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
    if exporter is not None:
        provider.add_span_processor(ScrubbingSpanProcessor(SimpleSpanProcessor(exporter)))
        return provider
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from clinragen_fhir.fhir.urls import check_url

    endpoint = otlp_endpoint(settings)
    check_url(endpoint, "tracing.otlp_endpoint", settings.allow_insecure_http)
    provider.add_span_processor(ScrubbingSpanProcessor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, timeout=settings.timeout_s))))
    return provider


_installed: list[Any] = []  # the instrumentors this process turned on (for `uninstrument`)
_providers: list[TracerProvider] = []  # what `setup` made the global provider (for `shutdown`)


def instrument(provider: TracerProvider, celery: bool = True, httpx: bool = True) -> None:
    """Turn on the Celery and httpx instrumentations with `provider` (idempotent)."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    wanted: list[Any] = []
    if celery:
        wanted.append(CeleryInstrumentor())  # type: ignore[no-untyped-call]
    if httpx:
        wanted.append(HTTPXClientInstrumentor())
    for instrumentor in wanted:
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
            _installed.append(instrumentor)


def uninstrument() -> None:
    """Undo `instrument` (tests)."""
    while _installed:
        _installed.pop().uninstrument()


def setup(settings: TracingSettings, kind: str, *, celery: bool = True,
          httpx: bool = True) -> TracerProvider | None:
    """In a process that traces (a worker's pool child, the webhook): build the provider, make
    it the global one, turn the instrumentations on. None (and nothing done) when tracing is
    off. The exporter's thread does not survive a fork: call this after it (Celery's
    `worker_process_init`)."""
    if not settings.enabled:
        return None
    provider = provider_for(settings, kind)
    trace.set_tracer_provider(provider)
    _providers.append(provider)
    instrument(provider, celery=celery, httpx=httpx)
    log.info("tracing on", extra={"fields": {"service": f"{settings.service_name}-{kind}",
                                             "sample_ratio": settings.sample_ratio}})
    return provider


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is still batched and stop (a pool process exiting: billiard's children end
    without running atexit, so the SDK's own exit hook would not)."""
    while _providers:
        provider = _providers.pop()
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()


def _span_details(scope: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The ASGI server span's name: method and scrubbed path (the default puts the raw path,
    `PUT /notify/Patient/<id>`, in the name)."""
    method = str(scope.get("method", "HTTP")).strip() or "HTTP"
    return f"{method} {scrub_path(str(scope.get('path', '')))}", {}


def asgi(app: ASGIApp, provider: TracerProvider | None,
         excluded: Sequence[str] = (r"/health(\?|$)",)) -> ASGIApp:
    """`app` wrapped in the ASGI instrumentation (server spans, `traceparent` read from the
    sender), or `app` itself when `provider` is None (tracing off). `excluded`: regular
    expressions searched in the request URL (the probes' /health: no span)."""
    if provider is None:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    wrapped = OpenTelemetryMiddleware(app, excluded_urls=",".join(excluded),
                                      default_span_details=_span_details,
                                      tracer_provider=provider, exclude_spans=["receive", "send"])
    return cast("ASGIApp", wrapped)


def trace_id() -> str | None:
    """The current trace's id (32 hex digits), or None outside a sampled trace (tracing off)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return f"{context.trace_id:032x}"

