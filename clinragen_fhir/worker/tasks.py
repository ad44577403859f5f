"""Celery tasks. Each is idempotent: running one twice writes at most one report.

Over 400 lines because every task registered on the Celery app is here with the one
dead-lettering base class and delivery count they share (diagnose, diagnose_batch, poll).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache, partial
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown

from clinragen_fhir import logs, metrics
from clinragen_fhir.config import Settings, WorkerSettings
from clinragen_fhir.fhir.errors import FhirError, is_retryable
from clinragen_fhir.inference.fallback import build_predictor
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.pipeline import diagnose_patient, diagnose_patients
from clinragen_fhir.predict.types import Predictor
from clinragen_fhir.retry import RetryPolicy
from clinragen_fhir.worker.app import app, task_reprs
from clinragen_fhir.worker.state import CLAIM_TTL_S, RedisSeen, ReportLocked, WorkerState

log = logging.getLogger(__name__)


@cache
def load_runtime() -> tuple[Settings, KnowledgeGraph, Predictor]:
    """Settings, graph and predictor, loaded once per worker process."""
    settings = Settings()
    settings.check_site_secrets()
    logs.configure(settings.log_level)
    kg = load_graph(settings.knowledge_path)
    return settings, kg, build_predictor(settings.model_dir, kg, settings.inference)


def retry_policy(worker: WorkerSettings) -> RetryPolicy:
    """The task's layer of the retry policy (clinragen_fhir/retry.py): `max_retries` + 1 runs
    of one patient, for what the FHIR client gave up on (a retryable FhirError: the error says
    so) and a report lock held by another run; each retry is a new message, `countdown` the
    policy's wait (`retry_backoff_s` doubling to `retry_backoff_max_s`, Retry-After a floor)."""
    return RetryPolicy(attempts=worker.max_retries + 1, backoff_s=worker.retry_backoff_s,
                       max_backoff_s=worker.retry_backoff_max_s,
                       retry_on=lambda exc: isinstance(exc, ReportLocked) or is_retryable(exc))


class DeliveryLimitExceeded(Exception):
    """The message was started `max_deliveries` times and never finished: its worker died each
    time (out of memory, killed), so one more run would most likely kill one more worker."""


def _delivery_ttl_s(settings: Settings) -> int:
    """Redis hands a dead worker's task back after the visibility timeout: a count outlives
    two of those (and a day at least), so consecutive deliveries always add up."""
    return max(24 * 3600, 2 * settings.worker.visibility_timeout_s)


class DeadLetteringTask(Task):  # type: ignore[misc]
    """A task whose final failure (retries spent, a permanent error, or a worker that died on
    every delivery) is dead-lettered.

    Deliveries are counted because `task_reject_on_worker_lost` requeues the task of a worker
    that died, with no limit: one record that runs a worker out of memory came back forever,
    killing a worker each time. Celery's own `task_retry_on_worker_lost` (5.7+; the pin allows
    5.4) bounds only pool-child losses, not a whole worker lost."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Count this start; past `max_deliveries` the task fails here, before it runs."""
        settings = load_runtime()[0]
        limit = settings.worker.max_deliveries
        try:
            n = WorkerState(settings.state_url).count_delivery(
                task_id, self.request.retries, _delivery_ttl_s(settings))
        except Exception:  # the state store is down: run it uncounted, as before counting
            log.warning("delivery not counted", extra={"fields": {"task": self.name}})
            return
        self.request.delivery = n  # the task body reads it (diagnose_batch splits a redelivery)
        if n > limit and not self._splits(args):
            raise DeliveryLimitExceeded(
                f"delivered {n} times without finishing (max_deliveries = {limit}): its worker "
                "died on every run (out of memory, or killed); dead-lettered, not run again")
        if n > 1:
            log.warning("task redelivered", extra={"fields": {"task": self.name, "delivery": n}})

    def _splits(self, args: Any) -> bool:
        """Whether this message, redelivered, is split rather than run (`diagnose_batch`)."""
        return False

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                 einfo: Any) -> None:
        self._forget_delivery(task_id)  # the retry is a new message, counted afresh

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any,
                     einfo: Any) -> None:
        self._forget_delivery(task_id)

    def _forget_delivery(self, task_id: str) -> None:
        """The run finished (no worker died): drop its count; if this fails, the TTL does."""
        try:
            WorkerState(load_runtime()[0].state_url).forget_delivery(task_id, self.request.retries)
        except Exception:
            log.warning("delivery count not dropped", extra={"fields": {"task": self.name}})

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        settings = load_runtime()[0]
        metrics.DEAD_LETTERS.labels(self.name).inc()  # the ClinragenDeadLetters alert
        # our own texts name no patient or secret; any other error goes by its type only
        error = f"{type(exc).__name__}: {exc}" if isinstance(
            exc, DeliveryLimitExceeded | ReportLocked) else logs.error_text(exc)
        try:
            letter = WorkerState(settings.state_url).dead_letter(
                self.name, list(args), error, self.request.retries)
            log.error("task dead-lettered", extra={"fields": {
                "task": self.name, "dead_letter": letter.id, "error": type(exc).__name__}})
        except Exception:  # the state store is down too: the failure is still in the logs
            log.exception("could not dead-letter task", extra={"fields": {"task": self.name}})


