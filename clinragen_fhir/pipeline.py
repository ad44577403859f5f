"""One patient end to end: FHIR -> resources -> encoding -> predictor -> report -> FHIR.

Plain functions with no Celery in them, so the CLI, the worker and the tests share one path.
Our reports on the server are found by report/lookup.py, the inputs fingerprint that spares an
unchanged patient a prediction is report/fingerprint.py's.

Over 400 lines because it is the run itself, step by step (read, predict, write or skip, audit),
for one patient and for a batch that shares the predictor's batch; each step is one function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from clinragen_fhir.config import ReportSettings, problem_list_enabled
from clinragen_fhir.encoding.patient import PatientInputs, encode_patient
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.conditions import (
    OFF_REASON,
    ProblemList,
    problem_list_of,
    problem_query,
)
from clinragen_fhir.fhir.errors import FhirError, FhirHTTPError
from clinragen_fhir.fhir.patient_read import PatientRead, read_patient
from clinragen_fhir.knowledge import KnowledgeGraph
from clinragen_fhir.logs import hash_id
from clinragen_fhir.predict.types import (
    Identity,
    Prediction,
    Predictor,
    declared_identity,
    has_inputs,
)
from clinragen_fhir.report import problem_list
from clinragen_fhir.report.audit import attempt_event_id, audit_bundle, audit_event
from clinragen_fhir.report.build import (
    InputRef,
    build_transaction,
    content_fingerprint,
    current_key,
    input_stamp,
    model_of,
    site_organization,
    stored_fingerprint,
)
from clinragen_fhir.report.faithfulness import check_report_rationale, diagnosis_claims
from clinragen_fhir.report.fingerprint import (
    INPUTS_EXT,
    inputs_fingerprint,
    prediction_identity,
    stored_inputs_fingerprint,
)
from clinragen_fhir.report.html import fact_labels
from clinragen_fhir.report.lexicon import LabLexicon
from clinragen_fhir.report.lookup import (
    current_of,
    find_current,
    find_legacy,
    legacy_of,
    our_reports_query,
)

log = logging.getLogger(__name__)


@dataclass
class ReadInputs(PatientInputs):
    """One patient's encoded inputs (`encoding.patient.PatientInputs`) as the worker read them:
    with the version of each input used (the report's Provenance and result) and, for the read
    AuditEvent, the counts read and the searches as sent."""

    used: list[InputRef] = field(default_factory=list)
    n_read: dict[str, int] = field(default_factory=dict)  # resources read, by type (for audit)
    # the searches as sent, (type, parameters): the read AuditEvent's BALP query entities
    queries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Outcome:
    """The result of one diagnose run, as the task returns it (JSON-serialisable)."""

    patient_hash: str
    status: str  # "written" (a new report or a new version) | "exists" (unchanged) | "skipped"
    reason: str = ""
    report_id: str = ""
    identifier: str = ""
    method: str = ""
    diagnoses: list[str] = field(default_factory=list)
    n_labs: int = 0
    n_notes: int = 0
    n_skipped_inputs: int = 0
    model_seconds: float = 0.0
    # the rationale check of a written report: lab claims made / holding, and how many of the
    # concluded diagnoses have a line citing at least one reading
    claims: int = 0
    claims_held: int = 0
    diagnoses_cited: int = 0
    version: str = ""  # the current report's meta.versionId after this run ("" if unknown)
    model: str = ""  # identity.model_identity of what concluded (rule-baseline for the rules)
    superseded: int = 0  # reports of the identifier scheme before the lifecycle, now replaced
    # concluded disorders by known / suspected / not-checked ({} when none): report.problem_list
    problem_list: dict[str, int] = field(default_factory=dict)
    # where this patient's time went, seconds: fhir_read_s (the batch of reads), encode_s,
    # predict_s (a batch's shared out evenly; with the model also featurise_s = retrieval and
    # model inputs, prefix_s, decode_s), write_s (the comparison, rendering and transaction)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gather_inputs(client: FhirClient, kg: KnowledgeGraph, patient_id: str,
                  settings: ReportSettings, now: datetime | None = None) -> ReadInputs:
    """Read the patient, their labs/vitals and notes (every page), and encode them."""
    return _encode(read_patient(client, patient_id, settings.lookback_days,
                                now or datetime.now(UTC)), kg, patient_id, now)


def _encode(read: PatientRead, kg: KnowledgeGraph, patient_id: str,
            now: datetime | None) -> ReadInputs:
    now = now or datetime.now(UTC)
    encoded = encode_patient(read.patient, read.observations, read.documents, kg, now,
                             patient_id=patient_id)
    # the reference the encoders give each input -> its version for the report key
    stamps = {f"{rtype}/{r.get('id', '?')}": input_stamp(r)
              for rtype, found in (("Observation", read.observations),
                                   ("DocumentReference", read.documents))
              for r in found if isinstance(r, dict)}
    labs, notes = encoded.labs, encoded.notes
    used = [InputRef(r, v, stamps.get(r, "")) for r, v in
            labs[["observation_id", "version_id"]].drop_duplicates().itertuples(index=False)]
    used += [InputRef(n.document_id, n.version_id, stamps.get(n.document_id, ""))
             for n in notes]
    return ReadInputs(encoded.patient, labs, notes, encoded.skips, encoded.resource, used,
                      read.counts(), list(read.queries))


def read_for_report(client: FhirClient, kg: KnowledgeGraph, patient_id: str,
                    settings: ReportSettings, now: datetime | None = None,
                    timings: dict[str, float] | None = None,
                    ) -> tuple[ReadInputs, ProblemList, list[dict[str, Any]]]:
    """Everything one run reads, in one batch Bundle (`fhir.patient_read.read_patient`): the
    patient's inputs, encoded; our reports of the patient (`our_reports_query`: the current
    one, whatever method concludes, and reports from before the lifecycle); and, with the
    problem-list check on, the active Conditions, never a model input. Pages beyond each
    search's first are the only other requests."""
    problem_on = problem_list_enabled()
    extra = [("DiagnosticReport", our_reports_query(patient_id, settings.identifier_system))]
    if problem_on:
        extra.append(("Condition", problem_query(patient_id)))
    started = time.perf_counter()
    read = read_patient(client, patient_id, settings.lookback_days, now or datetime.now(UTC),
                        extra)
    encoding = time.perf_counter()
    inputs = _encode(read, kg, patient_id, now)
    if timings is not None:
        timings["fhir_read_s"] = round(encoding - started, 4)
        timings["encode_s"] = round(time.perf_counter() - encoding, 4)
    ours = read.extra[0]
    if isinstance(ours, FhirError):
        raise ours
    problems = ProblemList(False, reason=OFF_REASON)
    if problem_on:
        inputs.queries.append(("Condition", problem_query(patient_id)))
        problems = problem_list_of(read.extra[1], inputs.n_read)
    return inputs, problems, ours


