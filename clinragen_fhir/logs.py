"""Structured JSON logs that never carry a patient id or a secret in the clear."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sys
from typing import Any

KEY_ENV = "CLINRAGEN_LOG_ID_KEY"  # checked at start: config.Settings.check_site_secrets


def hash_id(identifier: str) -> str:
    """A short keyed hash of an id, stable within a site so log lines can be joined.

    With CLINRAGEN_LOG_ID_KEY set, ids cannot be recovered by hashing a list of candidates.
    """
    key = os.environ.get(KEY_ENV, "clinragen-fhir").encode()
    return hmac.new(key, identifier.encode(), hashlib.sha256).hexdigest()[:16]


def error_text(exc: BaseException) -> str:
    """An exception for a log line or a dead letter: our own errors (FhirError, whose texts are
    redacted) in full, anything else by its type only, since a library's text can quote the
    request it failed on (httpx's "Illegal header value b'Bearer ...'")."""
    from clinragen_fhir.fhir.errors import FhirError

    if isinstance(exc, FhirError):
        return f"{type(exc).__name__}: {exc}"
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else \
        f"{kind.__module__}.{kind.__qualname__}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line; fields passed in `extra={"fields": {...}}` are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            out["error"] = error_text(record.exc_info[1])
        return json.dumps(out, default=str)


def configure(level: str = "INFO", json_lines: bool = True) -> None:
    """Install the JSON formatter on the root logger (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level)
    # sys.__stderr__, not sys.stderr: in a Celery pool child sys.stderr is a LoggingProxy that
    # drops writes made from inside logging, so every task log line would vanish.
    handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(message)s"))
    root.handlers = [handler]
    # httpx logs full URLs (with patient ids in the query) at INFO: keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