LOCK_WAIT_S = 10.0  # a write (look-up, rendering, transaction) takes seconds, not more


@contextmanager
def report_lock(state: WorkerState, owner: str, settings: Settings, phash: str,
                 key: str) -> Iterator[None]:
    """Hold the report key's lock (in Redis) while the report is looked up and written.

    The TTL is above the hard time limit, so a live holder never loses it; `owner` is the task
    id, so the same task redelivered after its worker died takes its own stale lock back. Held
    by another run for `LOCK_WAIT_S` (a tenth of the soft limit at most): ReportLocked, and the
    task retries later. The state store down: written unlocked (HAPI refuses the second of two
    concurrent conditional updates that would both create, 409, and the retry updates the
    first's report: no duplicate there), since refusing would lose the report with no dead
    letter either."""
    w = settings.worker
    try:
        held: bool | None = state.acquire_report(key, owner, w.time_limit_s + 60,
                                                 min(LOCK_WAIT_S, w.soft_time_limit_s / 10))
    except Exception:
        held = None
        log.warning("report lock unavailable: writing unlocked",
                    extra={"fields": {"patient": phash}})
    if held is False:
        raise ReportLocked(f"another run is writing report {key[:12]}; retry later")
    try:
        yield
    finally:
        if held:
            try:
                if not state.release_report(key, owner):
                    log.warning("report lock had expired", extra={"fields": {"patient": phash}})
            except Exception:  # it expires with its TTL
                log.warning("report lock not released", extra={"fields": {"patient": phash}})


@app.task(bind=True, base=DeadLetteringTask, name="clinragen.diagnose")
def diagnose(self: Task, patient_id: str, backfill: str | None = None) -> dict[str, Any]:
    """Diagnose one patient and write its report; retry transient FHIR failures (`retry_policy`).

    `backfill`: the `diagnose-all` run this task belongs to; the patient is checkpointed as done
    there once the outcome is final, so a re-run of that backfill skips it.
    """
    settings, kg, predictor = load_runtime()
    phash = logs.hash_id(patient_id)
    started = time.perf_counter()
    outcome_label = "failed"
    state = WorkerState(settings.state_url)
    lock = partial(report_lock, state, self.request.id or uuid.uuid4().hex, settings, phash)
    try:
        with settings.fhir.client(observer=metrics.observe_fhir) as client:
            outcome = diagnose_patient(client, kg, predictor, patient_id, settings.report,
                                       lock=lock)
        outcome_label = outcome.status
        if backfill:
            try:
                state.mark_done(backfill, patient_id)
            except Exception:  # the report is written; a lost checkpoint only means a re-check
                log.warning("backfill checkpoint not saved", extra={"fields": {"patient": phash}})
        metrics.MODEL_SECONDS.labels(outcome.method or "none").observe(outcome.model_seconds)
    except (FhirError, ReportLocked) as exc:  # ReportLocked: another run writes this report
        policy = retry_policy(settings.worker)
        wait = policy.next_wait(self.request.retries + 1, exc)
        if wait is not None:
            log.warning("diagnose retry", extra={"fields": {
                "patient": phash, "retry": self.request.retries + 1, "delay_s": round(wait, 1),
                "error": type(exc).__name__}})
            outcome_label = "retry"
            # max_retries: Celery's own default (3) would otherwise end the task before the
            # policy does; Celery's retry drops argsrepr, hence task_reprs
            raise self.retry(exc=exc, countdown=wait, max_retries=policy.attempts - 1,
                             **task_reprs(self.request.args or (), self.request.kwargs)) from exc
        log.error("diagnose failed", extra={"fields": {"patient": phash,
                                                        "error": logs.error_text(exc)}})
        raise
    except SoftTimeLimitExceeded:
        outcome_label = "timeout"
        log.error("diagnose timed out", extra={"fields": {"patient": phash}})
        raise
    finally:
        metrics.TASKS.labels(outcome_label).inc()
        metrics.TASK_SECONDS.observe(time.perf_counter() - started)
    return outcome.as_dict()