def _versioned(resource: dict[str, Any]) -> str:
    version = str((resource.get("meta") or {}).get("versionId", ""))
    ref = f"DiagnosticReport/{resource.get('id')}"
    return f"{ref}/_history/{version}" if version else ref


LockFn = Callable[[str], AbstractContextManager[object]]


@dataclass
class _Run:
    """One patient of a batch on its way through `diagnose_patients`."""

    patient_id: str
    base: Outcome
    locks: ExitStack
    locked: str = ""  # the report key whose lock is held ("" none)
    inputs: ReadInputs | None = None
    problems: ProblemList | None = None
    ours: list[dict[str, Any]] = field(default_factory=list)
    read_event: dict[str, Any] | None = None
    prediction: Prediction | None = None


def diagnose_patient(client: FhirClient, kg: KnowledgeGraph, predictor: Predictor,
                     patient_id: str, settings: ReportSettings, now: datetime | None = None,
                     lock: LockFn | None = None) -> Outcome:
    """Diagnose one patient and write the report unless the current one says the same.

    One current report per patient and method (`current_key`): when its stored content
    fingerprint equals this run's, nothing is written ("exists"); otherwise the report is
    written as a new version of that resource (conditional update), the older one readable in
    `_history`. Reports of the scheme before the lifecycle are migrated: the newest is adopted
    (updated in place, its old identifier kept) and the others are linked as revised from the
    new version's Provenance; none is duplicated or deleted.

    Before predicting, a predictor that declares its identity (`declared_identity`) has its
    current report looked up: when that report's inputs fingerprint equals this run's
    (`inputs_fingerprint`), the prediction would be the same, so none is made ("exists").

    `lock(current_key)` is held from the read to the write: the server's conditional update is
    not atomic against a concurrent one, and backfill, webhook and CLI runs for one patient can
    overlap (the worker passes a Redis lock). At most 2 FHIR round trips on the normal path:
    one batch of reads (the inputs, our reports of the patient, the problem list), then one
    transaction (the report, its Provenance and the AuditEvents, or the read AuditEvent alone
    when nothing is written); `diagnose_patients` is the same for a batch of patients.
    """
    [result] = diagnose_patients(client, kg, predictor, [patient_id], settings, now, lock)
    if isinstance(result, BaseException):
        raise result
    return result


