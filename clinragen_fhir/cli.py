"""`clinragen-fhir`: load data, run the worker, diagnose, list reports, check the config."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import click
from tqdm import tqdm

from clinragen_fhir import logs
from clinragen_fhir.config import FhirEndpoint, Settings
from clinragen_fhir.fhir.errors import FhirError
from clinragen_fhir.fhir.keys_cli import keys
from clinragen_fhir.fhir.resources import SNOMED
from clinragen_fhir.identity import RULE_BASELINE, model_identity
from clinragen_fhir.knowledge.cli import knowledge


def _settings() -> Settings:
    settings = Settings()
    settings.check_site_secrets()
    logs.configure(settings.log_level)
    return settings


@click.group()
@click.version_option(package_name="clinragen-fhir")
def main() -> None:
    """ClinRaGen-FHIR: knowledge-grounded diagnoses with rationales, written back to FHIR."""


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--workers", default=2, show_default=True, help="Bundles sent in parallel.")
@click.option("--types", default="", help="Only these resource types (comma-separated).")
def load(paths: tuple[Path, ...], workers: int, types: str) -> None:
    """Load transaction Bundles (.json, .json.gz) and Bulk Data NDJSON folders, idempotently."""
    from clinragen_fhir.fhir.loader import load as load_paths

    settings = _settings()
    keep = {t.strip() for t in types.split(",") if t.strip()} or None
    started = time.monotonic()
    with settings.fhir.client() as client:
        client.retries = max(client.retries, 3)
        report = load_paths(client, paths, workers=workers, keep_types=keep)
    elapsed = time.monotonic() - started
    click.echo(f"\nloaded {report.files} files in {elapsed:.0f} s")
    for rtype, n in sorted(report.counts.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {rtype:<28} {n:>8}")
    if report.stripped:
        click.echo(f"  ({report.stripped} references to resources of types not loaded "
                   "removed)")
    for name, error in report.errors:
        click.echo(f"ERROR {name}: {error}", err=True)
    if report.errors:
        raise SystemExit(1)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a Celery worker (extra arguments go to `celery worker`)."""
    settings = _settings()
    if settings.worker.metrics_port:
        # Before prometheus_client is first imported, so every child writes shared files.
        import os
        import tempfile

        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR",
                              tempfile.mkdtemp(prefix="clinragen-metrics-"))
        from clinragen_fhir import metrics

        metrics.serve(settings.worker.metrics_port, settings.broker_url, "clinragen",
                      host=settings.worker.metrics_host)
    from clinragen_fhir.worker.app import app

    app.worker_main(["worker", "--loglevel", settings.log_level, "-Q", "clinragen",
                     "--concurrency", str(settings.worker.concurrency), *ctx.args])


def _run_local(patient_id: str) -> dict[str, Any]:
    """Diagnose in this process, holding the worker's per-report lock (Redis, `state_url`), so
    a CLI run and a worker task for one patient write one report (version) even on a server
    whose conditional update is not atomic. Held by another run: ReportLocked. State store down:
    written unlocked, as the worker does."""
    import uuid
    from functools import partial

    from clinragen_fhir.pipeline import diagnose_patient
    from clinragen_fhir.worker.state import WorkerState
    from clinragen_fhir.worker.tasks import _report_lock, _runtime

    settings, kg, predictor = _runtime()
    lock = partial(_report_lock, WorkerState(settings.state_url), f"cli-{uuid.uuid4().hex}",
                   settings, logs.hash_id(patient_id))
    with settings.fhir.client() as client:
        return diagnose_patient(client, kg, predictor, patient_id, settings.report,
                                lock=lock).as_dict()