class BatchTask(DeadLetteringTask):
    """`diagnose_batch`: a batch message redelivered (its worker died during it) is split into
    one `diagnose` task per patient instead of being run again, so a patient that kills its
    worker is dead-lettered alone after `max_deliveries` and the others are done once; a final
    failure of the whole message dead-letters each patient as a `diagnose` task of its own (what
    `dlq requeue` sends again, and what the reliability checks count)."""

    def _splits(self, args: Any) -> bool:
        return bool(args) and len(args[0]) > 1

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        ids = list(args[0]) if args else []
        for pid in ids:
            _dead_letter(DIAGNOSE, pid, exc, self.request.retries)


DIAGNOSE = "clinragen.diagnose"


def _dead_letter(task: str, patient_id: str, exc: BaseException, retries: int) -> None:
    """One patient's final failure in the dead-letter queue, as a `diagnose` task's would be."""
    settings = load_runtime()[0]
    metrics.DEAD_LETTERS.labels(task).inc()
    error = f"{type(exc).__name__}: {exc}" if isinstance(
        exc, DeliveryLimitExceeded | ReportLocked) else logs.error_text(exc)
    try:
        letter = WorkerState(settings.state_url).dead_letter(task, [patient_id], error, retries)
        log.error("task dead-lettered", extra={"fields": {
            "task": task, "dead_letter": letter.id, "error": type(exc).__name__,
            "patient": logs.hash_id(patient_id)}})
    except Exception:
        log.exception("could not dead-letter task", extra={"fields": {"task": task}})


def _queue_singles(patient_ids: list[str], backfill: str | None, why: str) -> None:
    """One `diagnose` task per patient (published before this message is acknowledged: a
    worker lost in between redelivers the batch, which queues them again; a second run of a
    patient finds its report)."""
    kwargs = {"backfill": backfill} if backfill else {}
    for pid in patient_ids:
        diagnose.apply_async((pid,), kwargs, **task_reprs((pid,), kwargs))
    log.warning("batch split", extra={"fields": {"patients": len(patient_ids), "why": why}})