def diagnose_patients(client: FhirClient, kg: KnowledgeGraph, predictor: Predictor,
                      patient_ids: list[str], settings: ReportSettings,
                      now: datetime | None = None, lock: LockFn | None = None,
                      errors: tuple[type[Exception], ...] = ()) -> list[Outcome | Exception]:
    """`diagnose_patient` for each of `patient_ids`, the predictions made together
    (`predict_batch` where the predictor has it): one outcome per patient, in order, or the
    error that patient's run ended with (a FhirError, or one of `errors` raised by `lock`, e.g.
    the worker's ReportLocked); one patient's error does not stop the others. Anything else
    (a bug, a time limit) is raised. Each patient's `timings` say where its time went."""
    now = now or datetime.now(UTC)
    caught: tuple[type[Exception], ...] = (FhirError, *errors)
    declared = declared_identity(predictor)
    results: list[Outcome | Exception | None] = [None] * len(patient_ids)
    runs: list[tuple[int, _Run]] = []
    try:
        for i, patient_id in enumerate(patient_ids):
            run = _Run(patient_id, Outcome(hash_id(patient_id), "skipped"), ExitStack())
            runs.append((i, run))
            try:
                results[i] = _read(client, kg, run, settings, now, declared, lock)
            except caught as exc:
                results[i] = exc
            if results[i] is not None:  # done here: the lock is not held through the batch
                run.locks.close()
        todo = [(i, run) for i, run in runs if results[i] is None]
        _predict(predictor, [run for _, run in todo], client, settings)
        for i, run in todo:
            try:
                results[i] = _write(client, kg, run, settings, now, lock)
            except caught as exc:
                results[i] = exc
            finally:
                run.locks.close()
    finally:
        for _, run in runs:
            run.locks.close()
    return [r for r in results if r is not None]