@main.command()
@click.argument("patient_id")
@click.option("--wait", is_flag=True, help="Wait for the worker's result and print it.")
@click.option("--local", is_flag=True, help="Run in this process instead of the queue.")
@click.option("--timeout", default=600, show_default=True, help="Seconds to wait.")
def diagnose(patient_id: str, wait: bool, local: bool, timeout: int) -> None:
    """Diagnose one patient (queued for the worker unless --local)."""
    _settings()
    if local:
        from clinragen_fhir.worker.state import ReportLocked

        try:
            click.echo(json.dumps(_run_local(patient_id), indent=2))
        except (FhirError, ReportLocked) as exc:
            click.echo(f"FAILED: {type(exc).__name__}: {exc}", err=True)
            raise SystemExit(1) from exc
        return
    from clinragen_fhir.worker.app import task_reprs
    from clinragen_fhir.worker.tasks import diagnose as task

    result = task.apply_async((patient_id,), **task_reprs((patient_id,)))
    click.echo(f"queued task {result.id}")
    if wait:
        try:
            click.echo(json.dumps(result.get(timeout=timeout), indent=2))
        except Exception as exc:  # the task's own error, re-raised by Celery
            click.echo(f"FAILED: {type(exc).__name__}: {exc}", err=True)
            raise SystemExit(1) from exc


def _patient_ids(settings: Settings, query: str, since: str | None = None,
                 bulk: bool = False, group: str | None = None) -> list[str]:
    """The backfill's patients: by Bulk Data `$export` with --bulk where the server offers it
    (and the query has no filters), else by search (`fhir.bulk.backfill_patients`)."""
    from clinragen_fhir.fhir.bulk import backfill_patients

    resource, _, qs = query.partition("?")
    if resource != "Patient":
        raise click.UsageError("--query must start with 'Patient?' (or be 'Patient')")
    # pairs, not a dict: `birthdate=ge1950&birthdate=le1960` repeats a name, and both count
    params = parse_qsl(qs)
    with settings.fhir.client() as client:
        found = backfill_patients(client, params, since=since, group=group, use_export=bulk)
    if bulk or since:
        click.echo(f"patients found by {found.source}")
    return found.patients


@main.command("diagnose-all")
@click.option("--query", default="Patient", show_default=True,
              help="Which patients, as a FHIR search, e.g. 'Patient?address-state=CA'.")
@click.option("--wait", is_flag=True, help="Wait for every result and print a summary.")
@click.option("--local", is_flag=True, help="Run in this process instead of the queue.")
@click.option("--timeout", default=3600, show_default=True, help="Seconds to wait in all.")
@click.option("--json-out", type=click.Path(path_type=Path), help="Write outcomes as JSON.")
@click.option("--restart", is_flag=True,
              help="Forget which patients an earlier run of this query finished; do all again.")
@click.option("--since", default=None,
              help="Only patients whose record changed since this instant (FHIR instant).")
@click.option("--bulk", is_flag=True,
              help="Find the patients by Bulk Data $export where the server offers it.")
@click.option("--group", default=None, help="With --bulk: export this Group's patients.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Patients per task (clinragen.diagnose_batch: predicted together); 1: a "
                   "clinragen.diagnose task each.")