@app.task(bind=True, base=BatchTask, name="clinragen.diagnose_batch")
def diagnose_batch(self: Task, patient_ids: list[str],
                   backfill: str | None = None) -> dict[str, Any]:
    """Diagnose a batch of patients in one task: each read in its own batch of reads, the
    predictions made together (`predict_batch`: the model runs `inference.batch_size` patients
    per graph call), each report written in its own transaction (`pipeline.diagnose_patients`).

    Per patient as `diagnose` is: the same report lock, idempotent writes, the backfill
    checkpoint. A patient whose run failed transiently goes on, with the others that did, in one
    new batch message after the retry policy's countdown (its `retries` one up, so the policy's
    bound holds per patient); a final error, or retries spent, dead-letters that patient alone
    as a `diagnose` task. A redelivered batch is split into single tasks (BatchTask); so is one
    that ran out of time or failed unexpectedly (each patient then succeeds or fails alone).
    """
    settings, kg, predictor = load_runtime()
    ids = [str(p) for p in patient_ids]
    if len(ids) > 1 and getattr(self.request, "delivery", 1) > 1:
        _queue_singles(ids, backfill, "redelivered: its worker died during it")
        return {"outcomes": [], "split": len(ids)}
    started = time.perf_counter()
    state = WorkerState(settings.state_url)
    owner = self.request.id or uuid.uuid4().hex

    def lock(key: str) -> Any:
        return report_lock(state, owner, settings, key.rsplit(":", 1)[-1][:12], key)

    try:
        with settings.fhir.client(observer=metrics.observe_fhir) as client:
            results = diagnose_patients(client, kg, predictor, ids, settings.report, lock=lock,
                                        errors=(ReportLocked,))
    except SoftTimeLimitExceeded:
        metrics.TASKS.labels("timeout").inc()
        _queue_singles(ids, backfill, "out of time")
        return {"outcomes": [], "split": len(ids)}
    except Exception as exc:  # a bug in one patient's run: each alone, the failing one lettered
        log.error("batch failed", extra={"fields": {"error": type(exc).__name__}})
        _queue_singles(ids, backfill, f"failed: {type(exc).__name__}")
        return {"outcomes": [], "split": len(ids)}
    policy = retry_policy(settings.worker)
    outcomes: list[dict[str, Any]] = []
    retry: list[str] = []
    waits: list[float] = []
    for pid, result in zip(ids, results, strict=True):
        if isinstance(result, Exception):
            wait = policy.next_wait(self.request.retries + 1, result)
            if wait is not None:
                retry.append(pid)
                waits.append(wait)
                metrics.TASKS.labels("retry").inc()
            else:
                metrics.TASKS.labels("failed").inc()
                log.error("diagnose failed", extra={"fields": {
                    "patient": logs.hash_id(pid), "error": logs.error_text(result)}})
                _dead_letter(DIAGNOSE, pid, result, self.request.retries)
            continue
        metrics.TASKS.labels(result.status).inc()
        metrics.MODEL_SECONDS.labels(result.method or "none").observe(result.model_seconds)
        if backfill:
            try:
                state.mark_done(backfill, pid)
            except Exception:
                log.warning("backfill checkpoint not saved",
                            extra={"fields": {"patient": logs.hash_id(pid)}})
        outcomes.append(result.as_dict())
    if retry:
        countdown = max(waits)
        kwargs = {"backfill": backfill} if backfill else {}
        diagnose_batch.apply_async((retry,), kwargs, countdown=countdown,
                                   retries=self.request.retries + 1,
                                   **task_reprs((retry,), kwargs))
        log.warning("diagnose retry", extra={"fields": {
            "patients": len(retry), "retry": self.request.retries + 1,
            "delay_s": round(countdown, 1)}})
    metrics.TASK_SECONDS.observe(time.perf_counter() - started)
    return {"outcomes": outcomes, "retried": len(retry),
            "failed": len(ids) - len(outcomes) - len(retry)}


@worker_process_shutdown.connect
def _mark_dead(pid: int | None = None, **_: Any) -> None:
    """Multiprocess metrics: drop a dead child's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


POLLED: tuple[tuple[str, dict[str, str]], ...] = (
    ("Observation", {"category": "laboratory,vital-signs"}), ("DocumentReference", {}))


class PollIncomplete(Exception):
    """A publish failed while polling: the patients not queued keep no key and the cursor
    stays, so the next poll finds the same changes and queues them."""


def _queue_changed(seen: RedisSeen, patients: list[str], debounce_s: int) -> int:
    """Claim, queue, then keep each patient's de-duplication key (as the webhook does): a key
    is final only once its task is on the queue. A patient claimed "pending" is being queued
    by another caller (the webhook) right now, and one kept ("done") has a task queued already.

    A publish failure gives that patient's claim back and raises PollIncomplete (without the
    broker's error text, which can name its host), before the cursor is saved."""
    queued = 0
    for n, pid in enumerate(patients):
        key = f"patient:{pid}"
        if seen.claim(key, CLAIM_TTL_S) != "new":
            continue
        try:
            diagnose.apply_async((pid,), countdown=debounce_s, **task_reprs((pid,)))
        except Exception as exc:
            try:
                seen.release(key)
            except Exception:  # the store is down too: the claim expires by itself
                log.warning("poll could not release a claim",
                            extra={"fields": {"expires_in_s": CLAIM_TTL_S}})
            log.error("poll could not queue", extra={"fields": {
                "error": type(exc).__name__, "queued": queued,
                "not_queued": len(patients) - n}})
            raise PollIncomplete(
                f"queue unavailable ({type(exc).__name__}): {queued} patients queued, "
                f"{len(patients) - n} left for the next poll") from None
        queued += 1
        try:
            seen.keep(key, debounce_s)
        except Exception as exc:  # queued already: the pending claim expires by itself
            log.warning("poll could not keep a patient key", extra={"fields": {
                "error": type(exc).__name__}})
    return queued