def _read(client: FhirClient, kg: KnowledgeGraph, run: _Run, settings: ReportSettings,
          now: datetime, declared: Identity | None, lock: LockFn | None) -> Outcome | None:
    """Lock, read and encode one patient; the outcome when the run ends here (no inputs, or
    the current report was predicted from these very inputs), None when it goes on to predict.
    """
    patient_id, base = run.patient_id, run.base
    system = settings.identifier_system
    if declared is not None:  # the key is known before predicting: locked from the read on
        run.locked = current_key(patient_id, declared[0])
        run.locks.enter_context((lock or _no_lock)(run.locked))
    try:
        inputs, problems, ours = read_for_report(client, kg, patient_id, settings, now,
                                                 base.timings)
    except FhirHTTPError as exc:
        _audit_failure(client, settings, patient_id, "R", READ_INTERACTIONS, exc)
        raise
    run.inputs, run.problems, run.ours = inputs, problems, ours
    base.n_labs, base.n_notes, base.n_skipped_inputs = (len(inputs.labs), len(inputs.notes),
                                                        len(inputs.skips))
    run.read_event = audit_event(
        "R", patient_id, interactions=READ_INTERACTIONS,
        details={**{f"{k} read": v for k, v in inputs.n_read.items()},
                 "inputs used": len(inputs.used), "inputs skipped": len(inputs.skips)},
        organization=site_organization(settings), server=client.base_url,
        queries=inputs.queries) if settings.audit_events else None
    if not has_inputs(inputs.labs, inputs.notes):
        base.reason = "no usable labs or notes"
        log.info("patient skipped", extra={"fields": {"patient": base.patient_hash,
                                                       "reason": base.reason,
                                                       "skipped_inputs": len(inputs.skips)}})
        _audit_read_only(client, run, base)
        return base
    # a report written from these very inputs by this very model (a redelivered task, an
    # unchanged re-run) needs no generation
    if declared is not None and not problems.checked:
        key = current_key(patient_id, declared[0])
        current = current_of(ours, system, key)
        if current is not None and stored_inputs_fingerprint(current) == inputs_fingerprint(
                inputs, declared) and stored_fingerprint(current):
            _audit_read_only(client, run, base)
            return _exists(base, current, key, declared)
    return None


def _predict(predictor: Predictor, runs: list[_Run], client: FhirClient,
             settings: ReportSettings) -> None:
    """One prediction per run, in one `predict_batch` where the predictor has one; the time is
    shared out evenly, with the stages the predictor reports (`stage_seconds`)."""
    if not runs:
        return
    items = [(r.inputs.labs, r.inputs.notes, r.inputs.patient) for r in runs if r.inputs]
    started = time.perf_counter()
    try:
        batch = getattr(predictor, "predict_batch", None)
        predictions = batch(items) if callable(batch) and len(items) > 1 else \
            [predictor.predict(*item) for item in items]
    except BaseException:  # the reads happened: record them, best effort, then fail the task
        for r in runs:
            _audit_read_only(client, r, r.base, best_effort=True)
        raise
    share = (time.perf_counter() - started) / len(runs)
    stages = getattr(predictor, "stage_seconds", None)
    stages = dict(stages) if isinstance(stages, dict) else {}
    for r, prediction in zip(runs, predictions, strict=True):
        r.prediction = prediction
        r.base.model_seconds = share
        r.base.timings["predict_s"] = round(share, 4)
        for stage, seconds in stages.items():
            r.base.timings[stage] = round(seconds / len(runs), 4)


