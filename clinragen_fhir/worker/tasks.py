"""Celery tasks. Each is idempotent: running one twice writes at most one report."""

from __future__ import annotations

import logging
import random
from functools import cache
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from clinragen_fhir import logs
from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.errors import FhirError
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.pipeline import Predictor, diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.worker.app import app

log = logging.getLogger(__name__)


@cache
def _runtime() -> tuple[Settings, KnowledgeGraph, Predictor]:
    """Settings, graph and predictor, loaded once per worker process."""
    settings = Settings()
    logs.configure(settings.log_level)
    kg = load_graph(settings.knowledge_path)
    return settings, kg, RuleBaseline(kg)


@app.task(bind=True, name="clinragen.diagnose")
def diagnose(self: Task, patient_id: str) -> dict[str, Any]:
    """Diagnose one patient and write its report; retry transient FHIR failures."""
    settings, kg, predictor = _runtime()
    phash = logs.hash_id(patient_id)
    try:
        with settings.fhir.client() as client:
            outcome = diagnose_patient(client, kg, predictor, patient_id, settings.report)
    except FhirError as exc:
        w = settings.worker
        if exc.retryable and self.request.retries < w.max_retries:
            delay = min(w.retry_backoff_max_s, w.retry_backoff_s * 2 ** self.request.retries)
            delay *= 0.5 + random.random()
            if exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
            log.warning("diagnose retry", extra={"fields": {
                "patient": phash, "retry": self.request.retries + 1, "delay_s": round(delay, 1),
                "error": type(exc).__name__}})
            raise self.retry(exc=exc, countdown=delay) from exc
        log.error("diagnose failed", extra={"fields": {"patient": phash, "error": str(exc)}})
        raise
    except SoftTimeLimitExceeded:
        log.error("diagnose timed out", extra={"fields": {"patient": phash}})
        raise
    return outcome.as_dict()