def diagnose_all(query: str, wait: bool, local: bool, timeout: int,
                 json_out: Path | None, restart: bool, since: str | None = None,
                 bulk: bool = False, group: str | None = None, batch: int = 1) -> None:
    """Diagnose every patient a search returns; with --wait, print a summary table.

    Resumable: the patients finished for this query (on this server) are checkpointed in the
    state store as they complete, by the worker or in --local mode, and a re-run skips them.
    """
    from clinragen_fhir.worker.state import WorkerState

    settings = _settings()
    started = time.monotonic()
    ids = _patient_ids(settings, query, since, bulk or bool(group), group)
    click.echo(f"{len(ids)} patients match {query}")
    state = WorkerState(settings.state_url)
    scope = query + (f"&_since={since}" if since else "") + (f"|Group/{group}" if group else "")
    run = backfill_key(settings.fhir.base_url, scope, model_identity(settings.model_dir))
    if restart:
        state.reset_backfill(run)
    done = state.backfill_done(run)
    todo = [pid for pid in ids if pid not in done]
    if len(todo) < len(ids):
        click.echo(f"{len(ids) - len(todo)} already done by an earlier run of this query "
                   "(--restart to redo them)")
    ids = todo
    outcomes: list[dict[str, Any]] = []
    if local:
        from clinragen_fhir.worker.state import ReportLocked

        for pid in tqdm(ids, unit="patient"):
            try:
                outcomes.append(_run_local(pid))
                state.mark_done(run, pid)
            except (FhirError, ReportLocked) as exc:  # locked: another run writes it now
                outcomes.append({"status": "failed", "reason": str(exc)})
    else:
        from clinragen_fhir.worker.app import task_reprs
        from clinragen_fhir.worker.tasks import diagnose as task
        from clinragen_fhir.worker.tasks import diagnose_batch

        if batch > 1:
            chunks = [ids[i:i + batch] for i in range(0, len(ids), batch)]
            pending = [diagnose_batch.apply_async((c,), {"backfill": run},
                                                  **task_reprs((c,), {"backfill": run}))
                       for c in tqdm(chunks, unit="queued")]
        else:
            pending = [task.apply_async((pid,), {"backfill": run},
                                        **task_reprs((pid,), {"backfill": run}))
                       for pid in tqdm(ids, unit="queued")]
        if not wait:
            click.echo(f"queued {len(pending)} tasks")
            return
        deadline = time.monotonic() + timeout
        for result in tqdm(pending, unit="task"):
            try:
                got = result.get(timeout=max(1.0, deadline - time.monotonic()))
            except Exception as exc:  # the task's error as Celery re-raises it
                outcomes.append({"status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
                continue
            if batch <= 1:
                outcomes.append(got)
                continue
            outcomes += got.get("outcomes", [])  # a batch: its patients' outcomes, and those
            # sent on (retried later, or split into single tasks) or dead-lettered, by count
            outcomes += [{"status": "failed", "reason": "dead-lettered (clinragen-fhir dlq "
                          "list)"}] * int(got.get("failed", 0))
            outcomes += [{"status": "queued again", "reason": "retried or split"}] * int(
                got.get("retried", 0) + got.get("split", 0))
    elapsed = time.monotonic() - started
    _print_summary(outcomes, elapsed)
    if json_out:
        json_out.write_text(json.dumps({"wall_s": elapsed, "outcomes": outcomes}, indent=2))
    if any(o.get("status") == "failed" for o in outcomes):
        raise SystemExit(1)


def backfill_key(base_url: str, query: str, model: str = RULE_BASELINE) -> str:
    """The checkpoint a `diagnose-all` run resumes from: one per server, query and model (a
    backfill finished by the rule baseline is not one finished by a trained model). `model`:
    `identity.model_identity`, the same hash the reports and the audit carry."""
    import hashlib

    suffix = "" if model == RULE_BASELINE else f"|{model}"
    return hashlib.sha256(f"{base_url.rstrip('/')}|{query}{suffix}".encode()).hexdigest()[:24]


def report_figures(outcomes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What the reports say, over those written or found: codes per report, and for the written
    ones the rationale check (diagnoses citing a reading, claims that hold)."""
    reports = [o for o in outcomes if o.get("status") in ("written", "exists")]
    if not reports:
        return []
    n = sorted(len(o.get("diagnoses", [])) for o in reports)
    rows = [("codes per report: mean / median / max",
             f"{sum(n) / len(n):.2f} / {n[len(n) // 2]} / {n[-1]}"),
            ("reports concluding nothing", str(sum(1 for x in n if x == 0)))]
    written = [o for o in reports if o.get("status") == "written"]
    dx = sum(len(o.get("diagnoses", [])) for o in written)
    if written and dx:
        cited = sum(int(o.get("diagnoses_cited", 0)) for o in written)
        with_cited = sum(1 for o in written if int(o.get("diagnoses_cited", 0)) > 0)
        with_dx = sum(1 for o in written if o.get("diagnoses"))
        claims = sum(int(o.get("claims", 0)) for o in written)
        held = sum(int(o.get("claims_held", 0)) for o in written)
        rows += [("diagnoses citing a reading (written reports)", f"{cited} of {dx} "
                  f"({100 * cited / dx:.1f} %)"),
                 ("reports with a cited reading (of those concluding something)",
                  f"{with_cited} of {with_dx}"),
                 ("lab claims that hold (claim check)", f"{held} of {claims}" + (
                     f" ({100 * held / claims:.1f} %)" if claims else ""))]
    # the concluded disorders against the problem list (report.problem_list), when compared
    status: Counter[str] = Counter()
    for o in reports:
        status.update({str(k): int(v) for k, v in (o.get("problem_list") or {}).items()})
    if status:
        rows += [("concluded disorders suspected, not on the problem list",
                  str(status["suspected"])),
                 ("concluded disorders known (on the problem list)", str(status["known"])),
                 ("concluded disorders, problem list not checked", str(status["not-checked"]))]
    return rows


def _print_summary(outcomes: list[dict[str, Any]], elapsed: float) -> None:
    status = Counter(str(o.get("status")) for o in outcomes)
    reasons = Counter(str(o.get("reason")) for o in outcomes if o.get("status") in
                      ("skipped", "failed"))
    codes = Counter(c for o in outcomes for c in o.get("diagnoses", []))
    # the report lifecycle: a write is a first report or a new version of the current one
    versions = sum(1 for o in outcomes if o.get("status") == "written"
                   and str(o.get("version", "")) not in ("", "1"))
    rows = [("patients", len(outcomes)), ("reports written", status["written"]),
            ("of which new versions of a current report", versions),
            ("reports already present", status["exists"]),  # unchanged: nothing written
            ("skipped", status["skipped"]),
            ("failed", status["failed"]), ("wall time (s)", f"{elapsed:.1f}")]
    click.echo("\n| summary | value |\n|---|---|")
    for name, value in rows:
        click.echo(f"| {name} | {value} |")
    for reason, n in reasons.most_common():
        click.echo(f"| skipped/failed: {reason} | {n} |")
    for method, n in Counter(str(o["method"]) for o in outcomes if o.get("method")).items():
        click.echo(f"| method: {method} | {n} |")  # which model wrote them (model vs fallback)
    for name, value in report_figures(outcomes):
        click.echo(f"| {name} | {value} |")
    if codes:
        from clinragen_fhir.knowledge import load_graph

        kg = load_graph(_settings().knowledge_path)
        click.echo("\n| SNOMED CT concluded | term | patients |\n|---|---|---|")
        for code, n in codes.most_common(15):
            concept = kg.disorder(code)
            click.echo(f"| {code} | {concept.term if concept else '(not in graph)'} | {n} |")


@main.command()
@click.argument("patient_id")
@click.option("--full", is_flag=True, help="Print the newest report's JSON in full.")
def reports(patient_id: str, full: bool) -> None:
    """List the reports this software wrote for a patient."""
    settings = _settings()
    system = settings.report.identifier_system
    with settings.fhir.client() as client:
        found = list(client.search("DiagnosticReport", {
            "subject": f"Patient/{patient_id}", "identifier": f"{system}|",
            "_sort": "-_lastUpdated"}))
    found = [r for r in found if any(i.get("system") == system for i in r.get("identifier", []))]
    if not found:
        click.echo("no reports")
        return
    for r in found:
        codes = ", ".join(c.get("display", c.get("code", "")) for cc in r.get("conclusionCode", [])
                          for c in cc.get("coding", []) if c.get("system") == SNOMED)
        click.echo(f"DiagnosticReport/{r['id']}  {r.get('issued', '')[:19]}  {r.get('status')}  "
                   f"[{codes or 'no disorder supported'}]")
    if full:
        click.echo(json.dumps(found[0], indent=2))


@main.command()
@click.option("--patient", help="Only this patient's reports (a Patient id).")
@click.option("--since", help="Issued on or after this date (YYYY-MM-DD or a FHIR dateTime).")
@click.option("--until", help="Issued on or before this date.")
@click.option("--method", "method",
              help="Only this method, version or model: 'knowledge-rule-baseline', '1', "
                   "'name@1', or a model identity ('onnx:<hash>', 'rule-baseline').")
@click.option("--no-recheck", is_flag=True, help="Only list; do not re-check inputs.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write one row per report to this CSV file.")
@click.option("--limit", default=0, help="At most this many reports (0: all).")
def audit(patient: str | None, since: str | None, until: str | None, method: str | None,
          no_recheck: bool, csv_path: Path | None, limit: int) -> None:
    """List the reports we wrote and flag those whose inputs changed since.

    Every input a report cites (its Provenance, Type/id/_history/version, and its cited values)
    is compared with the server's current data: new versions, changed values, deletions.
    """
    from clinragen_fhir.report.recheck import (
        ReportAudit,
        list_reports,
        safe_recheck,
        summarise,
        write_csv,
    )

    settings = _settings()
    audits: list[ReportAudit] = []
    with settings.fhir.client() as client:
        found = list_reports(client, settings.report.identifier_system, patient=patient,
                             since=since, until=until, method=method)
        for n, report in enumerate(found):
            if limit and n >= limit:
                break
            a = summarise(report) if no_recheck else safe_recheck(client, report)
            audits.append(a)
            flag = "" if no_recheck else f"  {a.status} ({len(a.changes)} changes)"
            model = f" model={a.model}" if a.model else ""
            click.echo(f"DiagnosticReport/{a.report_id}  {a.issued[:19]}  {a.method}{model}  "
                       f"v{a.version or '?'} inputs={a.n_inputs} values={a.n_values}{flag}")
            for c in a.changes:
                where = f"{c.reference}/_history/{c.version}" if c.version else c.reference
                click.echo(f"    {c.kind}: {where} {c.detail}")
    changed = sum(1 for a in audits if a.changes)
    click.echo(f"{len(audits)} reports" + ("" if no_recheck else
                                           f", {changed} with changed inputs"))
    if csv_path:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="", encoding="utf-8") as fh:
            write_csv(audits, fh)
        click.echo(f"CSV: {csv_path}")


def _serve_metrics(port: int | None, host: str | None, configured: tuple[int, str]) -> None:
    """Prometheus /metrics of this process (the webhook's, the CDS Hooks service's) on `host`
    and `port`: the command line's when given, else the settings' (`configured`: the process's
    `metrics_port` and `metrics_host`, off and loopback unless a site sets them)."""
    port = configured[0] if port is None else port
    if port > 0:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host or configured[1])


_METRICS_PORT_HELP = "> 0: Prometheus /metrics on this port (default: {}.metrics_port, 0 = off)."
_METRICS_HOST_HELP = ("Address /metrics binds (default: {}.metrics_host, else worker.metrics_host,"
                      " 127.0.0.1 unless set).")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True)
@click.option("--metrics-port", type=int, default=None, help=_METRICS_PORT_HELP.format("webhook"))
@click.option("--metrics-host", default=None, help=_METRICS_HOST_HELP.format("webhook"))
def webhook(host: str, port: int, metrics_port: int | None, metrics_host: str | None) -> None:
    """Run the Subscription rest-hook receiver (needs CLINRAGEN_WEBHOOK_SECRET)."""
    import uvicorn

    _serve_metrics(metrics_port, metrics_host, _settings().metrics_bind("webhook"))
    uvicorn.run("clinragen_fhir.webhook:create_app", factory=True, host=host, port=port,
                log_config=None, access_log=False)


@main.command("cds-hooks")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8091, show_default=True)
@click.option("--metrics-port", type=int, default=None,
              help=_METRICS_PORT_HELP.format("cds_hooks"))
@click.option("--metrics-host", default=None, help=_METRICS_HOST_HELP.format("cds_hooks"))
def cds_hooks(host: str, port: int, metrics_port: int | None, metrics_host: str | None) -> None:
    """Run the CDS Hooks patient-view service (JWT auth: [cds_hooks] jwt_issuer, jwt_keys_file)."""
    import uvicorn

    from clinragen_fhir.cds_hooks import create_app

    try:  # refuses to start off loopback without JWT settings
        bind = _settings().metrics_bind("cds_hooks")
        app = create_app(host)
    except (ValueError, FhirError) as exc:
        raise click.ClickException(str(exc)) from None
    _serve_metrics(metrics_port, metrics_host, bind)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False)


@main.command()
@click.option("--endpoint", required=True,
              help="Our receiver's URL, e.g. https://host:8090/notify")
@click.option("--criteria", multiple=True,
              default=("Observation?category=laboratory", "Observation?category=vital-signs",
                       "DocumentReference?status=current"), show_default=True)
@click.option("--allow-insecure-http", is_flag=True,
              help="Allow a plain http endpoint off loopback (the secret travels in the clear).")
def subscribe(endpoint: str, criteria: tuple[str, ...], allow_insecure_http: bool) -> None:
    """Register R4 rest-hook Subscriptions on the FHIR server (idempotent: PUT by a fixed id).

    The shared secret travels as a channel header: the receiver's own (`[webhook]` settings:
    CLINRAGEN_WEBHOOK_SECRET by default, or `webhook.secret_file`).
    """
    import hashlib

    from clinragen_fhir.fhir.client import check_url

    try:  # every notification carries the secret to this URL
        check_url(endpoint, "--endpoint", allow_insecure_http)
    except FhirError as exc:
        raise click.UsageError(str(exc).replace("allow_insecure_http = true for this endpoint",
                                                "--allow-insecure-http")) from None
    settings = _settings()
    try:
        secret = settings.webhook.secret().get_secret_value()
    except FhirError as exc:  # unset, short or a placeholder: named, never shown
        raise click.UsageError(str(exc)) from None
    with settings.fhir.client() as client:
        for crit in criteria:
            sid = "clinragen-" + hashlib.sha256(f"{endpoint}|{crit}".encode()).hexdigest()[:24]
            sub = {"resourceType": "Subscription", "id": sid, "status": "requested",
                   "reason": "ClinRaGen-FHIR: diagnose when labs or notes change",
                   "criteria": crit,
                   "channel": {"type": "rest-hook", "endpoint": endpoint,
                               "payload": "application/fhir+json",
                               "header": [f"X-Clinragen-Secret: {secret}"]}}
            client.update(sub)
            click.echo(f"Subscription/{sid}: {crit} -> {endpoint}")


@main.command("install-profiles")
def install_profiles() -> None:
    """PUT the StructureDefinitions of every extension and profile this software writes onto the
    FHIR server (idempotent), so that its `$validate` knows them. Run once per release."""
    from clinragen_fhir.report.profiles import install

    with _settings().fhir.client() as client:
        for url in install(client):
            click.echo(url)


@main.group()
def dlq() -> None:
    """The dead-letter queue: tasks that could not succeed, with reasons."""


@dlq.command("list")
def dlq_list() -> None:
    """List dead letters (id, when, task, retries, error)."""
    from clinragen_fhir.worker.state import WorkerState

    letters = WorkerState(_settings().state_url).dead_letters()
    for d in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.failed_at))
        click.echo(f"{d.id}  {when}Z  {d.task}  retries={d.retries}  {d.error}")
    click.echo(f"{len(letters)} dead letters")


@dlq.command("requeue")
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Re-queue every dead letter.")
def dlq_requeue(ids: tuple[str, ...], everything: bool) -> None:
    """Put dead letters back on the queue (they are removed from the dead-letter queue)."""
    from clinragen_fhir.worker.app import app, task_reprs
    from clinragen_fhir.worker.state import WorkerState

    state = WorkerState(_settings().state_url)
    chosen = [d.id for d in state.dead_letters()] if everything else list(ids)
    if not chosen:
        raise click.UsageError("name dead-letter ids or pass --all")
    for letter_id in chosen:
        letter = state.take(letter_id)
        if letter is None:
            click.echo(f"{letter_id}: not found", err=True)
            continue
        app.send_task(letter.task, args=letter.args, **task_reprs(letter.args))
        click.echo(f"{letter_id}: re-queued")


@main.command()
@click.argument("reference")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Save a report's HTML rendering (presentedForm) to this file instead.")
def show(reference: str, html_out: Path | None) -> None:
    """Print one resource (e.g. DiagnosticReport/123) as JSON, or save a report's HTML."""
    rtype, _, rid = reference.partition("/")
    if not rid:
        raise click.UsageError("REFERENCE must be Type/id")
    settings = _settings()
    with settings.fhir.client() as client:
        resource = client.read(rtype, rid)
    if html_out is None:
        click.echo(json.dumps(_elide_attachments(resource), indent=2))
        return
    from clinragen_fhir.report.html import decode_presented_form

    page = decode_presented_form(resource)
    if page is None:
        raise click.ClickException(f"{reference} carries no text/html presentedForm")
    html_out.parent.mkdir(parents=True, exist_ok=True)
    html_out.write_text(page, encoding="utf-8")
    click.echo(str(html_out))


def _elide_attachments(resource: dict[str, Any]) -> dict[str, Any]:
    """Base64 attachment data is unreadable on a terminal: name its size instead (--html)."""
    out = dict(resource)
    forms = out.get("presentedForm")
    if isinstance(forms, list):
        out["presentedForm"] = [
            {**f, "data": f"<{len(str(f['data']))} base64 characters: use --html FILE>"}
            if isinstance(f, dict) and "data" in f else f for f in forms]
    return out


REQUIRED_SEARCH = {
    "Observation": ["patient", "category", "code", "date"],
    "DocumentReference": ["patient"],
    "DiagnosticReport": ["subject", "identifier"],
    "Patient": ["_lastUpdated"],
}


def capability_gaps(cap: dict[str, Any], problem_list: bool | None = None) -> list[str]:
    """What the server's CapabilityStatement lacks of what the worker needs (Condition search
    too while the problem-list check is on: `problem_list`, None: `[report] problem_list`)."""
    gaps: list[str] = []
    rest = next((r for r in cap.get("rest", []) if r.get("mode") == "server"), None)
    if rest is None:
        return ["no server REST capability"]
    if not any(i.get("code") == "transaction" for i in rest.get("interaction", [])):
        gaps.append("system interaction 'transaction'")
    resources = {r.get("type"): r for r in rest.get("resource", [])}
    from clinragen_fhir.fhir.conditions import PROBLEM_LIST_SEARCH, problem_list_enabled

    # the problem list's Condition search, only while the check is on ([report] problem_list)
    needed = {**REQUIRED_SEARCH,
              **(PROBLEM_LIST_SEARCH if problem_list_enabled(problem_list) else {})}
    for rtype, params in needed.items():
        res = resources.get(rtype)
        if res is None:
            gaps.append(f"resource {rtype}")
            continue
        names = {p.get("name") for p in res.get("searchParam", [])}
        gaps += [f"{rtype} search parameter '{p}'" for p in params
                 if p not in names and not p.startswith("_")]
    dr = resources.get("DiagnosticReport", {})
    if not dr.get("conditionalCreate"):
        gaps.append("DiagnosticReport conditional create")
    if not dr.get("conditionalUpdate"):  # the report lifecycle: one report, new versions
        gaps.append("DiagnosticReport conditional update")
    return gaps


_LETTERS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def check_scope(endpoint: FhirEndpoint, problem_list: bool | None = None) -> bool:
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

    from clinragen_fhir.fhir.client import check_url
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
    from clinragen_fhir.cds_hooks import CdsConfig

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


@main.command("check-config")
def check_config() -> None:
    """Report what the worker, the webhook and the CLI will use, trying each service: the FHIR
    endpoint (capabilities), its auth (where each secret comes from, never its value) and the
    granted scope, the retry bound, the broker, result backend and state store, the model (its
    hash, its files), the problem-list check, the webhook secret's source, the CDS Hooks
    service's settings, each process's metrics address and tracing. Exit 1 when anything
    would fail (a configuration refused at load is named, and exits 1 too)."""
    try:
        settings = _settings()
    except FhirError as exc:
        click.echo(f"configuration REFUSED: {exc}")
        raise SystemExit(1) from None
    results = [_check_fhir(settings), check_scope(settings.fhir, settings.report.problem_list),
               _check_retries(settings),
               _check_broker(settings),
               _check_redis("result backend", settings.result_backend, settings),
               _check_redis("state store", settings.state_url, settings),
               _check_model(settings), _check_problem_list(settings),
               _check_webhook(settings), _check_cds_hooks(settings), _check_metrics(settings),
               _check_tracing(settings), _check_log_key(settings)]
    ok = all(results)
    click.echo("OK" if ok else "problems found")
    if not ok:
        raise SystemExit(1)


main.add_command(knowledge)
main.add_command(keys)


if __name__ == "__main__":
    sys.exit(main())