def _write(client: FhirClient, kg: KnowledgeGraph, run: _Run, settings: ReportSettings,
           now: datetime, lock: LockFn | None) -> Outcome:
    """Compare with the current report and write the new version, the Provenance and the
    AuditEvents in one transaction; or, unchanged, the read AuditEvent alone."""
    assert run.inputs is not None and run.problems is not None and run.prediction is not None
    patient_id, base, inputs = run.patient_id, run.base, run.inputs
    system = settings.identifier_system
    prediction = problem_list.compare(run.prediction, run.problems, kg)  # known / suspected
    base.problem_list = problem_list.counts(prediction)
    key = current_key(patient_id, prediction.method)
    fingerprint = content_fingerprint(prediction)
    base.identifier, base.method = key, prediction.method
    base.model = model_of(prediction)
    base.diagnoses = [d.snomed for d in prediction.diagnoses]
    started = time.perf_counter()
    if key != run.locked:  # not the key declared (a fallback, or none declared): lock it now
        # and read the current report again under it (the only extra request, off the normal
        # path: unlocked, two runs could both find none and both write)
        run.locks.enter_context((lock or _no_lock)(key))
        current = find_current(client, patient_id, system, key)
        legacy = [] if current is not None else find_legacy(client, patient_id, system,
                                                            prediction.method)
    else:
        current = current_of(run.ours, system, key)
        legacy = [] if current is not None else legacy_of(run.ours, system, prediction.method)
    if current is not None and stored_fingerprint(current) == fingerprint:
        _audit_read_only(client, run, base)
        base.timings["write_s"] = round(time.perf_counter() - started, 4)
        return _exists(base, current, key)
    adopted = legacy[0] if legacy else None
    revises = [_versioned(r) for r in ([current] if current is not None else legacy)]
    base.superseded = len(legacy)
    # only now the rationale check and the rendering: a report that exists needs neither
    latest = [t for t in [inputs.labs["time"].max() if not inputs.labs.empty else None,
                          *(n.time for n in inputs.notes)] if t is not None]
    effective = max(pd.Timestamp(t) for t in latest).to_pydatetime() if latest else now
    lexicon = LabLexicon.build(kg, [inputs.labs] if len(inputs.labs) else [])
    claims = check_report_rationale(prediction.rationale, inputs.labs, kg, lexicon)
    base.claims, base.claims_held = len(claims), sum(c.matched for c in claims)
    base.diagnoses_cited = sum(dc.cited for dc in diagnosis_claims(
        prediction.rationale, [d.term for d in prediction.diagnoses], inputs.labs, lexicon))
    bundle, _ = build_transaction(patient_id, prediction, inputs.used, inputs.skips,
                                  settings, now=now, effective=effective, labs=inputs.labs,
                                  claims=claims, patient=inputs.resource,
                                  fact_labels=fact_labels(kg, prediction, inputs.labs),
                                  report_id=str(adopted["id"]) if adopted else None,
                                  revises=revises,
                                  keep_identifiers=adopted.get("identifier", []) or []
                                  if adopted else ())
    if not run.problems.checked:  # what the next run compares before predicting
        _report_of(bundle)["extension"].append({"url": INPUTS_EXT, "valueString": (
            inputs_fingerprint(inputs, prediction_identity(prediction)))})
    carried = run.read_event  # the read event goes with the report (None: audit off)
    if settings.audit_events:  # in the same transaction: no report without its audit record
        written = {"type": "DiagnosticReport",
                   "identifier": {"system": settings.identifier_system, "value": key}}
        created = current is None and adopted is None
        event = audit_event("C" if created else "U", patient_id,
                            interactions=["transaction", "create" if created else "update"],
                            written=written, details={"inputs cited": len(inputs.used),
                                                      "model": base.model,
                                                      "content": fingerprint},
                            organization=site_organization(settings),
                            server=client.base_url)
        # PUT by an id of this attempt (report key + this event's time): a retry of this
        # very transaction after the server committed it writes no second event; a later
        # write of the same report (deleted in between) is a new attempt with its own event.
        # The read event goes in the same transaction, PUT by an id of its own likewise.
        events, ids = [event], [attempt_event_id("write", system, key, fingerprint,
                                                 str(event["recorded"]))]
        if run.read_event is not None:
            events.insert(0, run.read_event)
            ids.insert(0, attempt_event_id("read", system, key, fingerprint,
                                           str(run.read_event["recorded"])))
            run.read_event = None
        bundle["entry"] += audit_bundle(events, ids=ids)["entry"]
    try:
        response = client.transaction(bundle)
    except FhirHTTPError as exc:
        _audit_failure(client, settings, patient_id, "C", ["transaction", "create"], exc,
                       read=carried)
        raise
    base.timings["write_s"] = round(time.perf_counter() - started, 4)
    report_id, version = _written(response, "DiagnosticReport")
    base.status, base.report_id, base.version = "written", report_id, version
    log.info("report written", extra={"fields": {
        "patient": base.patient_hash, "report": report_id, "version": version,
        "superseded": base.superseded, "method": prediction.method,
        "diagnoses": base.diagnoses, "labs": base.n_labs, "notes": base.n_notes,
        "skipped_inputs": base.n_skipped_inputs}})
    return base


