"""`clinragen-fhir`: load data, run the worker, diagnose, list reports, check the config.

Over 400 lines because it is one click command per operator task (load, worker, diagnose,
diagnose-all, reports, audit, webhook, cds-hooks, subscribe, install-profiles, dlq, show,
check-config), each options, a call and its output. What the commands compute lives beside what
it is about: the backfill checkpoint key in `worker.state`, the run's report figures in
`report.figures`, the server's capability gaps in `fhir.capability`, the Subscriptions in
`fhir.subscription`, the re-check of reports in `report.recheck`, check-config's checks in
`config_checks`.
"""

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
from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.errors import FhirError
from clinragen_fhir.fhir.keys_cli import keys
from clinragen_fhir.fhir.resources import SNOMED
from clinragen_fhir.fhir.subscription import DEFAULT_CRITERIA, rest_hook_subscription
from clinragen_fhir.identity import model_identity
from clinragen_fhir.knowledge.cli import knowledge
from clinragen_fhir.report.figures import report_figures


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
    from clinragen_fhir.worker.tasks import load_runtime, report_lock

    settings, kg, predictor = load_runtime()
    lock = partial(report_lock, WorkerState(settings.state_url), f"cli-{uuid.uuid4().hex}",
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
    from clinragen_fhir.worker.state import WorkerState, backfill_key

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
@click.option("--criteria", multiple=True, default=DEFAULT_CRITERIA, show_default=True)
@click.option("--allow-insecure-http", is_flag=True,
              help="Allow a plain http endpoint off loopback (the secret travels in the clear).")
def subscribe(endpoint: str, criteria: tuple[str, ...], allow_insecure_http: bool) -> None:
    """Register R4 rest-hook Subscriptions on the FHIR server (idempotent: PUT by a fixed id).

    The shared secret travels as a channel header: the receiver's own (`[webhook]` settings:
    CLINRAGEN_WEBHOOK_SECRET by default, or `webhook.secret_file`).
    """
    from clinragen_fhir.fhir.urls import check_url

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
            sub = rest_hook_subscription(endpoint, crit, secret)
            client.update(sub)
            click.echo(f"Subscription/{sub['id']}: {crit} -> {endpoint}")


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
    from clinragen_fhir.config_checks import check_all

    ok = check_all(settings)
    click.echo("OK" if ok else "problems found")
    if not ok:
        raise SystemExit(1)


main.add_command(knowledge)
main.add_command(keys)


if __name__ == "__main__":
    sys.exit(main())