def _moment(instant: str) -> datetime:
    """A FHIR instant (`Z` or an offset; a date alone is midnight UTC) as an aware datetime."""
    moment = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _earliest(*instants: str | None) -> str:
    """The earliest of these FHIR instants (None and unreadable ones left out)."""
    readable = []
    for instant in instants:
        if not instant:
            continue
        try:
            readable.append((_moment(instant), instant))
        except ValueError:
            log.warning("poll ignored an unreadable instant")
    return min(readable)[1]


@app.task(name="clinragen.poll")
def poll_changes(initial_lookback_days: int = 1, debounce_s: int = 30,
                 since: str | None = None) -> dict[str, Any]:
    """Enqueue `diagnose` for patients whose labs or notes changed since the stored cursor.

    The cursor is the newest `meta.lastUpdated` seen, with the ids seen at exactly that instant
    (searched with `ge`, so a resource committed in the same millisecond is not missed). It is
    saved only once every changed patient is queued (or debounced): see `_queue_changed`.

    Missed events (issue 14, item 6): `since` (the webhook's last event before a gap in a
    subscription's event numbers) starts this poll earlier than the cursor, when it is earlier.
    With no cursor yet, the poll starts at the webhook's last seen notification if that is
    earlier than `initial_lookback_days`, so a poll after an outage resumes from the last event
    seen and nothing in between is missed.
    """
    settings = load_runtime()[0]
    state = WorkerState(settings.state_url)
    seen = RedisSeen(settings.state_url)
    stored = state.cursor(settings.fhir.base_url)
    cursor: dict[str, Any] = json.loads(stored) if stored else {
        "since": (datetime.now(UTC) - timedelta(days=initial_lookback_days))
        .strftime("%Y-%m-%dT%H:%M:%SZ"),
        "boundary": []}
    newest, boundary = cursor["since"], set(cursor["boundary"])
    start = cursor["since"]
    try:
        last_seen = None if stored else seen.last_seen()
    except Exception:  # the store answered the cursor: a blip here only costs the hint
        last_seen = None
    if since or last_seen:
        start = _earliest(start, since, last_seen)
    patients: set[str] = set()
    with settings.fhir.client() as client:
        for rtype, params in POLLED:
            for r in client.search(rtype, {**params, "_lastUpdated": f"ge{start}",
                                           "_sort": "_lastUpdated"}):
                key = f"{rtype}/{r.get('id')}/{(r.get('meta') or {}).get('versionId')}"
                updated = str((r.get("meta") or {}).get("lastUpdated", ""))
                if key in cursor["boundary"]:
                    continue
                ref = str((r.get("subject") or {}).get("reference", ""))
                if ref.startswith("Patient/"):
                    patients.add(ref.split("/")[1])
                if updated > newest:
                    newest, boundary = updated, {key}
                elif updated == newest:
                    boundary.add(key)
    queued = _queue_changed(seen, sorted(patients), debounce_s)
    state.set_cursor(settings.fhir.base_url,
                     json.dumps({"since": newest, "boundary": sorted(boundary)}))
    log.info("poll", extra={"fields": {"changed_patients": len(patients), "queued": queued}})
    return {"changed_patients": len(patients), "queued": queued, "cursor": newest,
            "from": start}