def _audit_read_only(client: FhirClient, run: _Run, base: Outcome,
                     best_effort: bool = False) -> None:
    """The read AuditEvent in a transaction of its own, when no report transaction carries it
    (nothing written: skipped, unchanged)."""
    if run.read_event is None:
        return
    event, run.read_event = run.read_event, None
    started = time.perf_counter()
    try:
        client.transaction(audit_bundle([event]))
    except FhirError as exc:
        if not best_effort:
            raise
        log.warning("audit event not written", extra={"fields": {
            "patient": base.patient_hash, "error": type(exc).__name__}})
    base.timings["write_s"] = round(time.perf_counter() - started, 4)


READ_INTERACTIONS = ["read", "search-type"]


def _report_of(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"]
                if e["resource"]["resourceType"] == "DiagnosticReport")


def _exists(base: Outcome, current: dict[str, Any], key: str,
            declared: Identity | None = None) -> Outcome:
    """The outcome of a run whose current report already says it (`declared`: known before
    predicting, so the method, model and diagnoses are the stored report's)."""
    base.status, base.report_id = "exists", str(current.get("id"))
    base.version = str((current.get("meta") or {}).get("versionId", ""))
    if declared is not None:
        base.identifier, base.method, base.model = key, declared[0], declared[3]
        base.diagnoses = [str(c.get("code", "")) for cc in current.get("conclusionCode", []) or []
                          for c in (cc.get("coding") or [])[:1]]
    log.info("report exists", extra={"fields": {"patient": base.patient_hash,
                                                 "report": base.report_id,
                                                 "predicted": declared is None}})
    return base


def _no_lock(key: str) -> AbstractContextManager[object]:
    return nullcontext()


def _audit_failure(client: FhirClient, settings: ReportSettings, patient_id: str, action: str,
                   interactions: list[str], error: FhirHTTPError,
                   read: dict[str, Any] | None = None) -> None:
    """Best effort: record a refused read or write (with `read`, the read event the refused
    write transaction carried); the original error is what the task raises."""
    if not settings.audit_events:
        return
    failed = audit_event(action, patient_id, interactions=interactions, error=error,
                         organization=site_organization(settings), server=client.base_url)
    try:
        if read is not None and read.get("id"):  # PUT by its id: the refused write may have
            # been committed with it after all (an answer lost), and then it is there once
            client.transaction(audit_bundle([read, failed], ids=[
                str(read["id"]), attempt_event_id("failed", str(read["id"]))]))
        else:
            client.transaction(audit_bundle([failed]))
    except FhirError as exc:
        log.warning("audit event not written", extra={"fields": {
            "patient": hash_id(patient_id), "error": type(exc).__name__}})


def _created_id(response: dict[str, Any], resource_type: str) -> str:
    """The id from a transaction-response entry's location (`Type/id/_history/n`)."""
    return _written(response, resource_type)[0]


def _written(response: dict[str, Any], resource_type: str) -> tuple[str, str]:
    """The id and version from a transaction-response entry's location
    (`[base/]Type/id/_history/n`; the version is "" where the server names none)."""
    for entry in response.get("entry", []) or []:
        location = str((entry.get("response") or {}).get("location", ""))
        parts = location.split("/")
        if resource_type in parts:
            i = parts.index(resource_type)
            if i + 1 < len(parts):
                version = parts[i + 3] if len(parts) > i + 3 and parts[i + 2] == "_history" \
                    else ""
                return parts[i + 1], version
    raise FhirError(f"transaction response names no {resource_type}")
